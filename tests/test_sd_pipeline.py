"""A whole seeded Stable Diffusion generation in minildm against diffusers' StableDiffusionPipeline.

Both read the same tiny SD 1.5- or 2.1-shaped diffusers folder (tests/sd_tiny.py) and sample with the same
scheduler (SD's DDIM: "leading" spacing, steps_offset 1, set_alpha_to_one False, where both libraries step
through the same timesteps; and DPM-Solver++(2M)), the same starting latents, guidance 7.5, the VAE's scaling
factor 0.18215 and a prompt longer than CLIP's 77 tokens (both cut it, and minildm says which words it drops).
"""

import pytest
import torch

from minildm import LatentDiffusion, pretrained
from minildm.samplers import DDIMSampler, DPMSolverMultistepSampler

diffusers = pytest.importorskip("diffusers", reason='diffusers is not installed: pip install "minildm[dev]"')
pytest.importorskip("transformers", reason='transformers is not installed: pip install "minildm[dev]"')
sd_tiny = pytest.importorskip("sd_tiny")

LONG_PROMPT = "a photo of an astronaut riding a horse on mars " + " ".join(["red circle"] * 40)  # 90 pieces
PROMPTS = ["a small blue square in the center", LONG_PROMPT]


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    sd_tiny.write_tiny_sd_folder(path, request.param)
    return request.param, path


def sd_ddim_config(variant):
    config = {k: v for k, v in sd_tiny.scheduler_config(variant).items() if k != "_class_name"}
    return {"_class_name": "DDIMScheduler", **config, "timestep_spacing": "leading"}


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_generation_matches_stable_diffusion_pipeline(folder, scheduler):
    variant, path = folder
    config = {**sd_ddim_config(variant), "_class_name": scheduler}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                             local_files_only=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    ldm = LatentDiffusion.from_pretrained(path)
    sampler = pretrained.sampler_from_diffusers(config, ldm.schedule)
    assert isinstance(sampler, DDIMSampler if scheduler == "DDIMScheduler" else DPMSolverMultistepSampler)
    assert ldm.first_stage.scaling_factor == pipe.vae.config.scaling_factor == 0.18215

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pipe(PROMPTS, height=64, width=64, num_inference_steps=6, guidance_scale=7.5, latents=latents,
                      output_type="pt").images
    with pytest.warns(UserWarning, match="77-token limit"):
        ours = ldm.generate(PROMPTS, 6, sampler=sampler, guidance_scale=7.5, latents=latents, height=64, width=64)
    assert sampler.timesteps.tolist() == pipe.scheduler.timesteps.tolist()
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert 0.05 < theirs.std() and (theirs - ours).abs().max() < 1e-4  # real images, not a clamp of both to 0 or 1


def test_the_prompt_changes_the_image(folder):
    # The comparison above would also pass if the text did not reach the UNet: it must.
    _, path = folder
    ldm = LatentDiffusion.from_pretrained(path)
    sampler = DDIMSampler(ldm.schedule, prediction_type=ldm.prediction_type)  # SD's DDIM defaults
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = ldm.generate(["a red circle", "a blue square"], 4, sampler=sampler, guidance_scale=7.5,
                          latents=latents[:1].expand(2, -1, -1, -1), height=64, width=64)
    assert (images[0] - images[1]).abs().max() > 1e-2


def test_sample_pretrained_on_the_command_line(folder, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from minildm import single_file
    from minildm.__main__ import main

    _, path = folder
    args = ["sample", "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "32"]
    assert main([*args, "--pretrained", str(path), "--out", str(tmp_path / "a.png"), "--num", "2"]) == 0
    def pixels(name):
        with Image.open(tmp_path / name) as image:
            return torch.from_numpy(np.asarray(image).astype(np.int64))  # (H, W, 3)

    assert pixels("a.png").shape == (64, 64, 3)  # two 32-wide images side by side
    single_file.save_single_file(LatentDiffusion.from_pretrained(path), tmp_path / "model.safetensors")
    assert main([*args, "--pretrained", str(tmp_path / "model.safetensors"), "--config", str(path),
                 "--out", str(tmp_path / "b.png")]) == 0
    # The single file gives the first picture again (to one level of 255: a batch of 2 rounds otherwise than 1).
    assert (pixels("b.png") - pixels("a.png")[:, :32]).abs().max() <= 1
    assert main([*args, "--pretrained", str(tmp_path / "nothing"), "--out", str(tmp_path / "c.png")]) == 2
    assert "no diffusers folder" in capsys.readouterr().err
