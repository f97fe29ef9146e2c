"""Safe model files: weights as safetensors, configuration as JSON, both written atomically.

Nothing here ever unpickles. A `.ckpt` / `.pt` file from elsewhere is a pickle: loading one can run
arbitrary code, so it is refused with a message that says how to convert it on a machine you trust.

A model is one folder: `save_module` writes its weights (`name`.safetensors) and its config (`name`.json)
as one atomic folder, and `load_module` builds the module again, checking every tensor's name, shape and
dtype against the config before loading; the module takes the dtype it was saved in. The crash-safe
writing itself is atomic.py's.

Depends on safetensors and atomic.py.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .atomic import atomic_directory, atomic_write_bytes, atomic_write_json, check_path, read_json, readable_directory

PICKLE_HELP = (
    "minildm never unpickles files, because unpickling can run arbitrary code. If you trust the file, "
    "convert it once on that machine: `sd = torch.load(path, weights_only=True)` then "
    "`safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')`."
)


def safetensors_in(folder, name: str):
    """The weights file `name` (e.g. "model.safetensors") in a diffusers / transformers `folder`, a Path. Raises
    ValueError when the folder holds only pickled weights (.bin, .ckpt, .pt, .pth: never unpickled) and
    FileNotFoundError when it holds no weights at all."""
    path = folder / name
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".ckpt", ".pt", ".pth"})
        if pickles:
            raise ValueError(f"{folder} holds only pickled weights ({', '.join(pickles)}), which minildm never "
                             f"loads; it needs {name}. {PICKLE_HELP}")
        raise FileNotFoundError(f"{folder} has no {name}")
    return path


def save_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save a state dict as safetensors, atomically. Tensors are copied to CPU and made contiguous."""
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in tensors.items()):
        raise TypeError(f"tensors must be a dict of names (str) to tensors, got {type(tensors).__name__} "
                        f"{tensors!r:.80}")
    path = check_path(path, "path")
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write_bytes(path, safetensors_save(cpu))


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive ("PK") holding a pickle; older files are a bare pickle, whose protocol
    # 2+ opcode is 0x80. (Ancient protocol 0/1 pickles have no magic: they get the "corrupted" message.)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file into CPU tensors, with a clear error for missing, pickle or corrupt files."""
    path = check_path(path, "path")
    if not path.is_file():
        raise FileNotFoundError(f"expected a safetensors weights file at {path}, but there is none")
    if path.suffix in {".ckpt", ".pt", ".pth", ".bin", ".pkl"}:
        raise ValueError(f"refusing to load {path}: {path.suffix} files are pickles. {PICKLE_HELP}")
    data = path.read_bytes()
    try:
        # Parsing safetensors never runs code: it reads a JSON header and raw tensor bytes. So try that first
        # (a valid file's 8-byte header length can itself begin with 0x80 or "PK") ...
        return safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        # ... and only when it fails, tell a pickle apart from a damaged file, to say what to do.
        if _looks_like_pickle(data[:2]):
            raise ValueError(f"refusing to load {path}: it is a pickle, not a safetensors file. {PICKLE_HELP}") from e
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted") from e


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    """Compare names, shapes and dtypes; report every mismatch in one ValueError."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else "")
        )
    for name in sorted(set(expected) & set(found)):
        e, f = expected[name], found[name]
        if e.shape != f.shape:
            problems.append(f"{name}: expected shape {tuple(e.shape)}, found {tuple(f.shape)}")
        if e.dtype != f.dtype:
            problems.append(f"{name}: expected dtype {e.dtype}, found {f.dtype}")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ValueError(f"{where} does not match its config:\n  " + "\n  ".join(shown))


def save_module(module: torch.nn.Module, config, directory: str | os.PathLike, name: str) -> None:
    """`name`.safetensors (weights) and `name`.json (the dataclass `config`) in `directory`, one atomic folder."""
    with atomic_directory(directory) as folder:
        save_weights(module.state_dict(), folder / f"{name}.safetensors")
        atomic_write_json(folder / f"{name}.json", asdict(config))


def load_module(module_class, config_class, directory: str | os.PathLike, name: str):
    """The inverse of save_module: build module_class(config_class(**json)), load and check its weights."""
    directory = readable_directory(directory)
    config = read_json(directory / f"{name}.json")
    try:
        module = module_class(config_class(**config))
    except (TypeError, ValueError) as e:  # a field missing, unknown, or out of range
        raise ValueError(f"{directory / f'{name}.json'} is not a valid {config_class.__name__}: {e}") from e
    load_module_weights(module, directory / f"{name}.safetensors")
    return module.eval()


def load_module_weights(module: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Load safetensors weights into `module` after checking every name, shape and dtype.

    The module takes the floating-point dtype the file holds (a bf16 save loads back as bf16); `dtype`, when
    given (from a config), is the one the file must hold. Raises ValueError for any mismatch, or a file that
    mixes floating-point dtypes.
    """
    state = load_weights(path)
    stored = stored_dtype(state, path)
    if stored is not None and dtype is not None and stored != dtype:
        raise ValueError(f"{path} holds {stored} weights but its config says {dtype}")
    if stored is not None:
        module.to(stored)
    check_state_dict(module.state_dict(), state, str(path))
    module.load_state_dict(state)


def stored_dtype(state: dict[str, torch.Tensor], path) -> torch.dtype | None:
    """The one floating-point dtype of a saved state dict (None if it holds none); ValueError if it mixes them."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"{path} mixes floating-point dtypes {sorted(str(d) for d in dtypes)}; a module is saved "
                         f"in one dtype")
    return dtypes.pop() if dtypes else None
