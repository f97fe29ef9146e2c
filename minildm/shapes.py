"""ShapesDataset: captioned toy images for text-to-image latent diffusion on a CPU.

Every image is one flat-coloured shape on a black background, described by four attributes:

    colour    red, green, blue, yellow
    shape     circle, square, triangle
    size      small, large             (large has about 4x the area of small)
    position  top left, top right, bottom left, bottom right, center

and a caption such as "a large red circle at the top left". The task is small enough to train in
minutes, yet it asks the model to bind words to colour, form, scale and place, which is what
cross-attention (Rombach et al. 2022, sec. 3.3) is for. Because the attributes are known, a
sample can be checked by reading them back (metrics.py).

A few combinations (HELD_OUT) are never shown in training, so one can ask whether the model
composes attributes it has seen apart into a combination it has never seen.

Geometry is in fractions of the image side, so a shape looks the same at any resolution:

    r      radius of the shape, SIZE_RADII[size] times a jitter of 1 +- SIZE_JITTER
    circle radius r; square half-side 0.9 r; triangle (apex up) circumradius 1.3 r
    (cx, cy)  centroid of the shape (y grows downwards), POSITION_ANCHORS[position] +- POSITION_JITTER

Images are drawn on a grid SUPERSAMPLE times finer than the pixels and average-pooled, so edges are
anti-aliased like the output of a real decoder. Depends on numpy, torch and tqdm only.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

# Chosen far apart in RGB so that a blurred or slightly off-colour sample still reads as one of them.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.10),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

# Fractions of the image side. The corner anchors sit at 0.33 rather than 0.25 so that the largest
# shape (a large triangle, jittered to its biggest, moved towards the corner) still fits: its apex
# reaches 0.33 - 0.04 - 1.3 * 0.2 * 1.08 = 0.009 > 0.
# Small shapes are 0.12 (about 8 px across at 32 px), not smaller: at f = 4 a small shape spans two latent
# pixels, and below that a small square and a small circle come back from the autoencoder as the same blob.
SIZE_RADII = {"small": 0.12, "large": 0.2}
POSITION_ANCHORS: dict[str, tuple[float, float]] = {  # (x, y), y downwards
    "top left": (0.33, 0.33),
    "top right": (0.67, 0.33),
    "bottom left": (0.33, 0.67),
    "bottom right": (0.67, 0.67),
    "center": (0.50, 0.50),
}
# Radius x uniform(0.92, 1.08). The large/small area ratio is 2.8 nominally and, for one shape, never
# below (0.2 * 0.92 / (0.12 * 1.08))^2 = 2.0.
SIZE_JITTER = 0.08
# Centre +- 0.04 of the side (1.3 px at 32 px): a corner shape moved towards the centre stays 0.045
# of the side short of the halfway line between the two anchors, so its position is never ambiguous.
POSITION_JITTER = 0.04
SQUARE_HALF_SIDE = 0.9  # times r: the square looks as big as the circle, about the same area
TRIANGLE_CIRCUMRADIUS = 1.3  # times r: a triangle fills less of its circle, so it is drawn bigger
SUPERSAMPLE = 4  # draw on a 4x finer grid, then average 4x4 blocks: anti-aliased edges
MIN_IMAGE_SIZE = 16

CAPTION_TEMPLATES = (
    "a {size} {color} {shape} {preposition} the {position}",  # canonical: "a large red circle at the top left"
    "a {color} {shape}, {size}, {preposition} the {position}",
    "{size} {color} {shape}, {position}",
    "{position}: a {size} {color} {shape}",
)


@dataclass(frozen=True)
class ShapeAttributes:
    """What one image shows; every field must be one of COLORS, SHAPES, SIZES, POSITIONS."""

    color: str
    shape: str
    size: str
    position: str

    def __post_init__(self):
        for field_name, valid in (
            ("color", tuple(COLORS)),
            ("shape", SHAPES),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            value = getattr(self, field_name)
            if value not in valid:
                raise ValueError(f"{field_name} must be one of {', '.join(valid)}; got {value!r}")


def all_combinations() -> list[ShapeAttributes]:
    """Every colour x shape x size x position, 4 x 3 x 2 x 5 = 120 combinations."""
    return [ShapeAttributes(*combo) for combo in itertools.product(COLORS, SHAPES, SIZES, POSITIONS)]


# Never in the "train" split. Each colour, shape, size and position, and each colour-shape pair,
# still appears in training (tests/test_shapes.py checks this), so every held-out image asks for a
# new combination of familiar pieces, not for a word the model has never seen.
HELD_OUT: tuple[ShapeAttributes, ...] = (
    ShapeAttributes("red", "circle", "small", "bottom right"),
    ShapeAttributes("red", "triangle", "large", "center"),
    ShapeAttributes("green", "square", "large", "top left"),
    ShapeAttributes("green", "triangle", "small", "top right"),
    ShapeAttributes("blue", "circle", "large", "bottom left"),
    ShapeAttributes("blue", "square", "small", "center"),
    ShapeAttributes("yellow", "triangle", "large", "bottom right"),
    ShapeAttributes("yellow", "circle", "small", "top left"),
)

SPLITS = ("train", "heldout", "all")


def split_combinations(split: str = "all") -> list[ShapeAttributes]:
    """The combinations of a split: "train" (all but HELD_OUT), "heldout" (HELD_OUT only) or "all"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "heldout":
        return list(HELD_OUT)
    if split == "train":
        return [combo for combo in all_combinations() if combo not in HELD_OUT]
    return all_combinations()


# ----------------------------------------------------------------------------------------------
# Captions


def caption(attributes: ShapeAttributes, template: int = 0) -> str:
    """One sentence for `attributes`; template 0 is canonical ("a small blue square in the center")."""
    if not 0 <= template < len(CAPTION_TEMPLATES):
        raise ValueError(f"template must be between 0 and {len(CAPTION_TEMPLATES) - 1}, got {template}")
    preposition = "in" if attributes.position == "center" else "at"
    return CAPTION_TEMPLATES[template].format(
        size=attributes.size,
        color=attributes.color,
        shape=attributes.shape,
        preposition=preposition,
        position=attributes.position,
    )


def parse_caption(text: str) -> ShapeAttributes:
    """Read the attributes back from a caption of any template (word order and punctuation are free)."""
    words = " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "
    found = {}
    for field_name, valid in (
        ("color", tuple(COLORS)),
        ("shape", SHAPES),
        ("size", SIZES),
        ("position", POSITIONS),
    ):
        matches = [value for value in valid if f" {value} " in words]
        if len(matches) != 1:
            raise ValueError(
                f"cannot read a {field_name} from caption {text!r}: expected exactly one of "
                f"{', '.join(valid)}, found {len(matches)} ({', '.join(matches) or 'none'})"
            )
        found[field_name] = matches[0]
    return ShapeAttributes(**found)


def evaluation_prompts(split: str = "all") -> list[tuple[str, ShapeAttributes]]:
    """(canonical caption, attributes) for every combination of a split, in a fixed order."""
    return [(caption(combo), combo) for combo in split_combinations(split)]


# ----------------------------------------------------------------------------------------------
# Rendering


def _shape_masks(shape: str, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Inside-the-shape masks (n, H, W) from offsets to the centroid dx (n, 1, W), dy (n, H, 1)."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        half_side = SQUARE_HALF_SIDE * radius
        return (np.abs(dx) <= half_side) & (np.abs(dy) <= half_side)
    # Equilateral triangle, apex up, centroid at the origin, circumradius R: the apex is at
    # dy = -R, the base at dy = +R/2, and each side slopes so |dx| <= (dy + R) / sqrt(3).
    circumradius = TRIANGLE_CIRCUMRADIUS * radius
    return (dy <= circumradius / 2) & (np.abs(dx) * np.sqrt(3) <= dy + circumradius)


def render_masks(
    attributes: list[ShapeAttributes],
    size: int = 32,
    rng: np.random.Generator | None = None,
    progress: bool | None = False,
) -> np.ndarray:
    """Where each shape is: (N, size, size) float32, the fraction of each pixel the shape covers, in [0, 1].

    The masks of the images `render_batch` draws with the same arguments (the same `rng` state gives the
    same jitter): render_batch is this coverage times the colour. Without `rng`, each shape sits on its
    nominal anchor at its nominal radius, which is where a model prompted with its caption should draw it;
    `masks > 0.5` is then the inside of the shape, e.g. to measure how much attention a word pays inside it.
    Raises ValueError for a size below MIN_IMAGE_SIZE.
    """
    if not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"size must be an integer of at least {MIN_IMAGE_SIZE} pixels, got {size!r}")
    n_images = len(attributes)
    anchors = np.array([POSITION_ANCHORS[a.position] for a in attributes], dtype=np.float64).reshape(-1, 2)
    radii = np.array([SIZE_RADII[a.size] for a in attributes], dtype=np.float64)
    shapes = np.array([a.shape for a in attributes])
    if rng is not None:
        anchors = anchors + rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=(n_images, 2))
        radii = radii * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, size=n_images)

    fine = size * SUPERSAMPLE
    grid = (np.arange(fine) + 0.5) / fine  # centres of the fine samples, as fractions of the side
    masks = np.empty((n_images, size, size), dtype=np.float32)
    chunk = 256  # images per step: 256 x 128 x 128 fine samples at 32 px is about 16 MB of float32
    starts = range(0, n_images, chunk)
    bar = tqdm(starts, desc="rendering shapes", disable=progress is False, delay=0 if progress else 1.0)
    for start in bar:
        stop = min(start + chunk, n_images)
        dx = grid[None, None, :] - anchors[start:stop, 0, None, None]  # (n, 1, fine)
        dy = grid[None, :, None] - anchors[start:stop, 1, None, None]  # (n, fine, 1)
        radius = radii[start:stop, None, None]  # (n, 1, 1)
        inside = np.zeros((stop - start, fine, fine), dtype=np.float32)
        for shape in SHAPES:
            which = shapes[start:stop] == shape
            if which.any():
                inside[which] = _shape_masks(shape, dx[which], dy[which], radius[which])
        # (n, fine, fine) -> (n, size, SUPERSAMPLE, size, SUPERSAMPLE) -> (n, size, size)
        masks[start:stop] = inside.reshape(-1, size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(2, 4))
    return masks


def render_batch(
    attributes: list[ShapeAttributes],
    size: int = 32,
    rng: np.random.Generator | None = None,
    progress: bool | None = False,
) -> np.ndarray:
    """Draw many images at once: (N, size, size, 3) float32 in [0, 1]. `size` is the side in pixels.

    With `rng` each shape is jittered (position +- POSITION_JITTER, radius x 1 +- SIZE_JITTER)
    deterministically; without it every shape sits exactly on its anchor at its nominal radius.
    Each image is its `render_masks` coverage times its colour, on black.
    progress: True shows a bar, None shows one only if drawing takes more than a second.
    """
    coverage = render_masks(attributes, size, rng, progress)  # (N, size, size)
    colors = np.array([COLORS[a.color] for a in attributes], dtype=np.float32).reshape(-1, 3)
    return coverage[..., None] * colors[:, None, None, :]  # (N, size, size, 3)


def render(attributes: ShapeAttributes, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """One image (size, size, 3) float32 in [0, 1]: a black background and one anti-aliased shape."""
    return render_batch([attributes], size=size, rng=rng)[0]


# ----------------------------------------------------------------------------------------------
# Dataset


class ShapesDataset(torch.utils.data.Dataset):
    """Captioned shape images, all drawn up front (10000 at 32 px take one to two seconds).

    images:     float32 tensor (N, 3, size, size) in [-1, 1], the diffusion model's convention
    captions:   N strings, each in a random one of CAPTION_TEMPLATES
    attributes: N ShapeAttributes
    Everything follows from `seed`; split is "train" (no HELD_OUT), "heldout" (only those) or "all".
    """

    def __init__(
        self,
        size: int = 32,
        length: int = 10000,
        seed: int = 0,
        split: str = "train",
        progress: bool | None = None,
    ):
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        combinations = split_combinations(split)
        self.size, self.split, self.seed = size, split, seed
        rng = np.random.default_rng(seed)
        which = rng.integers(len(combinations), size=length)
        templates = rng.integers(len(CAPTION_TEMPLATES), size=length)
        self.attributes = [combinations[i] for i in which]
        self.captions = [caption(a, int(t)) for a, t in zip(self.attributes, templates)]
        pixels = render_batch(self.attributes, size=size, rng=rng, progress=progress)  # (N, H, W, 3) in [0, 1]
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
        self.images = (images * 2 - 1).contiguous()  # [0, 1] -> [-1, 1]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """(image (3, size, size) in [-1, 1], caption)."""
        return self.images[index], self.captions[index]
