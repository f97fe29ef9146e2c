"""Reading a generated ShapesDataset image back into its attributes, to score text-to-image samples.

"Does the image for 'a large red circle at the top left' really show a large red circle at the top
left?" Three of the four attributes are measured directly on the foreground pixels (those clearly
brighter than the black background); only the shape needs a learned model:

    colour    mean RGB of the foreground, scaled so its brightest channel is 1, nearest colour of
              the palette (shapes.COLORS) scaled the same way
    position  centroid of the foreground, nearest anchor (shapes.POSITION_ANCHORS)
    size      foreground area as a fraction of the image, against a threshold calibrated on the
              dataset halfway (geometrically) between the largest "small" and the smallest "large"
    shape     a SmallClassifier trained on dataset images, some of them blurred and noisy so that it
              stays right on the slightly soft images a diffusion model produces

Images are (B, 3, H, W) float in [0, 1], what `generate()` returns. The dataset stores [-1, 1]:
map it with (x + 1) / 2 first. An image with no foreground reads as None (every attribute wrong).

Depends on shapes.py and classifier.py only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .atomic import atomic_write_json, read_json
from .checks import check_images
from .classifier import ClassifierConfig, SmallClassifier, train_classifier
from .shapes import COLORS, POSITION_ANCHORS, SHAPES, ShapeAttributes, ShapesDataset

# A pixel is foreground when its brightest channel passes 0.3: every palette colour has a channel
# near 1, the background is 0, and a third of the way up leaves room for blur and noise either side.
FOREGROUND_THRESHOLD = 0.3
# Generated samples may overshoot [0, 1] a little; anything further out is the wrong convention.
RANGE_TOLERANCE = 0.1
# Bump when the rendering or the checker changes, so that cached checkers are retrained.
CHECKER_VERSION = 2
ATTRIBUTE_NAMES = ("color", "shape", "size", "position")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (B, C, H, W) with a Gaussian of standard deviation `sigma` pixels (0 returns the input)."""
    if sigma <= 0:
        return images
    radius = max(1, round(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    # Separable: blur the rows, then the columns, each channel on its own (groups=channels).
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)  # (C, 1, 1, 2r+1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)  # (C, 1, 2r+1, 1)
    padded = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    images = F.conv2d(padded, horizontal, groups=channels)
    padded = F.pad(images, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(padded, vertical, groups=channels)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mild blur, brightness change and noise per image (B, 3, H, W) in [0, 1], like a soft
    generated sample. Blur sigmas come from a few levels so that each level is one batched convolution."""
    sigma_levels = (0.0, 0.4, 0.8, 1.2)  # pixels
    level = torch.randint(len(sigma_levels), (len(images),), generator=generator)  # (B,)
    out = torch.empty_like(images)
    for i, sigma in enumerate(sigma_levels):
        out[level == i] = gaussian_blur(images[level == i], sigma)
    brightness = 0.75 + 0.35 * torch.rand(len(images), 1, 1, 1, generator=generator)  # [0.75, 1.1]
    noise_std = 0.05 * torch.rand(len(images), 1, 1, 1, generator=generator)
    noise = torch.randn(images.shape, generator=generator) * noise_std
    return (out * brightness + noise).clamp(0, 1)


class ShapesChecker:
    """Reads colour, shape, size and position back from images (B, 3, H, W) in [0, 1]."""

    def __init__(self, classifier: SmallClassifier, image_size: int, size_threshold: float):
        self.classifier = classifier.eval()
        self.image_size = image_size
        self.size_threshold = size_threshold  # foreground area / image area between small and large
        self.palette = torch.tensor(list(COLORS.values()))  # (num_colors, 3)
        self.anchors = torch.tensor(list(POSITION_ANCHORS.values()))  # (num_positions, 2) as (x, y)

    # ------------------------------------------------------------------------------------------
    # Reading

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, "images", 3)  # a float tensor (B, 3, H, W), in [0, 1]
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (B, 3, {self.image_size}, {self.image_size}) for this checker "
                             f"(trained at {self.image_size} px), got {tuple(images.shape)}")
        images = images.detach().float().cpu()
        if len(images) == 0:
            return images
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        low, high = images.min().item(), images.max().item()
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"expected images in [0, 1], got values from {low:.2f} to {high:.2f}; images in [-1, 1] "
                "(the dataset's and the model's convention) must be mapped with (x + 1) / 2 first"
            )
        return images.clamp(0, 1)

    def measure(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The raw measurements of images (B, 3, H, W) in [0, 1], before they become attribute names.

        Returns area (B,) foreground fraction of the image, color (B, 3) mean foreground RGB,
        centroid (B, 2) as (x, y) fractions of the side, shape (B,) index into SHAPES.
        """
        images = self._check_images(images)
        height, width = images.shape[2:]
        foreground = (images.amax(dim=1) > FOREGROUND_THRESHOLD).float()  # (B, H, W)
        count = foreground.sum(dim=(1, 2))  # (B,)
        per_pixel = count.clamp(min=1)  # a blank image gives zeros, not NaN, and is caught in read()
        color = (images * foreground[:, None]).sum(dim=(2, 3)) / per_pixel[:, None]  # (B, 3)
        ys = (torch.arange(height) + 0.5) / height  # pixel centres as fractions of the side
        xs = (torch.arange(width) + 0.5) / width
        centroid_x = (foreground * xs[None, None, :]).sum(dim=(1, 2)) / per_pixel  # (B,)
        centroid_y = (foreground * ys[None, :, None]).sum(dim=(1, 2)) / per_pixel  # (B,)
        device = next(self.classifier.parameters()).device
        shape = self.classifier.predict(images.to(device)).cpu()  # (B,)
        return {
            "area": count / (height * width),
            "color": color,
            "centroid": torch.stack([centroid_x, centroid_y], dim=1),  # (B, 2)
            "shape": shape,
        }

    def read(self, images: torch.Tensor) -> list[ShapeAttributes | None]:
        """The attributes each image (B, 3, H, W) in [0, 1] shows; None where there is no foreground."""
        measured = self.measure(images)
        # Compare hues, not brightness: a blurred shape's edge pixels pull its mean colour towards
        # black, which would otherwise make a dim yellow look closer to red than to yellow.
        hue = measured["color"] / measured["color"].amax(dim=1, keepdim=True).clamp(min=1e-6)  # (B, 3)
        palette_hue = self.palette / self.palette.amax(dim=1, keepdim=True)  # (num_colors, 3)
        color_index = torch.cdist(hue, palette_hue).argmin(dim=1)  # (B,)
        position_index = torch.cdist(measured["centroid"], self.anchors).argmin(dim=1)  # (B,)
        color_names, position_names = list(COLORS), list(POSITION_ANCHORS)
        readings: list[ShapeAttributes | None] = []
        for area, color, shape, position in zip(
            measured["area"].tolist(), color_index.tolist(), measured["shape"].tolist(), position_index.tolist()
        ):
            if area == 0:
                readings.append(None)
                continue
            readings.append(
                ShapeAttributes(
                    color=color_names[color],
                    shape=SHAPES[shape],
                    size="large" if area > self.size_threshold else "small",
                    position=position_names[position],
                )
            )
        return readings

    def score(self, images: torch.Tensor, attributes: Sequence[ShapeAttributes]) -> dict[str, float]:
        """Fraction of images (B, 3, H, W) in [0, 1] whose colour, shape, size, position (and "all") match."""
        if len(images) != len(attributes):
            raise ValueError(f"got {len(images)} images but {len(attributes)} attributes")
        if len(attributes) == 0:
            raise ValueError("cannot score an empty batch")
        readings = self.read(images)
        correct = {name: 0 for name in (*ATTRIBUTE_NAMES, "all")}
        for reading, wanted in zip(readings, attributes):
            if reading is None:  # a blank image is wrong in every attribute
                continue
            matches = [getattr(reading, name) == getattr(wanted, name) for name in ATTRIBUTE_NAMES]
            for name, match in zip(ATTRIBUTE_NAMES, matches):
                correct[name] += match
            correct["all"] += all(matches)
        return {name: count / len(attributes) for name, count in correct.items()}

    # ------------------------------------------------------------------------------------------
    # Training, saving, caching

    @classmethod
    def train(
        cls,
        size: int = 32,
        steps: int = 400,
        num_images: int = 3000,
        seed: int = 0,
        progress: bool = True,
    ) -> ShapesChecker:
        """Calibrate the size threshold and train the shape classifier on a fresh "all" ShapesDataset.

        The classifier sees every image twice, once clean and once degraded (blur, brightness, noise),
        in [0, 1]. About 15 s at 32 px on two CPU cores.
        """
        dataset = ShapesDataset(
            size=size, length=num_images, seed=seed, split="all", progress=None if progress else False
        )
        images = (dataset.images + 1) / 2  # [-1, 1] -> [0, 1], the range the checker reads
        labels = torch.tensor([SHAPES.index(a.shape) for a in dataset.attributes])  # (N,)
        degraded = degrade(images, torch.Generator().manual_seed(seed))

        # width 16 rather than the default 32: three shapes need little capacity, and it trains 3x faster.
        config = ClassifierConfig(in_channels=3, num_classes=len(SHAPES), width=16, class_names=list(SHAPES))
        torch.manual_seed(seed)  # the classifier's initial weights
        classifier = SmallClassifier(config)
        train_classifier(
            classifier,
            torch.cat([images, degraded]),
            torch.cat([labels, labels]),
            steps=steps,
            batch_size=32,
            seed=seed,
            progress=progress,
        )

        # Size threshold: the clean "small" and "large" areas must not overlap; put the threshold at
        # their geometric mean so that a sample may be off by the same factor either way.
        checker = cls(classifier, image_size=size, size_threshold=0.0)
        area = checker.measure(images)["area"]  # (N,)
        is_large = torch.tensor([a.size == "large" for a in dataset.attributes])
        largest_small, smallest_large = area[~is_large].max().item(), area[is_large].min().item()
        if largest_small >= smallest_large:
            raise RuntimeError(
                f"small and large shapes overlap in area at {size} px (largest small {largest_small:.4f}, "
                f"smallest large {smallest_large:.4f}); the geometry in shapes.py is broken"
            )
        checker.size_threshold = (largest_small * smallest_large) ** 0.5
        return checker

    def save(self, directory: str | os.PathLike) -> None:
        """Classifier weights (safetensors) and config (JSON), plus checker.json with the threshold."""
        directory = Path(directory)
        self.classifier.save(directory)
        atomic_write_json(
            directory / "checker.json",
            {"version": CHECKER_VERSION, "image_size": self.image_size, "size_threshold": self.size_threshold},
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ShapesChecker:
        directory = Path(directory)
        settings = read_json(directory / "checker.json")
        if settings.get("version") != CHECKER_VERSION:
            raise ValueError(
                f"{directory} holds a checker of version {settings.get('version')}, but this code reads "
                f"version {CHECKER_VERSION}; train a new one with ShapesChecker.train()"
            )
        classifier = SmallClassifier.load(directory)
        return cls(classifier, image_size=settings["image_size"], size_threshold=settings["size_threshold"])

    @classmethod
    def cached(cls, size: int = 32, cache_dir: str | os.PathLike | None = None) -> ShapesChecker:
        """Load the checker for `size` px from the cache, training and saving it first if it is absent.

        The cache is `cache_dir`, else $MINILDM_CACHE, else ~/.cache/minildm.
        """
        if cache_dir is None:
            cache_dir = os.environ.get("MINILDM_CACHE") or Path.home() / ".cache" / "minildm"
        directory = Path(cache_dir) / f"shapes_checker_v{CHECKER_VERSION}_{size}px"
        if (directory / "checker.json").is_file():
            return cls.load(directory)
        start = time.perf_counter()
        checker = cls.train(size=size, progress=True)
        checker.save(directory)
        print(f"trained the shapes checker in {time.perf_counter() - start:.0f} s, saved to {directory}")
        return checker
