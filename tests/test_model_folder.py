"""LatentDiffusion's folder on disk (model_folder.py): version 2 round trips, version-1 folders written by
an earlier minildm keep loading (tests/fixtures), dtypes are kept, and broken folders are refused clearly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm
from safetensors.torch import load_file

from minildm.autoencoder import AutoencoderKL
from minildm.ldm import LatentDiffusion
from minildm.pixel_space import PixelSpace
from minildm.samplers import DDIMSampler

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["ldm_v1", "ldm_v1_pixels"])
def test_version_1_folders_load_and_generate_what_they_did(name):
    # Written by minildm 0.1 (config version 1) with the images its generate() made: DDIM, "leading", offset 1,
    # 4 steps, guidance 3, seed 0. That sampler is still DDIMSampler's default.
    ldm = LatentDiffusion.load(FIXTURES / name)
    assert json.loads((FIXTURES / name / "config.json").read_text())["version"] == 1
    sampler = DDIMSampler(ldm.schedule, prediction_type=ldm.prediction_type)
    images = ldm.generate(CAPTIONS[:2], 4, sampler=sampler, guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(0))
    expected = load_file(FIXTURES / f"{name}_expected_images.safetensors")["images"]
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)  # other thread counts round differently
    if name == "ldm_v1_pixels":
        assert isinstance(ldm.first_stage, PixelSpace) and ldm.prediction_type == "v_prediction"
    else:
        assert isinstance(ldm.first_stage, AutoencoderKL)


def test_a_version_2_folder_loads_in_its_dtype_and_generates_what_it_did():
    # Written by this version (2) from the version-1 pixel model cast to bf16, with the images it generated
    # (the default sampler, 4 steps, guidance 3, seed 0). Every later version must keep reading it.
    ldm = LatentDiffusion.load(FIXTURES / "ldm_v2_bf16_pixels")
    assert json.loads((FIXTURES / "ldm_v2_bf16_pixels" / "config.json").read_text())["version"] == 2
    assert ldm.dtype == torch.bfloat16 and isinstance(ldm.first_stage, PixelSpace)
    images = ldm.generate(CAPTIONS[:2], 4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    expected = load_file(FIXTURES / "ldm_v2_bf16_pixels_expected_images.safetensors")["images"]
    # bf16 matmuls round differently on other CPUs: one with AMX / AVX512-BF16 kernels differs from the machine
    # that wrote the fixture by up to 0.025 (mean 0.002) over the 4 steps; a wrongly loaded weight differs by ~0.3.
    difference = (images - expected).abs()
    assert difference.max() <= 0.05 and difference.mean() <= 0.005, (difference.max(), difference.mean())


def test_a_version_1_folder_saves_as_version_2_with_the_same_model(tmp_path):
    ldm = LatentDiffusion.load(FIXTURES / "ldm_v1")
    ldm.save(tmp_path / "v2")
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert config["version"] == 2
    assert {config[slot]["class"] for slot in ("first_stage", "backbone", "conditioner")} == {
        "AutoencoderKL", "UNet2DConditionModel", "TextEncoder"}
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == [
        "backbone.safetensors", "conditioner.safetensors", "config.json", "first_stage.safetensors"]
    again = LatentDiffusion.load(tmp_path / "v2")
    for (key, a), b in zip(ldm.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key


def test_the_autoencoder_folder_of_version_1_loads():
    autoencoder = AutoencoderKL.load(FIXTURES / "autoencoder_v1")
    reference = LatentDiffusion.load(FIXTURES / "ldm_v1").first_stage
    for (key, a), b in zip(autoencoder.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), key


def test_pixel_space_round_trip(tmp_path):
    ldm = LatentDiffusion.load(FIXTURES / "ldm_v1_pixels")
    ldm.save(tmp_path / "pixels")
    config = json.loads((tmp_path / "pixels" / "config.json").read_text())
    assert config["first_stage"] == {"class": "PixelSpace", "config": {"channels": 3}, "torch_dtype": None}
    again = LatentDiffusion.load(tmp_path / "pixels")
    assert isinstance(again.first_stage, PixelSpace) and again.image_size == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_loads_back_in_its_dtype(tmp_path, dtype):
    # A bf16 model's save() used to write a folder that load() refused (the dtype check against float32).
    ldm = make_tiny_ldm().to(dtype)
    ldm.save(tmp_path / "half")
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert config["backbone"]["torch_dtype"] == str(dtype).removeprefix("torch.")
    loaded = LatentDiffusion.load(tmp_path / "half")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    for (key, a), b in zip(ldm.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key
    as_float = LatentDiffusion.load(tmp_path / "half", torch_dtype=torch.float32)  # diffusers' name
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    assert {p.dtype for p in LatentDiffusion.load(tmp_path / "half", torch_dtype="float32").parameters()} == {
        torch.float32}
    assert {p.dtype for p in LatentDiffusion.load(tmp_path / "half", torch_dtype="auto").parameters()} == {dtype}
    with pytest.raises(TypeError, match="torch_dtype must be one of"):
        LatentDiffusion.load(tmp_path / "half", torch_dtype="bf16")


def test_a_weights_file_that_does_not_match_its_config_dtype_is_refused(tmp_path):
    make_tiny_ldm().save(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["backbone"]["torch_dtype"] = "bfloat16"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds torch.float32 weights but its config says torch.bfloat16"):
        LatentDiffusion.load(tmp_path / "model")


def test_newer_unknown_and_broken_folders_are_refused(tmp_path):
    make_tiny_ldm().save(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    good = json.loads(config_path.read_text())
    for change, match in [({"version": 3}, "version 3; this minildm reads versions 1 to 2"),
                          ({"backbone": {**good["backbone"], "class": "DiT"}}, "unknown backbone class 'DiT'"),
                          ({"format": "diffusers"}, "not a minildm LatentDiffusion config"),
                          ({"prediction_type": "x0"}, "prediction_type")]:
        config_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            LatentDiffusion.load(tmp_path / "model")
    config_path.write_text(json.dumps(good))
    (tmp_path / "model" / "conditioner.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing conditioner.safetensors"):
        LatentDiffusion.load(tmp_path / "model")


def test_a_version_1_folder_without_its_vocabulary_says_so(tmp_path):
    shutil.copytree(FIXTURES / "ldm_v1", tmp_path / "v1")
    (tmp_path / "v1" / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        LatentDiffusion.load(tmp_path / "v1")


def test_a_slot_filler_of_your_own_is_saved_once_registered(tmp_path, monkeypatch):
    from doubles import CountConditioner

    from minildm import model_folder

    ldm = make_tiny_ldm()
    ldm = LatentDiffusion(ldm.first_stage, ldm.backbone, ldm.schedule, CountConditioner(16), image_size=16)
    with pytest.raises(ValueError, match=r"cannot save a CountConditioner as the conditioner.*"
                                         r"register\('conditioner', CountConditioner\) adds it"):
        ldm.save(tmp_path / "model")
    assert not (tmp_path / "model").exists()  # refused before anything was written
    monkeypatch.setitem(model_folder.SLOT_CLASSES, "conditioner", dict(model_folder.SLOT_CLASSES["conditioner"]))
    model_folder.register("conditioner", CountConditioner)
    ldm.save(tmp_path / "model")
    loaded = LatentDiffusion.load(tmp_path / "model")
    assert isinstance(loaded.conditioner, CountConditioner)
    assert torch.equal(loaded.conditioner.direction, ldm.conditioner.direction)
    with pytest.raises(ValueError, match="slot must be one of"):
        model_folder.register("text", CountConditioner)
