"""The dataset type every loader returns, and captions made from labels.

Every loader (mnist.py, image_datasets.py) returns a `LabeledImages`: images (N, C, size, size) float32
in [-1, 1] (the value range the autoencoder and the diffusion model use), integer labels (N,), and one
caption per image. Captions are made from the labels with several templates ("a handwritten digit
seven", "the number seven, handwritten", ...) so that the text encoder learns the word that matters, not
one fixed sentence. `cache_root` is the folder where minildm keeps what it downloads or trains once.

Depends on torch only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset


class LabeledImages(Dataset):
    """Images in [-1, 1] with labels and captions; `dataset[i]` is `(image, caption)`.

    images (N, C, H, W) float32, labels (N,) long (-1 where there is no label), captions list of N strings.
    `caption_templates` and `class_phrases` build a caption from a label: template.format(name=phrase).
    """

    def __init__(self, images, labels, captions, class_names, caption_templates=(), class_phrases=()):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if not len(images) == len(labels) == len(captions):
            raise ValueError(f"got {len(images)} images, {len(labels)} labels and {len(captions)} captions")
        self.images = images
        self.labels = labels
        self.captions = list(captions)
        self.class_names = list(class_names)
        self.caption_templates = list(caption_templates)
        self.class_phrases = list(class_phrases)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.captions[i]

    def caption(self, label: int, template: int = 0) -> str:
        """The caption of class `label`; template 0 is the canonical prompt ("a handwritten digit seven")."""
        if not self.caption_templates:
            raise ValueError("this dataset has captions from a column, not from labels: there is no template")
        if not 0 <= label < len(self.class_phrases):
            raise ValueError(f"label must be in [0, {len(self.class_phrases)}), got {label}")
        if not 0 <= template < len(self.caption_templates):
            raise ValueError(f"template must be in [0, {len(self.caption_templates)}), got {template}")
        return self.caption_templates[template].format(name=self.class_phrases[label])

    def __repr__(self) -> str:
        return (
            f"LabeledImages({len(self)} images of shape {tuple(self.images.shape[1:])}, "
            f"{len(self.class_names)} classes)"
        )


def make_captions(labels, templates: list[str], phrases: list[str], seed: int = 0) -> list[str]:
    """One caption per label, each with a template drawn at random; the same seed gives the same captions."""
    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, len(templates), (len(labels),), generator=generator).tolist()
    return [templates[t].format(name=phrases[int(y)]) for t, y in zip(choice, labels)]


def cache_root() -> Path:
    """The minildm cache folder: $MINILDM_CACHE, else ~/.cache/minildm."""
    env = os.environ.get("MINILDM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "minildm"
