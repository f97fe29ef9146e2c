"""ShapesDataset: attributes, held-out split, captions, rendering geometry, determinism."""

import itertools

import numpy as np
import pytest
import torch

from minildm.shapes import (
    CAPTION_TEMPLATES,
    COLORS,
    HELD_OUT,
    POSITION_ANCHORS,
    POSITIONS,
    SHAPES,
    SIZE_RADII,
    SIZES,
    ShapeAttributes,
    ShapesDataset,
    all_combinations,
    caption,
    evaluation_prompts,
    parse_caption,
    render,
    render_batch,
    render_masks,
)


def brightness(image: np.ndarray) -> np.ndarray:
    return image.max(axis=-1)  # (H, W, 3) -> (H, W)


# ----------------------------------------------------------------------------------------------
# Attributes and splits


def test_attributes_are_validated_with_the_valid_values_in_the_message():
    with pytest.raises(ValueError, match="color must be one of red, green, blue, yellow; got 'purple'"):
        ShapeAttributes("purple", "circle", "small", "center")
    with pytest.raises(ValueError, match="position"):
        ShapeAttributes("red", "circle", "small", "middle")


def test_all_combinations_is_the_full_product():
    combos = all_combinations()
    assert len(combos) == len(COLORS) * len(SHAPES) * len(SIZES) * len(POSITIONS) == 120
    assert len(set(combos)) == len(combos)


def test_held_out_keeps_every_attribute_and_colour_shape_pair_in_training():
    assert 6 <= len(HELD_OUT) <= 10
    assert len(set(HELD_OUT)) == len(HELD_OUT)
    assert set(HELD_OUT) <= set(all_combinations())
    train = [attributes for _, attributes in evaluation_prompts("train")]
    assert not set(train) & set(HELD_OUT)
    assert len(train) + len(HELD_OUT) == 120
    for field_name, values in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        assert {getattr(a, field_name) for a in train} == set(values), field_name
    assert {(a.color, a.shape) for a in train} == set(itertools.product(COLORS, SHAPES))


# ----------------------------------------------------------------------------------------------
# Captions


def test_canonical_captions():
    assert caption(ShapeAttributes("red", "circle", "large", "top left")) == "a large red circle at the top left"
    assert caption(ShapeAttributes("blue", "square", "small", "center")) == "a small blue square in the center"


@pytest.mark.parametrize("template", range(len(CAPTION_TEMPLATES)))
def test_every_caption_parses_back(template):
    for attributes in all_combinations():
        text = caption(attributes, template)
        assert text == text.lower()
        assert parse_caption(text) == attributes, text


def test_templates_are_different_phrasings():
    attributes = ShapeAttributes("green", "triangle", "small", "bottom right")
    assert len({caption(attributes, t) for t in range(len(CAPTION_TEMPLATES))}) == len(CAPTION_TEMPLATES) >= 4


def test_parse_caption_rejects_missing_or_ambiguous_words():
    with pytest.raises(ValueError, match="cannot read a color"):
        parse_caption("a large circle at the top left")
    with pytest.raises(ValueError, match=r"found 2 \(red, blue\)"):
        parse_caption("a large red blue circle at the top left")
    with pytest.raises(ValueError, match="template must be between 0 and 3"):
        caption(HELD_OUT[0], template=4)


def test_evaluation_prompts_cover_each_split_with_canonical_captions():
    assert len(evaluation_prompts("all")) == 120
    assert [a for _, a in evaluation_prompts("heldout")] == list(HELD_OUT)
    for text, attributes in evaluation_prompts("all"):
        assert text == caption(attributes, 0)
    with pytest.raises(ValueError, match="split must be one of train, heldout, all"):
        evaluation_prompts("test")


# ----------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("size", [16, 32, 48])
def test_render_shape_dtype_and_range(size):
    image = render(ShapeAttributes("yellow", "triangle", "large", "bottom left"), size=size)
    assert image.shape == (size, size, 3)
    assert image.dtype == np.float32
    assert image.min() == 0.0 and 0.9 < image.max() <= 1.0


def test_render_rejects_tiny_images():
    with pytest.raises(ValueError, match="at least 16 pixels, got 8"):
        render(HELD_OUT[0], size=8)


def test_large_shapes_cover_more_than_twice_the_area_of_small_ones():
    for shape in SHAPES:
        area = {s: brightness(render(ShapeAttributes("red", shape, s, "center"))).sum() for s in SIZES}
        assert area["large"] > 2.5 * area["small"], shape  # 2.8 nominally (SIZE_RADII)


def test_centroid_sits_on_the_anchor_and_colour_is_the_palette_colour():
    size = 64
    centres = (np.arange(size) + 0.5) / size
    for shape, position, color in itertools.product(SHAPES, POSITIONS, COLORS):
        image = render(ShapeAttributes(color, shape, "small", position), size=size)
        weight = brightness(image)
        x = (weight * centres[None, :]).sum() / weight.sum()
        y = (weight * centres[:, None]).sum() / weight.sum()
        assert np.hypot(x - POSITION_ANCHORS[position][0], y - POSITION_ANCHORS[position][1]) < 0.01
        fully_covered = weight >= weight.max() - 1e-6
        assert fully_covered.sum() > 10
        np.testing.assert_allclose(image[fully_covered], np.broadcast_to(COLORS[color], (fully_covered.sum(), 3)))


class ExtremeJitter:
    """Stands in for np.random.Generator: every position jitter at one end, every radius at its largest."""

    def __init__(self, towards: str):
        self.calls = 0
        self.towards = towards  # "low" moves shapes up and left, "high" down and right

    def uniform(self, low, high, size):
        self.calls += 1
        position_call = self.calls == 1  # render_batch draws position jitter first, then radius jitter
        return np.full(size, low if position_call and self.towards == "low" else high)


def test_shapes_stay_inside_the_image_at_the_largest_jitter():
    size = 128  # fine enough that a shape reaching the edge would light up the outermost pixels
    for towards, corner in (("low", "top left"), ("high", "bottom right")):
        combos = [ShapeAttributes("red", shape, "large", corner) for shape in SHAPES]
        images = render_batch(combos, size=size, rng=ExtremeJitter(towards))  # (3, size, size, 3)
        border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
        assert border.max() == 0.0, corner
    images = render_batch(all_combinations() * 10, size=16, rng=np.random.default_rng(0))
    assert images.max(axis=-1).sum(axis=(1, 2)).min() > 2  # nothing vanishes at 16 px


def test_jitter_follows_the_generator():
    attributes = ShapeAttributes("green", "square", "large", "top right")
    same = [render(attributes, rng=np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.array_equal(same[0], render(attributes, rng=np.random.default_rng(8)))
    np.testing.assert_array_equal(render(attributes), render(attributes))


def test_masks_cover_the_shapes_area_and_are_the_images_without_colour():
    size = 64
    circle = render_masks([ShapeAttributes("red", "circle", "large", "center")], size=size)[0]  # (64, 64)
    assert circle.shape == (size, size) and circle.dtype == np.float32 and 0 <= circle.min() <= circle.max() <= 1
    radius_px = SIZE_RADII["large"] * size
    assert circle.sum() == pytest.approx(np.pi * radius_px**2, rel=0.01)  # πr², in pixels
    square = render_masks([ShapeAttributes("red", "square", "small", "top left")], size=size)[0]
    assert square.sum() == pytest.approx((2 * 0.9 * SIZE_RADII["small"] * size) ** 2, rel=0.03)  # (2 · 0.9 r)²
    # Drawn with the same generator state, an image is its mask times its colour.
    attributes = list(HELD_OUT)
    masks = render_masks(attributes, size=32, rng=np.random.default_rng(3))
    images = render_batch(attributes, size=32, rng=np.random.default_rng(3))
    colors = np.array([COLORS[a.color] for a in attributes], dtype=np.float32)
    np.testing.assert_allclose(images, masks[..., None] * colors[:, None, None, :], rtol=0, atol=0)
    # The nominal mask (no rng) holds most of a jittered drawing of the same caption.
    jittered = render_masks(attributes, size=32, rng=np.random.default_rng(4))
    nominal = render_masks(attributes, size=32) > 0.5
    assert ((jittered * nominal).sum(axis=(1, 2)) / jittered.sum(axis=(1, 2))).min() > 0.6
    with pytest.raises(ValueError, match="at least 16 pixels"):
        render_masks(attributes, size=8)


# ----------------------------------------------------------------------------------------------
# Dataset


def test_dataset_items_shapes_dtype_and_range():
    dataset = ShapesDataset(size=32, length=50, seed=0, progress=False)
    assert len(dataset) == 50
    assert dataset.images.shape == (50, 3, 32, 32) and dataset.images.dtype == torch.float32
    assert dataset.images.min() == -1.0 and dataset.images.max() <= 1.0
    image, text = dataset[3]
    assert image.shape == (3, 32, 32) and isinstance(text, str)
    assert [parse_caption(t) for t in dataset.captions] == dataset.attributes
    assert len({c.split()[0] for c in dataset.captions}) > 1, "captions should use several templates"


def test_dataset_is_deterministic_from_its_seed():
    first, again = (ShapesDataset(length=40, seed=3, progress=False) for _ in range(2))
    assert torch.equal(first.images, again.images) and first.captions == again.captions
    other = ShapesDataset(length=40, seed=4, progress=False)
    assert not torch.equal(first.images, other.images)
    assert first.captions != other.captions


def test_dataset_splits():
    train = ShapesDataset(length=2000, split="train", progress=False)
    assert not set(train.attributes) & set(HELD_OUT)
    assert len(set(train.attributes)) == 120 - len(HELD_OUT)
    heldout = ShapesDataset(length=200, split="heldout", progress=False)
    assert set(heldout.attributes) == set(HELD_OUT)
    everything = ShapesDataset(length=2000, split="all", progress=False)
    assert set(everything.attributes) == set(all_combinations())


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesDataset(length=10, split="validation")
    with pytest.raises(ValueError, match="length must be a positive integer, got 0"):
        ShapesDataset(length=0)
    with pytest.raises(ValueError, match="size must be an integer of at least 16"):
        ShapesDataset(size=12, length=10)
