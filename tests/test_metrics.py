"""ShapesChecker: reads real and degraded ShapesDataset images back into their attributes."""

import dataclasses

import pytest
import torch

from minildm.atomic import atomic_write_json, read_json
from minildm.metrics import CHECKER_VERSION, ShapesChecker, gaussian_blur
from minildm.shapes import HELD_OUT, ShapeAttributes, ShapesDataset, render


@pytest.fixture(scope="session")
def checker_dir(tmp_path_factory):
    """Train the checker once for the whole session and save it."""
    directory = tmp_path_factory.mktemp("checker")
    # One thread: on two cores shared with other jobs, two torch threads wait on each other and
    # training takes minutes instead of about 15 s. Restored afterwards for the other tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ShapesChecker.train(size=32, seed=0, progress=False).save(directory)
    finally:
        torch.set_num_threads(threads)
    return directory


@pytest.fixture(scope="session")
def checker(checker_dir):
    return ShapesChecker.load(checker_dir)


@pytest.fixture(scope="session")
def fresh_images():
    """600 images the checker never saw (another seed), every combination including HELD_OUT, in [0, 1]."""
    dataset = ShapesDataset(size=32, length=600, seed=1234, split="all", progress=False)
    assert set(HELD_OUT) <= set(dataset.attributes)
    return (dataset.images + 1) / 2, dataset.attributes


def test_reads_real_images(checker, fresh_images):
    images, attributes = fresh_images
    scores = checker.score(images, attributes)
    print("clean", scores)
    assert set(scores) == {"color", "shape", "size", "position", "all"}
    assert scores["all"] >= 0.99, scores


def test_reads_blurred_and_noisy_images(checker, fresh_images):
    images, attributes = fresh_images
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    degraded = (gaussian_blur(images, sigma=0.7) + 0.03 * noise).clamp(0, 1)
    scores = checker.score(degraded, attributes)
    print("blur 0.7 px + noise 0.03", scores)
    assert scores["all"] >= 0.95, scores


def test_score_counts_each_attribute_separately(checker, fresh_images):
    images, attributes = fresh_images
    images, attributes = images[:40], attributes[:40]
    wrong_color = [dataclasses.replace(a, color="blue" if a.color != "blue" else "red") for a in attributes]
    scores = checker.score(images, wrong_color)
    assert scores["color"] == 0 and scores["all"] == 0
    assert scores["shape"] >= 0.95 and scores["position"] >= 0.95


def test_blank_image_reads_as_nothing_and_scores_zero(checker):
    blank = torch.zeros(2, 3, 32, 32)
    assert checker.read(blank) == [None, None]
    scores = checker.score(blank, [HELD_OUT[0], HELD_OUT[1]])
    assert all(value == 0 for value in scores.values())


def test_reads_a_single_rendered_image(checker):
    attributes = ShapeAttributes("yellow", "triangle", "large", "bottom right")
    image = torch.from_numpy(render(attributes)).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
    assert checker.read(image) == [attributes]


def test_rejects_wrong_inputs(checker):
    with pytest.raises(ValueError, match=r"must be mapped with \(x \+ 1\) / 2"):
        checker.read(torch.rand(2, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match=r"images must be images of shape \(B, 3, H, W\).*got \(3, 32, 32\)"):
        checker.read(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 32\)"):
        checker.read(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"trained at 32 px\), got \(2, 3, 64, 64\)"):
        checker.read(torch.rand(2, 3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):  # the same error type for a wrong dtype everywhere
        checker.read(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        checker.read(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="got 2 images but 1 attributes"):
        checker.score(torch.rand(2, 3, 32, 32), [HELD_OUT[0]])


def test_save_and_load_give_identical_reads(checker_dir, checker, fresh_images, tmp_path):
    images = fresh_images[0][:200]
    checker.save(tmp_path)
    reloaded = ShapesChecker.load(tmp_path)
    assert reloaded.size_threshold == checker.size_threshold
    assert reloaded.read(images) == checker.read(images)
    settings = read_json(tmp_path / "checker.json")
    atomic_write_json(tmp_path / "checker.json", {**settings, "version": CHECKER_VERSION + 1})
    with pytest.raises(ValueError, match="train a new one"):
        ShapesChecker.load(tmp_path)


def test_cached_loads_without_training_when_present(checker_dir, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("cached() trained although a saved checker was there")

    cache = tmp_path / "cache"
    ShapesChecker.load(checker_dir).save(cache / f"shapes_checker_v{CHECKER_VERSION}_32px")
    monkeypatch.setattr(ShapesChecker, "train", no_training)
    assert isinstance(ShapesChecker.cached(size=32, cache_dir=cache), ShapesChecker)
    monkeypatch.setenv("MINILDM_CACHE", str(cache))
    assert isinstance(ShapesChecker.cached(size=32), ShapesChecker)
    with pytest.raises(AssertionError, match="trained although"):  # another size is not in the cache
        ShapesChecker.cached(size=48, cache_dir=cache)


def test_gaussian_blur_keeps_total_brightness():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 10:20, 12:18] = 1.0
    blurred = gaussian_blur(image, sigma=1.0)
    assert torch.allclose(blurred.sum(), image.sum(), rtol=1e-4)
    assert blurred.max() < 1.0
    assert torch.equal(gaussian_blur(image, sigma=0.0), image)
