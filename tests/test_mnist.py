"""Tests for minildm/mnist.py: IDX parsing, checksums, where files are looked for, the hub fallback, the
real MNIST / Fashion-MNIST files when they are present."""

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from minildm import mnist
from minildm.mnist import load_fashion_mnist, load_mnist, read_idx

READ_HUB_SPLIT = mnist._read_hub_split  # kept before the fixture below replaces it

# The tests may know the repository layout (the package may not): /work/main/tests -> /work/shared/data.
DATA_ROOT = Path(os.environ.get("MINILDM_DATA") or Path(__file__).parents[1].parent / "shared" / "data")
needs_real_data = pytest.mark.skipif(
    not (DATA_ROOT / "mnist").is_dir() or not (DATA_ROOT / "fashion_mnist").is_dir(),
    reason=f"the original MNIST / Fashion-MNIST IDX files are not in {DATA_ROOT} (set MINILDM_DATA)",
)
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def isolated_places(tmp_path, monkeypatch):
    """No test sees the user's MINILDM_DATA or cache, writes to ~/.cache, or reaches the Hugging Face hub."""
    import datasets

    monkeypatch.delenv("MINILDM_DATA", raising=False)
    monkeypatch.setenv("MINILDM_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")

    def offline_hub(dataset, split, progress):
        raise ConnectionError("offline in tests")

    monkeypatch.setattr(mnist, "_read_hub_split", offline_hub)


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool = True) -> None:
    """Write an IDX file by hand: magic [0, 0, type code, ndim], big-endian uint32 sizes, big-endian data."""
    big_endian = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(big_endian).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fake_split(folder: Path, n: int = 5, prefix: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 0x08)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08)
    return images, labels


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("code, dtype", [(0x08, np.uint8), (0x0B, np.int16), (0x0D, np.float32)])
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_synthetic(tmp_path, code, dtype, compress):
    array = (np.arange(2 * 3 * 4) * 7 - 20).reshape(2, 3, 4)
    array = (array % 256).astype(dtype) if dtype == np.uint8 else array.astype(dtype)
    write_idx(tmp_path / "x.idx", array, code, compress)
    parsed = read_idx(tmp_path / "x.idx")
    assert parsed.shape == (2, 3, 4) and parsed.dtype == dtype
    np.testing.assert_array_equal(parsed, array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "not_idx").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "not_idx")
    write_idx(tmp_path / "short", np.zeros((3, 4), np.uint8), 0x08, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="shape"):
        read_idx(tmp_path / "short")


@needs_real_data
@pytest.mark.parametrize("split, counts", [("train", MNIST_TRAIN_COUNTS), ("test", MNIST_TEST_COUNTS)])
def test_mnist_from_real_files(split, counts):
    ds = load_mnist(split, root=DATA_ROOT, progress=False)
    assert ds.images.shape == (sum(counts), 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.long and ds.labels.bincount().tolist() == counts
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert len(ds.captions) == len(ds) and ds.class_names[7] == "7"
    image, caption = ds[0]
    assert image.shape == (1, 28, 28) and isinstance(caption, str)


@needs_real_data
def test_padding_to_32_is_background():
    small = load_mnist("test", root=DATA_ROOT, size=28, progress=False)
    padded = load_mnist("test", root=DATA_ROOT, size=32, progress=False)
    assert padded.images.shape == (10000, 1, 32, 32)
    torch.testing.assert_close(padded.images[:, :, 2:30, 2:30], small.images)
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = -1.0
    assert (border == -1.0).all()  # every pad pixel is the black background


@needs_real_data
def test_fashion_mnist_from_real_files():
    ds = load_fashion_mnist("test", root=DATA_ROOT, size=32, progress=False)
    assert ds.images.shape == (10000, 1, 32, 32)
    assert ds.labels.bincount().tolist() == [1000] * 10
    assert ds.class_names[9] == "Ankle boot" and ds.caption(9) == "a photo of an ankle boot"


@needs_real_data
def test_environment_variable_is_a_place(monkeypatch):
    monkeypatch.setenv("MINILDM_DATA", str(DATA_ROOT))
    assert len(load_mnist("test", progress=False)) == 10000


# ---------------------------------------------------------------------------------- errors that teach


def test_files_directly_in_root(tmp_path):
    # Checksums are per dataset, so a fake file only passes if we pretend it is the original.
    images, labels = write_fake_split(tmp_path)
    fake = {name: mnist.sha256_of(tmp_path / name) for name in os.listdir(tmp_path)}
    original = mnist.IDX_SHA256["mnist"]
    mnist.IDX_SHA256["mnist"] = {**original, **fake}
    try:
        ds = load_mnist("test", root=tmp_path, size=32, progress=False)
    finally:
        mnist.IDX_SHA256["mnist"] = original
    assert ds.images.shape == (5, 1, 32, 32)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    torch.testing.assert_close(ds.images[:, 0, 2:30, 2:30], torch.from_numpy(images).float() / 127.5 - 1)


def test_checksum_mismatch_names_file(tmp_path):
    write_fake_split(tmp_path / "mnist")
    with pytest.raises(ValueError, match=r"checksum mismatch for .*t10k-images-idx3-ubyte\.gz: expected sha256 8d42"):
        load_mnist("test", root=tmp_path, progress=False)


@needs_real_data
def test_corrupted_copy_and_wrong_dataset(tmp_path):
    (tmp_path / "mnist").mkdir()
    shutil.copy(DATA_ROOT / "mnist" / "t10k-images-idx3-ubyte.gz", tmp_path / "mnist")
    shutil.copy(DATA_ROOT / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path / "mnist")
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    corrupted = bytearray(path.read_bytes())
    corrupted[1000] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*corrupted"):
        load_mnist("test", root=tmp_path, progress=False)
    shutil.copy(DATA_ROOT / "mnist" / "t10k-images-idx3-ubyte.gz", tmp_path / "mnist")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*fashion_mnist file, not the mnist one"):
        load_mnist("test", root=tmp_path, progress=False)


def test_missing_file_is_named(tmp_path):
    write_fake_split(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing \\['t10k-labels-idx1-ubyte.gz'\\]"):
        load_mnist("test", root=tmp_path, progress=False)


def test_empty_root_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist("train", root=tmp_path, progress=False)


def test_nothing_anywhere_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILDM_DATA", str(tmp_path / "my_data"))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist("test", progress=False)
    message = str(info.value)
    assert "$MINILDM_DATA" in message and str(tmp_path / "my_data" / "mnist") in message
    assert str(tmp_path / "empty_cache" / "data") in message
    assert "Hugging Face hub" in message and "offline in tests" in message
    assert "root=" in message


def test_hub_fallback_converts_rows(monkeypatch):
    # Stand in for the hub with a two-row dataset shaped like ylecun/mnist: PIL images and a ClassLabel.
    import datasets
    from PIL import Image

    rows = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (28, 28), 0), Image.new("L", (28, 28), 255)], "label": [3, 9]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )
    asked = []

    def fake_load_dataset(name, split):
        asked.append((name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(mnist, "_read_hub_split", READ_HUB_SPLIT)
    ds = load_mnist("test", size=32, progress=False)
    assert asked == [("ylecun/mnist", "test")]
    assert ds.labels.tolist() == [3, 9] and ds.images.shape == (2, 1, 32, 32)
    assert ds.images[0].max() == -1.0 and ds.images[1, :, 2:30, 2:30].min() == 1.0


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", root=tmp_path)
    with pytest.raises(ValueError, match="size"):
        load_mnist("test", root=tmp_path, size=64)
