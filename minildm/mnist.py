"""MNIST and Fashion-MNIST as captioned images, read from the four original IDX gzip files.

The files are looked for in this order:
  1. the `root` argument,
  2. the folder named by the MINILDM_DATA environment variable,
  3. the cache folder, $MINILDM_CACHE/data or ~/.cache/minildm/data,
each either holding `mnist/` and `fashion_mnist/` subfolders or the four files directly; then
  4. the Hugging Face hub, through `datasets.load_dataset` (needs a network connection).
Local files are checked against the published SHA-256 checksums before they are parsed.

Depends on numpy, torch, data.py (LabeledImages, captions, the cache folder), atomic.py (check_path) and,
for the hub only, the `datasets` library.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import check_path
from .data import LabeledImages, cache_root, make_captions

MNIST_CLASS_NAMES = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
MNIST_PHRASES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MNIST_TEMPLATES = [
    "a handwritten digit {name}",  # template 0 is the canonical prompt
    "the number {name}, handwritten",
    "a handwritten {name}",
    "the digit {name} written by hand",
    "a black and white image of the digit {name}",
    "a scan of a handwritten {name}",
]

FASHION_MNIST_CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_PHRASES = [
    "a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
    "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot",
]  # fmt: skip
FASHION_MNIST_TEMPLATES = [
    "a photo of {name}",
    "a picture of {name}",
    "a small grayscale photo of {name}",
    "{name} on a black background",
    "a product photo of {name}",
    "a low resolution photo of {name}",
]

# SHA-256 of the original files (MNIST: yann.lecun.com/exdb/mnist; Fashion-MNIST: zalandoresearch).
# They are written here because a user's copy of the data comes without a README to read them from.
IDX_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}
HUB_IDS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist"}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or not) into a numpy array.

    Layout: magic number [0, 0, type code, ndim], then ndim sizes as big-endian uint32, then the data,
    big-endian, in C order.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic number
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: its magic number is {raw[:4].hex() or 'missing'}")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape}, i.e. {expected} bytes, but the file has {len(raw)}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: Path, dataset: str) -> None:
    expected, found = IDX_SHA256[dataset][path.name], sha256_of(path)
    if found == expected:
        return
    hint = "the file may be truncated or corrupted: download it again"
    for other, files in IDX_SHA256.items():  # the two datasets use the same file names
        if found in files.values():
            hint = f"this is the {other} file, not the {dataset} one"
    raise ValueError(f"checksum mismatch for {path}: expected sha256 {expected}, found {found} ({hint})")


def _idx_folder(dataset: str, split: str, root: str | os.PathLike | None) -> tuple[Path | None, list[str]]:
    """The first folder that holds the split's two files, and a description of every place looked in."""
    names = [f"{SPLIT_PREFIX[split]}-{kind}-idx{d}-ubyte.gz" for kind, d in (("images", 3), ("labels", 1))]
    places = []
    if root is not None:
        places.append(("the root argument", Path(root)))
    if os.environ.get("MINILDM_DATA"):
        places.append(("$MINILDM_DATA", Path(os.environ["MINILDM_DATA"])))
    places.append(("the cache", cache_root() / "data"))
    looked = []
    for source, base in places:
        for folder in (base / dataset, base):
            present = [name for name in names if (folder / name).is_file()]
            if len(present) == len(names):
                return folder, looked
            if present:  # half a dataset is a broken copy, not an absent one: say so now
                missing = sorted(set(names) - set(present))
                raise FileNotFoundError(f"{folder} ({source}) has {present} but is missing {missing}")
            looked.append(f"{folder} ({source}): no {names[0]} or {names[1]}")
        if source == "the root argument":  # an explicit root must hold the data; no silent fallback
            raise FileNotFoundError(f"no {dataset} {split} files in {base} or {base / dataset}: expected {names}")
    return None, looked


def _read_idx_split(folder: Path, dataset: str, split: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for kind in tqdm(("images", "labels"), desc=f"{dataset} {split}", disable=not progress, leave=False):
        path = folder / f"{SPLIT_PREFIX[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        verify_checksum(path, dataset)
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def _read_hub_split(dataset: str, split: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    import datasets  # imported here: only the hub path needs it

    hub = datasets.load_dataset(HUB_IDS[dataset], split=split)
    images = [np.asarray(im, dtype=np.uint8) for im in tqdm(hub["image"], desc=dataset, disable=not progress)]
    return np.stack(images), np.array(list(hub["label"]), dtype=np.uint8)


def _load_idx_dataset(dataset, split, root, size, progress, seed, class_names, phrases, templates):
    if not isinstance(split, str) or split not in SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is not None:
        root = check_path(root, "root")
    if size not in (28, 32):
        raise ValueError(f"size must be 28 (original) or 32 (zero-padded), got {size}")
    folder, looked = _idx_folder(dataset, split, root)
    if folder is not None:
        images, labels = _read_idx_split(folder, dataset, split, progress)
    else:
        try:
            images, labels = _read_hub_split(dataset, split, progress)
        except Exception as e:
            where = "\n  ".join(looked + [f"the Hugging Face hub ({HUB_IDS[dataset]}): {type(e).__name__}: {e}"])
            raise FileNotFoundError(
                f"could not find {dataset} ({split}). Looked in:\n  {where}\n"
                f"Put the four original IDX gzip files ({', '.join(IDX_SHA256[dataset])}) in a folder and "
                f"pass root=that_folder, or set MINILDM_DATA to a folder that holds {dataset}/, "
                f"or connect to the internet."
            ) from e
    x = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    if size == 32:
        # Power-of-two sides halve cleanly through f=2, 4, 8 autoencoders and UNet levels (32 -> 16 -> 8 -> 4);
        # the pad value -1 is the black background, so nothing visible changes.
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # (N, 1, 28, 28) -> (N, 1, 32, 32)
    y = torch.from_numpy(labels.astype(np.int64))
    captions = make_captions(y, templates, phrases, seed)
    return LabeledImages(x, y, captions, class_names, templates, phrases)


def load_mnist(split="train", root=None, size=28, progress=True, seed=0) -> LabeledImages:
    """MNIST digits as (N, 1, size, size) images in [-1, 1], captions like "a handwritten digit seven"."""
    return _load_idx_dataset(
        "mnist", split, root, size, progress, seed, MNIST_CLASS_NAMES, MNIST_PHRASES, MNIST_TEMPLATES
    )


def load_fashion_mnist(split="train", root=None, size=28, progress=True, seed=0) -> LabeledImages:
    """Fashion-MNIST as (N, 1, size, size) images in [-1, 1], captions like "a photo of an ankle boot"."""
    return _load_idx_dataset(
        "fashion_mnist", split, root, size, progress, seed,
        FASHION_MNIST_CLASS_NAMES, FASHION_MNIST_PHRASES, FASHION_MNIST_TEMPLATES,
    )  # fmt: skip
