"""Tests for minildm/image_datasets.py: load_image_dataset on a folder of images, a parquet file with
captions, and its argument errors."""

from pathlib import Path

import pytest
import torch

from minildm.image_datasets import load_image_dataset


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """No test writes to the user's Hugging Face `datasets` cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def write_images(folder: Path, names_and_colors) -> None:
    from PIL import Image

    for i, (cls, color) in enumerate(names_and_colors):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 12), color).save(folder / cls / f"{i}.png")


def test_load_image_folder(tmp_path):
    write_images(tmp_path / "pictures", [("cat", (255, 0, 0)), ("cat", (255, 0, 0)), ("apple", (0, 0, 255))])
    ds = load_image_dataset(tmp_path / "pictures", size=8, progress=False)
    assert ds.images.shape == (3, 3, 8, 8) and ds.class_names == ["apple", "cat"]
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    for image, label, caption in zip(ds.images, ds.labels, ds.captions):
        if label == 1:  # pure red -> channel values [1, -1, -1]
            assert caption == "a photo of a cat"
            torch.testing.assert_close(image[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
        else:
            assert caption == "a photo of an apple"
    gray = load_image_dataset(tmp_path / "pictures", size=4, channels=1, max_items=2, progress=False)
    assert gray.images.shape == (2, 1, 4, 4)


def test_load_parquet_with_captions(tmp_path):
    import datasets
    from PIL import Image

    pictures = [Image.new("L", (10, 10), value) for value in (0, 128, 255)]
    table = datasets.Dataset.from_dict(
        {"picture": pictures, "text": ["dark", "mid", "light"]},
        features=datasets.Features({"picture": datasets.Image(), "text": datasets.Value("string")}),
    )
    table.to_parquet(str(tmp_path / "tiny.parquet"))
    ds = load_image_dataset(tmp_path / "tiny.parquet", size=4, channels=1, progress=False)
    assert ds.captions == ["dark", "mid", "light"] and ds.labels.tolist() == [-1, -1, -1]
    torch.testing.assert_close(ds.images[:, 0, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    with pytest.raises(ValueError, match="no caption column 'caption'"):
        load_image_dataset(tmp_path / "tiny.parquet", caption_column="caption", progress=False)


def test_load_image_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        load_image_dataset(tmp_path, channels=4)
    (tmp_path / "table.txt").write_text("hello")
    with pytest.raises(ValueError, match="parquet"):
        load_image_dataset(tmp_path / "table.txt")
