"""Safe model files: weights as safetensors, configuration as JSON, both written atomically.

Nothing here ever unpickles. A `.ckpt` / `.pt` file from elsewhere is a pickle: loading one can run
arbitrary code, so it is refused with a message that says how to convert it on a machine you trust.

Atomic writes: the bytes go to a temporary file in the same folder, are flushed and fsync'ed, and the
file is renamed over the target. A rename within one folder is atomic, so a reader (or a crash) sees
either the old file or the new one, whole. A model of several files is saved as a whole folder the same
way (`atomic_directory`): written into a temporary sibling folder, then swapped into place.

Depends on safetensors only.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

PICKLE_HELP = (
    "minildm never unpickles files, because unpickling can run arbitrary code. If you trust the file, "
    "convert it once on that machine: `sd = torch.load(path, weights_only=True)` then "
    "`safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')`."
)


def _read_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere os.umask can only read it by setting it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def check_path(path, name: str) -> Path:
    """`path` (a str or os.PathLike) as a Path, or a TypeError / ValueError that names the argument `name`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (a str or os.PathLike), got {type(path).__name__} {path!r:.60}")
    path = Path(path)
    if "\x00" in str(path):
        raise ValueError(f"{name} must not contain a NUL character, got {str(path)!r:.80}")
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # anything else (missing, not a folder) is for the caller to report
            raise ValueError(f"{name} is too long for the filesystem: {str(path)!r:.80}") from e
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` is always either the old file or the new one, whole."""
    path = check_path(path, "path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_read_umask())  # mkstemp makes owner-only files; use the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)  # so that the rename itself survives a power cut


def _fsync_directory(directory: Path) -> None:
    """Flush a folder's list of entries (new names, renames) to the disk."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems (and Windows) cannot fsync a folder
        pass


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---- whole folders -------------------------------------------------------------------------------------------
#
# A model is several files (config, vocabulary, weights), and writing each one atomically is not enough: a
# crash between two of them leaves new weights next to an old config. So a folder NAME is written whole into a
# temporary sibling .NAME.partial-XXXX, flushed, and swapped in with two renames:
#
#     NAME -> .NAME.old        .NAME.partial-XXXX -> NAME        delete .NAME.old
#
# POSIX has no rename that swaps two folders, so for an instant between the renames there is no NAME. A crash
# there leaves .NAME.old, the previous version, whole: `readable_directory` falls back to it, and the next save
# tidies up. So after a crash at any moment, NAME, or else .NAME.old, holds one whole version. (A crash while
# writing leaves a .NAME.partial-XXXX folder, which is never read and is removed by the next save.)


def _old_sibling(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def readable_directory(directory: str | os.PathLike) -> Path:
    """The folder to read a saved model from: `directory`, or, if a save crashed between its two renames,
    the previous version it left beside it (see atomic_directory)."""
    directory = check_path(directory, "directory")
    old = _old_sibling(directory.resolve())
    if not directory.exists() and old.is_dir():
        return old
    return directory


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target, follow_symlinks=False)  # instant, and the old folder keeps its copy
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, target, follow_symlinks=False)


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Replace the folder `directory` as a whole: write files into the folder this yields; when the block
    ends without an error, it takes the place of `directory`. Files already in `directory` that the block
    does not write (notes, samples) are carried over. One writer at a time per folder.

        with atomic_directory("model") as folder:
            save_weights(unet.state_dict(), folder / "unet.safetensors")
            atomic_write_json(folder / "config.json", config)
    """
    directory = check_path(directory, "directory").resolve()  # a symlinked folder: replace the real one
    if directory.parent == directory:
        raise ValueError(f"directory must be a folder below the filesystem root, got {directory}")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory must be a folder, but {directory} is a file")
    parent, old = directory.parent, _old_sibling(directory)
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{glob.escape(directory.name)}.partial-*"):  # from a save that crashed
        shutil.rmtree(stale, ignore_errors=True)
    new = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}.partial-"))
    try:
        os.chmod(new, 0o777 & ~_read_umask())  # mkdtemp makes an owner-only folder; use the usual permissions
        yield new
        current = readable_directory(directory)
        if current.is_dir():
            for entry in current.iterdir():
                if not os.path.lexists(new / entry.name):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(entry, new / entry.name)
        _fsync_directory(new)  # the files inside were fsync'ed as they were written
        if directory.exists():
            if old.exists():  # left by a save that crashed after its swap: `directory` is the newer one
                shutil.rmtree(old)
            os.rename(directory, old)
        # If `directory` was missing and `old` is there (a crash between the renames), `old` stays until now.
        os.rename(new, directory)
        _fsync_directory(parent)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | os.PathLike) -> dict:
    path = check_path(path, "path")
    if not path.is_file():
        raise FileNotFoundError(f"expected a JSON file at {path}, but there is none")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file may be truncated or corrupted") from e


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
        raise ValueError(f"{where} does not match its config:\n  " + "\n  ".join(problems))


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


def load_module_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into `module` after checking every name, shape and dtype."""
    state = load_weights(path)
    check_state_dict(module.state_dict(), state, str(path))
    module.load_state_dict(state)
