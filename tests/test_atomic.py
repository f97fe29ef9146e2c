"""Tests for minildm/atomic.py: atomic writes of files and whole folders (permissions, failures and crashes
at every rename leave the old version or the new one, whole), and the model saves built on them."""

import json
import os
import stat

import pytest
import torch

from minildm import atomic
from minildm.atomic import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    readable_directory,
)
from minildm.checkpoint import load_weights, save_weights

# --- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_creates_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "dir" / "file.bin"  # parents are created
    atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write_bytes(str(path), b"second, longer content")
    assert path.read_bytes() == b"second, longer content"
    atomic_write_bytes(path, b"")
    assert path.read_bytes() == b""
    assert os.listdir(path.parent) == ["file.bin"]


def test_failed_rename_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.safetensors"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "a str, not bytes")  # fails inside f.write
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_usual_permissions(tmp_path, umask, mode):
    """mkstemp makes owner-only (0600) files; the written file follows the umask like open() would."""
    old_umask = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "model.safetensors", b"x")
        assert os.umask(umask) == umask  # the umask is left as it was
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "model.safetensors").st_mode) == mode


def test_json_round_trip_and_errors(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"nested": "ok"}, "scaling_factor": 0.18215}
    atomic_write_json(tmp_path / "c.json", obj)
    assert read_json(tmp_path / "c.json") == obj
    assert json.loads((tmp_path / "c.json").read_text()) == obj
    (tmp_path / "bad.json").write_text('{"a": 1,')  # truncated
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(tmp_path / "binary.json")
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


# --- atomic folders ----------------------------------------------------------------------------


def write_version(directory, version, extra=()):
    """A two-file "model" whose files both say `version`, written as one atomic folder."""
    with atomic_directory(directory) as folder:
        atomic_write_json(folder / "config.json", {"version": version})
        save_weights({"w": torch.full((3,), float(version))}, folder / "weights.safetensors")
        for name in extra:
            (folder / name).write_text(str(version))


def read_version(directory):
    """The version of a whole folder; fails if its two files disagree (a mix of two saves)."""
    folder = readable_directory(directory)
    version = read_json(folder / "config.json")["version"]
    assert torch.equal(load_weights(folder / "weights.safetensors")["w"], torch.full((3,), float(version)))
    return version


def test_atomic_directory_replaces_the_folder_and_keeps_other_files(tmp_path):
    model = tmp_path / "model"
    write_version(model, 1, extra=["only_in_1.txt"])
    (model / "notes.txt").write_text("mine")  # a file the user put there
    (model / "samples").mkdir()
    (model / "samples" / "0.png").write_bytes(b"png")
    write_version(str(model), 2)
    assert read_version(model) == 2
    assert (model / "notes.txt").read_text() == "mine" and (model / "samples" / "0.png").read_bytes() == b"png"
    assert (model / "only_in_1.txt").read_text() == "1"  # not written by version 2: carried over, like the rest
    assert os.listdir(tmp_path) == ["model"]  # no temporary or old folder left beside it
    write_version(tmp_path / "new" / "deeper", 1)  # parents are created
    assert read_version(tmp_path / "new" / "deeper") == 1


def test_atomic_directory_error_inside_keeps_the_old_folder(tmp_path):
    write_version(tmp_path / "model", 1)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "model") as folder:
            atomic_write_json(folder / "config.json", {"version": 2})
            raise RuntimeError("disk full")
    assert read_version(tmp_path / "model") == 1
    assert os.listdir(tmp_path) == ["model"]


class Crash(BaseException):
    """Stands for the process dying at that moment (a BaseException, like KeyboardInterrupt)."""


@pytest.mark.parametrize("crash_at", [0, 1])
def test_a_crash_at_either_rename_leaves_a_whole_version(tmp_path, monkeypatch, crash_at):
    """rename 0 moves the old folder away, rename 1 moves the new one in; between them the name is missing."""
    model = tmp_path / "model"
    write_version(model, 1)
    calls = []

    def crashing_rename(src, dst):
        calls.append((src, dst))
        if len(calls) - 1 == crash_at:
            raise Crash()
        os.replace(src, dst)

    monkeypatch.setattr(atomic.os, "rename", crashing_rename)
    with pytest.raises(Crash):
        write_version(model, 2)
    monkeypatch.undo()
    assert read_version(model) == 1  # the old version, whole: in place, or beside it as .model.old
    assert model.exists() == (crash_at == 0)
    write_version(model, 3)  # the next save finds its way and tidies up
    assert read_version(model) == 3
    assert os.listdir(tmp_path) == ["model"]


def test_leftovers_of_crashed_saves_are_ignored_then_removed(tmp_path):
    model = tmp_path / "model"
    write_version(model, 2)
    (tmp_path / ".model.old").mkdir()  # a crash after the swap, before the old version was deleted
    (tmp_path / ".model.old" / "config.json").write_text('{"version": 1}')
    (tmp_path / ".model.partial-x1y2").mkdir()  # a crash while writing
    (tmp_path / ".model.partial-x1y2" / "config.json").write_text('{"vers')
    assert readable_directory(model) == model and read_version(model) == 2
    write_version(model, 3)
    assert read_version(model) == 3 and os.listdir(tmp_path) == ["model"]


def test_atomic_directory_refuses_a_file_and_follows_the_umask(tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(ValueError, match="directory must be a folder"):
        write_version(tmp_path / "model", 1)
    assert (tmp_path / "model").read_text() == "a file"
    old_umask = os.umask(0o027)
    try:
        write_version(tmp_path / "folder", 1)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "folder").st_mode) == 0o750  # not mkdtemp's 0700


def test_model_saves_are_whole_folders(tmp_path, monkeypatch):
    """LatentDiffusion.save and AutoencoderKL.save: a crash mid-swap still loads the previous model."""
    from conftest import make_tiny_ldm

    from minildm.autoencoder import AutoencoderKL
    from minildm.ldm import LatentDiffusion

    first, second = make_tiny_ldm(seed=0), make_tiny_ldm(seed=1)
    first.save(tmp_path / "ldm")
    first.first_stage.save(tmp_path / "ae")
    renames = []

    def crash_on_second_rename(src, dst):
        renames.append(src)
        if len(renames) % 2 == 0:
            raise Crash()
        os.replace(src, dst)

    monkeypatch.setattr(atomic.os, "rename", crash_on_second_rename)
    for save, folder in ((second.save, "ldm"), (second.first_stage.save, "ae")):
        with pytest.raises(Crash):
            save(tmp_path / folder)
    monkeypatch.undo()
    assert not (tmp_path / "ldm").exists() and not (tmp_path / "ae").exists()
    loaded_ldm, loaded_ae = LatentDiffusion.load(tmp_path / "ldm"), AutoencoderKL.load(tmp_path / "ae")
    for (name, a), b in zip(first.state_dict().items(), loaded_ldm.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(first.first_stage.state_dict().items(), loaded_ae.state_dict().values()):
        assert torch.equal(a, b), name
