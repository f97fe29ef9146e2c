"""Any image dataset the `datasets` library can open, as captioned images.

A folder of images (subfolder names become labels), a .parquet / .csv / .json file, or a Hugging Face
hub name becomes a `LabeledImages` (data.py) of (N, channels, size, size) images in [-1, 1]. Columns
are found from their `datasets` feature types when they are not named; captions come from a text
column, else from the label names ("a photo of a cat").

Depends on numpy, torch, PIL, data.py and the `datasets` library (imported when a dataset is opened).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import LabeledImages, make_captions


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
