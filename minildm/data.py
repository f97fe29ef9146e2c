"""Real datasets as captioned images: MNIST, Fashion-MNIST, and anything `datasets` can open.

Every loader returns a `LabeledImages`: images (N, C, size, size) float32 in [-1, 1] (the value range
the autoencoder and the diffusion model use), integer labels (N,), and one caption per image. Captions
are made from the labels with several templates ("a handwritten digit seven", "the number seven,
handwritten", ...) so that the text encoder learns the word that matters, not one fixed sentence.

MNIST and Fashion-MNIST are read from the four original IDX gzip files, looked for in this order:
  1. the `root` argument,
  2. the folder named by the MINILDM_DATA environment variable,
  3. the cache folder, $MINILDM_CACHE/data or ~/.cache/minildm/data,
each either holding `mnist/` and `fashion_mnist/` subfolders or the four files directly; then
  4. the Hugging Face hub, through `datasets.load_dataset` (needs a network connection).
Local files are checked against the published SHA-256 checksums before they are parsed.

Depends on numpy, torch, PIL and (for the hub and other datasets) the `datasets` library.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .atomic import check_path

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


# ----------------------------------------------------------------------------------------------------
# IDX files


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


def cache_root() -> Path:
    """The minildm cache folder: $MINILDM_CACHE, else ~/.cache/minildm."""
    env = os.environ.get("MINILDM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "minildm"


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
    import datasets  # imported here: only the hub path and load_image_dataset need it

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


# ----------------------------------------------------------------------------------------------------
# Anything `datasets` can open


def _open_with_datasets(name_or_path: str | os.PathLike, split: str):
    import datasets

    path = Path(name_or_path)
    builders = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
    if path.is_dir():
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    if path.is_file():
        if path.suffix not in builders:
            raise ValueError(f"cannot open {path}: expected a folder of images or one of {sorted(builders)}")
        return datasets.load_dataset(builders[path.suffix], data_files={split: str(path)}, split=split)
    try:
        return datasets.load_dataset(str(name_or_path), split=split)
    except Exception as e:
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local folder or file, and loading it from the Hugging Face hub "
            f"failed ({type(e).__name__}: {e})"
        ) from e


def _choose_columns(ds, image_column, caption_column, label_column) -> tuple[str, str | None, str | None]:
    """Check the columns that were named; find the others from their `datasets` feature type."""
    import datasets

    for kind, column in (("image", image_column), ("caption", caption_column), ("label", label_column)):
        if column is not None and column not in ds.column_names:
            raise ValueError(f"no {kind} column {column!r}; the columns are {ds.column_names}")
    features = ds.features
    if image_column is None:
        found = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        # A parquet file written without `datasets` metadata stores images as {bytes, path}: go by name.
        found += [name for name in ("image", "img", "images", "pixel_values") if name in features]
        if not found:
            raise ValueError(f"found no image column in {ds.column_names}; pass image_column=")
        image_column = found[0]
    if caption_column is None:
        text = [name for name in ("caption", "text", "prompt") if name in features]
        caption_column = next((name for name in text if getattr(features[name], "dtype", None) == "string"), None)
    if label_column is None:
        labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
        label_column = labels[0] if labels else None
    return image_column, caption_column, label_column


def _to_pil(value):
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:  # an image column saved without metadata
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    if isinstance(value, str):  # a path, e.g. in a csv file
        return Image.open(value)
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


def _to_tensor(image, size: int, channels: int) -> torch.Tensor:
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = min(w, h)  # centre crop to a square, so that resizing does not squash the picture
    image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    # PIL's bicubic filter widens with the scale factor when shrinking, i.e. it averages the area.
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32).reshape(size, size, channels)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)  # (H, W, C) -> (C, H, W)


def _with_article(name: str) -> str:
    name = name.replace("_", " ")
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def load_image_dataset(
    name_or_path,
    split="train",
    image_column=None,
    caption_column=None,
    label_column=None,
    size=32,
    channels=3,
    max_items=None,
    progress=True,
) -> LabeledImages:
    """Any image dataset `datasets` can open, as a LabeledImages of (N, channels, size, size) in [-1, 1].

    `name_or_path`: a folder of images (subfolder names become labels), a .parquet/.csv/.json file, or a
    Hugging Face hub name. Columns are found when not given: images from an `Image` feature, captions
    from a text column named caption/text/prompt, labels from a `ClassLabel` feature. Captions come from
    the caption column, else from the label names ("a photo of a cat"); with neither, every caption is
    "" (the unconditional prompt) and every label -1. Images are centre-cropped to a square and resized.
    `max_items` keeps the first items only.
    """
    import datasets

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    ds = _open_with_datasets(name_or_path, split)
    if max_items is not None:
        ds = ds.select(range(min(max_items, len(ds))))
    image_column, caption_column, label_column = _choose_columns(ds, image_column, caption_column, label_column)

    images = torch.empty(len(ds), channels, size, size)
    for i, value in enumerate(tqdm(ds[image_column], desc="images", disable=not progress)):
        images[i] = _to_tensor(_to_pil(value), size, channels)

    labels = torch.full((len(ds),), -1, dtype=torch.long)
    class_names, templates, phrases = [], [], []
    if label_column is not None:
        feature = ds.features[label_column]
        labels = torch.tensor(list(ds[label_column]), dtype=torch.long)
        if isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        else:  # plain integers: the names are the numbers
            class_names = [str(k) for k in range(int(labels.max()) + 1)] if len(labels) else []
        templates, phrases = ["a photo of {name}"], [_with_article(name) for name in class_names]
    if caption_column is not None:
        captions = [str(c) for c in ds[caption_column]]
    elif label_column is not None:
        captions = make_captions(labels, templates, phrases)
    else:
        captions = [""] * len(ds)
    return LabeledImages(images, labels, captions, class_names, templates, phrases)
