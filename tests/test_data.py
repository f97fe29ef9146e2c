"""Tests for minildm/data.py: captions made from labels (with the MNIST and Fashion-MNIST templates) and
LabeledImages.caption."""

import pytest
import torch

from minildm.data import LabeledImages, make_captions
from minildm.mnist import (
    FASHION_MNIST_CLASS_NAMES,
    FASHION_MNIST_PHRASES,
    FASHION_MNIST_TEMPLATES,
    MNIST_CLASS_NAMES,
    MNIST_PHRASES,
    MNIST_TEMPLATES,
)


def test_caption_templates():
    labels = torch.arange(10).repeat(30)
    for templates in (MNIST_TEMPLATES, FASHION_MNIST_TEMPLATES):
        assert all("{name}" in t for t in templates)
    captions = make_captions(labels, MNIST_TEMPLATES, MNIST_PHRASES, seed=0)
    assert captions == make_captions(labels, MNIST_TEMPLATES, MNIST_PHRASES, seed=0)
    assert captions != make_captions(labels, MNIST_TEMPLATES, MNIST_PHRASES, seed=1)
    assert len(set(captions)) > 10  # several templates are used
    for label in range(10):  # every label has captions, and they name it
        named = [c for c, y in zip(captions, labels) if y == label]
        assert named and all(MNIST_PHRASES[label] in c for c in named)
    ds = LabeledImages(torch.zeros(300, 1, 4, 4), labels, captions, MNIST_CLASS_NAMES, MNIST_TEMPLATES,
                       MNIST_PHRASES)  # fmt: skip
    assert ds.caption(7) == "a handwritten digit seven"
    assert ds.caption(7, template=1) == "the number seven, handwritten"
    fashion = LabeledImages(torch.zeros(0, 1, 4, 4), [], [], FASHION_MNIST_CLASS_NAMES,
                            FASHION_MNIST_TEMPLATES, FASHION_MNIST_PHRASES)  # fmt: skip
    assert fashion.caption(9) == "a photo of an ankle boot" and fashion.caption(0) == "a photo of a t-shirt"
    with pytest.raises(ValueError, match="label"):
        ds.caption(10)
