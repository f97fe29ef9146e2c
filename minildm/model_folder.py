"""A LatentDiffusion model on disk: one folder, its format versions, and reading every version written so far.

Version 2 (the slots, interfaces.py), which save() writes:

    config.json               {"format": "minildm.LatentDiffusion", "version": 2, "image_size", "prediction_type",
                               "concat_conditioning": {"class", "config"} (only for a model that has one),
                               "schedule": NoiseSchedule's arguments (FlowMatchSchedule's for a
                                   prediction_type of "flow_prediction"),
                               "first_stage" | "backbone" | "conditioner":
                                   {"class": "AutoencoderKL", "config": {...}, "torch_dtype": "float32"}}
    first_stage.safetensors   the weights of each slot, in its dtype (PixelSpace has none: an empty file)
    backbone.safetensors
    conditioner.safetensors   (a TextEncoder's vocabulary is part of its config, a CLIPTextConditioner's
                               tokenizer files too)

Version 1 (minildm 0.1: an autoencoder, a UNet and a word-level text encoder, nothing else):

    config.json               {"format", "version": 1, "image_size", "prediction_type", "schedule",
                               "autoencoder": AutoencoderConfig or null (pixel space), "unet": UNetConfig,
                               "text_encoder": TextEncoderConfig, "tokenizer": {"max_length"}}
    vocab.json, autoencoder.safetensors (not in pixel space), unet.safetensors, text_encoder.safetensors

A version-1 folder is read by mapping it onto version 2's slots; tests/fixtures keeps one of each kind,
and a folder of every later version must keep loading too. The class names a folder may hold are listed
in SLOT_CLASSES, explicitly: nothing is imported by a name read from a file.

Depends on atomic.py, checkpoint.py and the modules that fill the slots.
"""

from __future__ import annotations

import os

import torch

from .atomic import atomic_directory, atomic_write_json, read_json, readable_directory
from .autoencoder import AutoencoderKL
from .checkpoint import load_module_weights, save_weights, stored_dtype
from .class_embedder import ClassEmbedder
from .clip import CLIPTextConditioner
from .concat_conditioning import CONCAT_CONDITIONS
from .dit import DiTTransformer2DModel
from .flow import FlowMatchSchedule
from .pixel_space import PixelSpace
from .schedule import NoiseSchedule
from .text import TextEncoder
from .unet import UNet2DConditionModel
from .vq import VQModel

FORMAT = "minildm.LatentDiffusion"
VERSION = 2
SLOTS = ("first_stage", "backbone", "conditioner")
SLOT_CLASSES = {  # the classes a saved folder may name, per slot; a new slot filler adds itself here
    "first_stage": {"AutoencoderKL": AutoencoderKL, "PixelSpace": PixelSpace, "VQModel": VQModel},
    "backbone": {"UNet2DConditionModel": UNet2DConditionModel, "DiTTransformer2DModel": DiTTransformer2DModel},
    "conditioner": {"TextEncoder": TextEncoder, "ClassEmbedder": ClassEmbedder,
                    "CLIPTextConditioner": CLIPTextConditioner},
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def register(slot: str, cls: type) -> None:
    """Let folders hold `cls` in `slot` ("first_stage", "backbone" or "conditioner"): a slot filler of your own
    can then be saved and loaded. It needs config_dict() and a classmethod from_config_dict(config)."""
    if slot not in SLOT_CLASSES:
        raise ValueError(f"slot must be one of {SLOTS}, got {slot!r}")
    if not isinstance(cls, type) or not callable(getattr(cls, "from_config_dict", None)):
        raise TypeError(f"cls must be a class with a from_config_dict classmethod, got {cls!r}")
    SLOT_CLASSES[slot][cls.__name__] = cls


def _dtype_name(module: torch.nn.Module) -> str | None:
    """The dtype of a module's floating-point weights, as config.json names it (None when it has none)."""
    dtype = stored_dtype(module.state_dict(), f"a {type(module).__name__}")  # ValueError if its weights mix dtypes
    return {dtype: name for name, dtype in DTYPES.items()}[dtype] if dtype is not None else None


def config_of(model) -> dict:
    """The version-2 config.json of a LatentDiffusion `model`. Raises ValueError for a slot filler that the
    format does not know (SLOT_CLASSES) or whose weights mix dtypes."""

    def slot(name: str) -> dict:
        module = getattr(model, name)
        known = SLOT_CLASSES[name]
        if known.get(type(module).__name__) is not type(module):
            raise ValueError(f"cannot save a {type(module).__name__} as the {name}: the folder format knows "
                             f"{', '.join(known)}; minildm.model_folder.register({name!r}, {type(module).__name__}) "
                             f"adds it")
        return {"class": type(module).__name__, "config": module.config_dict(), "torch_dtype": _dtype_name(module)}

    config = {"format": FORMAT, "version": VERSION, "image_size": model.image_size,
              "prediction_type": model.prediction_type, "schedule": model.schedule.config_dict(),
              **{name: slot(name) for name in SLOTS}}
    condition = getattr(model, "concat_conditioning", None)
    if condition is not None:  # written only when set: folders without it load as before
        if CONCAT_CONDITIONS.get(type(condition).__name__) is not type(condition):
            raise ValueError(f"cannot save a {type(condition).__name__} as the concat_conditioning: the folder format "
                             f"knows {', '.join(CONCAT_CONDITIONS)}")
        config["concat_conditioning"] = {"class": type(condition).__name__, "config": condition.config_dict()}
    return config


def save(model, directory: str | os.PathLike) -> None:
    """Write `model` as a version-2 folder, replacing `directory` as a whole (atomic.atomic_directory)."""
    config = config_of(model)  # first, so that a model the format cannot hold fails before anything is written
    with atomic_directory(directory) as folder:
        for name in SLOTS:
            save_weights(getattr(model, name).state_dict(), folder / f"{name}.safetensors")
        atomic_write_json(folder / "config.json", config)


def _slots_of_version_1(directory, config: dict) -> tuple[dict, dict]:
    """Version 1's config, mapped onto version 2's slots: (slot specs, weights file of each slot or None)."""
    pixel_space = config["autoencoder"] is None
    vocab = read_json(directory / "vocab.json")
    specs = {
        "first_stage": {"class": "PixelSpace", "config": {"channels": config["unet"]["in_channels"]}} if pixel_space
        else {"class": "AutoencoderKL", "config": config["autoencoder"]},
        "backbone": {"class": "UNet2DConditionModel", "config": config["unet"]},
        "conditioner": {"class": "TextEncoder", "config": {**config["text_encoder"], "vocab": vocab}},
    }
    files = {"first_stage": None if pixel_space else "autoencoder.safetensors", "backbone": "unet.safetensors",
             "conditioner": "text_encoder.safetensors"}
    return specs, files


def load(model_class, directory: str | os.PathLike, device: str | torch.device = "cpu",
         torch_dtype: torch.dtype | None = None):
    """Read a folder of any version into `model_class` (LatentDiffusion). See LatentDiffusion.load."""
    directory = readable_directory(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no model folder at {directory}")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a minildm model: it has no config.json")
    torch_dtype = None if torch_dtype == "auto" else DTYPES.get(torch_dtype, torch_dtype)  # names as diffusers'
    if torch_dtype is not None and torch_dtype not in DTYPES.values():
        raise TypeError(f"torch_dtype must be one of {', '.join(f'torch.{n}' for n in DTYPES)}, their names, "
                        f"'auto' or None, got {torch_dtype!r}")
    config = read_json(directory / "config.json")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{directory / 'config.json'} is not a minildm LatentDiffusion config")
    version = config.get("version")
    where = f"{directory / 'config.json'} (version {version})"
    try:
        if version == 1:
            specs, files = _slots_of_version_1(directory, config)
        elif version == 2:
            specs, files = {name: config[name] for name in SLOTS}, {name: f"{name}.safetensors" for name in SLOTS}
        else:
            raise ValueError(f"{directory} holds format version {version!r}; this minildm reads versions 1 to "
                             f"{VERSION}: a newer minildm wrote it")
        missing = [file for file in files.values() if file is not None and not (directory / file).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a complete minildm model: missing {', '.join(missing)}")
        modules = {}
        for name in SLOTS:
            if specs[name]["class"] not in SLOT_CLASSES[name]:
                raise ValueError(f"unknown {name} class {specs[name]['class']!r} (known: "
                                 f"{', '.join(SLOT_CLASSES[name])})")
            modules[name] = SLOT_CLASSES[name][specs[name]["class"]].from_config_dict(specs[name]["config"])
        schedule_class = FlowMatchSchedule if config["prediction_type"] == "flow_prediction" else NoiseSchedule
        schedule = schedule_class(**config["schedule"])
        condition = config.get("concat_conditioning")  # optional: a spatial condition beside z_t
        if condition is not None:
            if condition["class"] not in CONCAT_CONDITIONS:
                raise ValueError(f"unknown concat_conditioning class {condition['class']!r} (known: "
                                 f"{', '.join(CONCAT_CONDITIONS)})")
            condition = CONCAT_CONDITIONS[condition["class"]].from_config_dict(condition["config"])
        model = model_class(modules["first_stage"], modules["backbone"], schedule, modules["conditioner"],
                            config["prediction_type"], config["image_size"],
                            **({"concat_conditioning": condition} if condition is not None else {}))
        dtypes = {name: DTYPES[specs[name]["torch_dtype"]] if specs[name].get("torch_dtype") else None
                  for name in SLOTS}
    except (KeyError, TypeError, ValueError) as e:  # a field missing, unknown, of the wrong type or out of range
        raise ValueError(f"{where} does not describe a valid model: {type(e).__name__}: {e}") from e
    for name in SLOTS:
        if files[name] is not None:
            load_module_weights(modules[name], directory / files[name], dtypes[name])
    model = model.to(device)
    return (model.to(torch_dtype) if torch_dtype is not None else model).eval()
