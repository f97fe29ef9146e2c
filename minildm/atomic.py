"""Crash-safe writes: a file, or a whole folder, is always either the old version or the new one, whole.

A file: the bytes go to a temporary file in the same folder, are flushed and fsync'ed, and the file is
renamed over the target. A rename within one folder is atomic, so a reader (or a crash) sees either the
old file or the new one, whole. A model of several files is saved as a whole folder the same way
(`atomic_directory`): written into a temporary sibling folder, then swapped into place.

checkpoint.py builds model files on these; JSON settings and reports, and viz.save_gif's animations, are
written with them too.

Depends on the standard library only.
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
from pathlib import Path


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
