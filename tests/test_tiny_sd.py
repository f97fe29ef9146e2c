"""minildm.tiny_sd: the tiny random SD 1.5-shaped folder notebook 15 builds loads into minildm and generates."""

import json

import pytest
import torch

from minildm import LatentDiffusion
from minildm.tiny_sd import write_tiny_sd_folder

pytest.importorskip("diffusers", reason='diffusers is not installed: pip install "minildm[dev]"')
pytest.importorskip("transformers", reason='transformers is not installed: pip install "minildm[dev]"')


def test_tiny_folder_loads_and_generates_reproducibly(tmp_path):
    write_tiny_sd_folder(tmp_path / "a", "sd15", seed=0)
    index = json.loads((tmp_path / "a" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    ldm = LatentDiffusion.from_pretrained(tmp_path / "a")
    assert ldm.first_stage.scaling_factor == 0.18215

    def sample(model):
        return model.generate(["a red circle", "a blue square"], 2, guidance_scale=7.5, height=64, width=32,
                              generator=torch.Generator().manual_seed(0))

    images = sample(ldm)
    assert images.shape == (2, 3, 64, 32) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    torch.testing.assert_close(sample(ldm), images, rtol=0, atol=0)  # seeded: the same images again

    write_tiny_sd_folder(tmp_path / "b", "sd15", seed=0)  # the same seed writes the same weights
    torch.testing.assert_close(sample(LatentDiffusion.from_pretrained(tmp_path / "b")), images, rtol=0, atol=0)
    write_tiny_sd_folder(tmp_path / "c", "sd15", seed=1)  # another seed, other weights
    assert (sample(LatentDiffusion.from_pretrained(tmp_path / "c")) - images).abs().max() > 1e-3


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(ValueError, match="variant must be one of"):
        write_tiny_sd_folder(tmp_path, "sd3")
    assert not any(tmp_path.iterdir())
