"""Editing (editing.py): img2img, inversion, inpainting and prompt swap, on tiny models and test doubles.

The inversion algebra is checked with backbones whose output does not depend on the sample (then DDIM's and
Euler's steps are affine maps with a known inverse, so invert∘generate must be the identity to float precision)
and with an affine one (where only the fixed-point iterations make it exact)."""

import math

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm
from doubles import CountConditioner, HalvingFirstStage
from torch import nn

from minildm import editing
from minildm.flow import FlowMatchSchedule
from minildm.ldm import LatentDiffusion
from minildm.samplers import DDIMSampler, FlowMatchEulerSampler
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder
from minildm.unet import UNet2DConditionModel, UNetConfig

FAMILIES = ["epsilon", "v_prediction", "flow_prediction"]


class AffineBackbone(nn.Module):
    """output = slope · sample + pattern · cos(t / T) + the prompt's word count: with slope 0 the output
    ignores the sample, so every sampler step is an affine map of the sample whose inverse is known exactly."""

    def __init__(self, channels: int = 3, size: int = 8, slope: float = 0.0, cross_attention_dim: int = 8):
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.cross_attention_dim = cross_attention_dim
        self.slope = slope
        self.pattern = nn.Parameter(torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1)))
        self.calls: list[tuple[float, torch.Tensor]] = []  # (timestep, sample) of every call

    def forward(self, sample, timestep, encoder_hidden_states):
        t = float(timestep)
        self.calls.append((t, sample.clone()))
        text = encoder_hidden_states[:, 0, -1].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1): CountConditioner's word count
        return self.slope * sample + 0.3 * self.pattern * math.cos(t / 1000) + 0.05 * text

    def cross_attention_modules(self) -> dict:
        return {}

    def config_dict(self) -> dict:
        return {}


def double_ldm(prediction_type: str, slope: float = 0.0) -> LatentDiffusion:
    """Pixel space (z_0 = 2x - 1), the affine backbone, a word-counting conditioner, 8x8 images."""
    schedule = FlowMatchSchedule() if prediction_type == "flow_prediction" else NoiseSchedule()
    return LatentDiffusion(None, AffineBackbone(slope=slope), schedule, CountConditioner(8), prediction_type,
                           image_size=8).eval()


def images_like(ldm, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Images (B, 3, S, S) in [0.1, 0.9], S = ldm.image_size: away from the clamp at 0 and 1."""
    size = ldm.image_size
    return 0.1 + 0.8 * torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def latents_of(ldm, images):
    """z_0 by hand: scaling_factor · the encoder's mean of 2x - 1."""
    return ldm.first_stage.encode(images * 2 - 1).mode() * ldm.first_stage.scaling_factor


# ---- img2img ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", FAMILIES)
def test_strength_zero_returns_the_first_stages_reconstruction(prediction_type):
    ldm = make_tiny_ldm(prediction_type)
    images = images_like(ldm)
    with torch.no_grad():
        expected = ldm.decode_latents(latents_of(ldm, images))  # D(E(x))
    for strength in (0.0, 0.01):  # 0.01 of 50 steps is int(0.5) = 0 steps, as diffusers' get_timesteps
        out = ldm.img2img(images, CAPTIONS[:2], strength=strength, num_inference_steps=50)
        assert torch.equal(out, expected)
    assert torch.equal(editing.reconstruct(ldm, images), expected)


@pytest.mark.parametrize("prediction_type", FAMILIES)
def test_img2img_runs_the_last_steps_from_the_image_noised_to_the_first_of_them(prediction_type):
    ldm = double_ldm(prediction_type)
    images = images_like(ldm)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    sampler = ldm.make_sampler()
    ldm.img2img(images, ["a b", "c"], strength=0.35, num_inference_steps=10, sampler=sampler, noise=noise,
                guidance_scale=1.0)
    calls = ldm.backbone.calls
    assert len(calls) == 3  # int(10 · 0.35) = 3 steps: the sampler's last three
    assert [t for t, _ in calls] == pytest.approx(sampler.timesteps[7:].tolist())
    z0 = images * 2 - 1
    if ldm.is_flow:
        sigma = sampler.sigmas[7].item()
        start = (1 - sigma) * z0 + sigma * noise  # the straight path at σ_7
    else:
        alpha_bar = ldm.schedule.alphas_cumprod[int(sampler.timesteps[7])].item()
        start = alpha_bar ** 0.5 * z0 + (1 - alpha_bar) ** 0.5 * noise  # Ho et al. eq. 4 at t_7
    assert torch.allclose(calls[0][1], start.float(), atol=1e-6)


def test_img2img_at_strength_one_on_a_flow_is_generate_from_the_same_noise():
    ldm = make_tiny_ldm("flow_prediction")
    images = images_like(ldm)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    out = ldm.img2img(images, CAPTIONS[:2], strength=1.0, num_inference_steps=6, noise=noise)
    assert torch.allclose(out, ldm.generate(CAPTIONS[:2], 6, latents=noise), atol=1e-6)  # σ_0 = 1: the image is gone


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_img2img_is_seeded_and_keeps_the_shape(prediction_type):
    ldm = make_tiny_ldm(prediction_type)
    images = images_like(ldm, batch=3)

    def run(seed):
        return ldm.img2img(images, CAPTIONS, 0.6, 4, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.shape == images.shape and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, run(0))
    assert not torch.allclose(first, run(1))


def test_img2img_works_with_every_sampler_generate_takes():
    ldm = make_tiny_ldm("epsilon")
    images = images_like(ldm)
    for name in ("ddim", "ddpm", "dpm_solver"):
        out = ldm.img2img(images, CAPTIONS[:2], 0.5, 6, sampler=ldm.make_sampler(name),
                          generator=torch.Generator().manual_seed(0))
        assert out.shape == images.shape and torch.isfinite(out).all()
    flow = double_ldm("flow_prediction")
    heun = flow.make_sampler("heun")
    flow.img2img(images_like(flow), "a", 0.5, 4, sampler=heun, guidance_scale=1.0)
    # Heun visits every σ but the first twice: 2 of 4 steps are visits 4, 5, 6 of its 7 (diffusers' t_start · order)
    assert [t for t, _ in flow.backbone.calls] == pytest.approx(heun.timesteps[4:].tolist())


# ---- inversion: the steps -----------------------------------------------------------------------------------


def test_ddim_inverse_step_is_eq_12_solved_for_x_t():
    generator = torch.Generator().manual_seed(0)
    eps, sample = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    alpha_bar_t, alpha_bar_prev = 0.3, 0.8
    x_t = editing.ddim_inverse_step(eps, sample, alpha_bar_t, alpha_bar_prev)
    # Written out: x̂_0 = (x_prev - sqrt(1 - ᾱ_prev) ε) / sqrt(ᾱ_prev), x_t = sqrt(ᾱ_t) x̂_0 + sqrt(1 - ᾱ_t) ε
    x0 = (sample - math.sqrt(0.2) * eps) / math.sqrt(0.8)
    assert torch.allclose(x_t, math.sqrt(0.3) * x0 + math.sqrt(0.7) * eps, atol=1e-6)
    # and DDIM's own step, given the same ε, takes it back to where it started (Song eq. 12, η = 0)
    sampler = DDIMSampler(NoiseSchedule(), timestep_spacing="trailing", set_alpha_to_one=True)
    sampler.set_timesteps(10)
    t, prev_t = int(sampler.timesteps[3]), int(sampler.timesteps[4])
    bars = sampler.schedule.alphas_cumprod
    x_t = editing.ddim_inverse_step(eps, sample, bars[t].item(), bars[prev_t].item())
    assert torch.allclose(sampler.step(eps, t, x_t).prev_sample, sample, atol=1e-5)


def test_euler_inverse_step_undoes_the_euler_step():
    generator = torch.Generator().manual_seed(0)
    velocity, sample = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    sampler = FlowMatchEulerSampler(FlowMatchSchedule())
    sampler.set_timesteps(5)
    sigma, sigma_next = sampler.sigmas[0].item(), sampler.sigmas[1].item()
    x_sigma = editing.euler_inverse_step(velocity, sample, sigma, sigma_next)
    assert torch.allclose(x_sigma, sample + (sigma - sigma_next) * velocity)
    assert torch.allclose(sampler.step(velocity, sampler.timesteps[0], x_sigma).prev_sample, sample, atol=1e-6)


# ---- inversion: the whole loop ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", FAMILIES)
def test_generate_from_the_inverted_latents_gives_the_image_back_when_the_output_ignores_the_sample(prediction_type):
    ldm = double_ldm(prediction_type)
    images = images_like(ldm)
    prompts = ["a b", "c"]
    # A v-prediction's ε = sqrt(ᾱ_t) v + sqrt(1 - ᾱ_t) z_t depends on the sample even when v does not: only the
    # fixed-point iterations make its inversion exact.
    iterations = 30 if prediction_type == "v_prediction" else 0
    samplers = [ldm.make_sampler()]
    if not ldm.is_flow:  # Stable Diffusion's DDIM too: "leading" spacing, ending at ᾱ_0 rather than 1
        samplers.append(DDIMSampler(ldm.schedule, prediction_type=prediction_type))
    for sampler in samplers:
        for guidance_scale in (1.0, 3.0):
            latents = ldm.invert(images, prompts, 12, sampler=sampler, guidance_scale=guidance_scale,
                                 fixed_point_iterations=iterations)
            assert latents.shape == (2, 3, 8, 8)
            back = ldm.generate(prompts, 12, sampler=sampler, latents=latents, guidance_scale=guidance_scale)
            assert torch.allclose(back, images, atol=2e-5), (sampler, guidance_scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_fixed_point_iterations_make_the_inversion_exact_for_an_affine_backbone(prediction_type):
    ldm = double_ldm(prediction_type, slope=0.2)  # the output now depends on the sample: the plain inversion drifts
    images = images_like(ldm)

    def error(iterations):
        latents = ldm.invert(images, "a", 8, fixed_point_iterations=iterations)
        return (ldm.generate(["a", "a"], 8, latents=latents, guidance_scale=1.0) - images).abs().max().item()

    plain, refined = error(0), error(40)
    assert plain > 1e-3
    assert refined < 1e-5


def test_inversion_of_a_tiny_unet_gets_closer_with_more_steps_and_with_fixed_point_iterations():
    ldm = make_tiny_ldm("epsilon")
    images = images_like(ldm)

    def latent_error(steps, iterations=0):
        z = ldm.invert(images, CAPTIONS[:2], steps, fixed_point_iterations=iterations)
        out = ldm.generate(CAPTIONS[:2], steps, latents=z, guidance_scale=1.0, return_intermediates=True)
        return (out.latents[-1] - latents_of(ldm, images)).abs().max().item()

    assert latent_error(20) < latent_error(4)
    assert latent_error(4, 2) < latent_error(4, 0)


def test_invert_is_deterministic_and_stops_where_strength_says():
    ldm = double_ldm("flow_prediction")
    images = images_like(ldm)
    first = ldm.invert(images, "a", 10)
    assert torch.equal(first, ldm.invert(images, "a", 10))
    ldm.backbone.calls.clear()
    ldm.invert(images, "a", 10, strength=0.3)
    sampler = ldm.make_sampler()
    sampler.set_timesteps(10)
    assert [t for t, _ in ldm.backbone.calls] == pytest.approx(sampler.timesteps[7:].flip(0).tolist())


@pytest.mark.parametrize("name, settings, message", [
    ("ddpm", {}, "DDPMSampler"),
    ("ddim", {"eta": 0.5}, "eta=0.5"),
    ("ddim", {"clip_sample": True}, "clip_sample"),
    ("dpm_solver", {}, "DPMSolverMultistepSampler"),
])
def test_invert_refuses_diffusion_samplers_that_cannot_run_backwards(name, settings, message):
    ldm = double_ldm("epsilon")
    sampler = ldm.make_sampler(name, **settings)
    with pytest.raises(ValueError, match=message) as error:
        ldm.invert(images_like(ldm), "a", 5, sampler=sampler)
    assert "make_sampler('ddim')" in str(error.value)
    with pytest.raises(ValueError, match="cannot invert"):
        editing.prompt_swap(ldm, images_like(ldm), "a", "b", 5, sampler=sampler)


def test_invert_refuses_heun_and_names_euler():
    ldm = double_ldm("flow_prediction")
    with pytest.raises(ValueError, match=r"Heun.*make_sampler\('euler'\)"):
        ldm.invert(images_like(ldm), "a", 5, sampler=ldm.make_sampler("heun"))


# ---- prompt swap --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_prompt_swap_with_the_same_prompt_gives_the_image_back_and_another_prompt_changes_it(prediction_type):
    ldm = double_ldm(prediction_type)
    images = images_like(ldm)
    same = editing.prompt_swap(ldm, images, ["a b", "c"], ["a b", "c"], 10)
    assert torch.allclose(same, images, atol=2e-5)
    other = editing.prompt_swap(ldm, images, ["a b", "c"], ["a", "c"], 10)
    assert not torch.allclose(other[0], images[0], atol=1e-3)  # the conditioner counts words: 2 -> 1 changes ε
    assert torch.allclose(other[1], images[1], atol=2e-5)
    assert torch.equal(editing.prompt_swap(ldm, images, "a", "b", 10, strength=0.0), editing.reconstruct(ldm, images))


# ---- inpainting ---------------------------------------------------------------------------------------------


def test_latent_mask_repaints_a_latent_pixel_if_any_of_its_pixels_is_masked():
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, 1, 2] = 1  # one pixel of the top-right 2x2 block
    expected = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    assert torch.equal(editing.latent_mask(masks, 2), expected)


def halving_ldm(prediction_type: str) -> LatentDiffusion:
    """f = 2 by average pooling and nearest upsampling: each pixel is decoded from its own latent alone, so the
    known region's pixels must come back exactly as the first stage's reconstruction."""
    torch.manual_seed(0)
    text_encoder = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1, num_heads=2)
    unet = UNet2DConditionModel(UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 16),
                                           attention_levels=(False, True), cross_attention_dim=16,
                                           attention_head_dim=8, norm_num_groups=4))
    schedule = FlowMatchSchedule() if prediction_type == "flow_prediction" else NoiseSchedule()
    return LatentDiffusion(HalvingFirstStage(3), unet, schedule, text_encoder, prediction_type, image_size=16).eval()


@pytest.mark.parametrize("prediction_type", FAMILIES)
def test_inpaint_keeps_the_known_region_as_the_reconstruction_and_repaints_the_rest(prediction_type):
    ldm = halving_ldm(prediction_type)
    images = images_like(ldm)
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 3:9, 5:12] = 1  # not on the latent grid: the 2x2 blocks it touches are repainted
    out = ldm.inpaint(images, masks, CAPTIONS[:2], 6, generator=torch.Generator().manual_seed(0))
    repainted = editing.latent_mask(masks, 2).repeat_interleave(2, 2).repeat_interleave(2, 3).bool()  # (2, 1, 16, 16)
    known = ~repainted.expand_as(images)
    assert torch.equal(out[known], editing.reconstruct(ldm, images)[known])
    assert (out[~known] - images[~known]).abs().mean() > 0.05  # an untrained model draws something else there
    pasted = ldm.inpaint(images, masks, CAPTIONS[:2], 6, generator=torch.Generator().manual_seed(0),
                         paste_original=True)
    outside = (masks == 0).expand_as(images)
    assert torch.equal(pasted[outside], images[outside])
    assert torch.equal(pasted[~outside], out[~outside])


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_inpaint_renoises_the_known_region_to_each_steps_level(prediction_type):
    ldm = double_ldm(prediction_type, slope=0.1)
    images = images_like(ldm)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :4] = 1  # repaint the top half
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    sampler = ldm.make_sampler()
    out = ldm.inpaint(images, masks, ["a", "b c"], 5, sampler=sampler, noise=noise, guidance_scale=1.0)
    z0 = images * 2 - 1
    for visit, (_, sample) in enumerate(ldm.backbone.calls):
        if ldm.is_flow:
            sigma = sampler.sigmas[visit].item()
            expected = (1 - sigma) * z0 + sigma * noise
        else:
            alpha_bar = ldm.schedule.alphas_cumprod[int(sampler.timesteps[visit])].item()
            expected = alpha_bar ** 0.5 * z0 + (1 - alpha_bar) ** 0.5 * noise
        assert torch.allclose(sample[:, :, 4:], expected[:, :, 4:].float(), atol=1e-5), visit
    assert torch.allclose(out[:, :, 4:], images[:, :, 4:], atol=1e-6)  # the last paste is z_0 itself


def test_inpaint_with_a_full_mask_is_generate():
    ldm = make_tiny_ldm("flow_prediction")
    images = images_like(ldm)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    out = ldm.inpaint(images, torch.ones(2, 1, 16, 16), CAPTIONS[:2], 5, noise=noise)
    assert torch.allclose(out, ldm.generate(CAPTIONS[:2], 5, latents=noise), atol=1e-6)


# ---- bad input ----------------------------------------------------------------------------------------------


def test_bad_arguments_are_refused_by_name():
    ldm = make_tiny_ldm("epsilon")
    images = images_like(ldm)
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        ldm.img2img(images * 2 - 1, CAPTIONS[:2])
    with pytest.raises(ValueError, match=r"images must be images of shape \(B, 3, H, W\)"):
        ldm.invert(images[:, :1], CAPTIONS[:2])
    with pytest.raises(ValueError, match="multiples"):
        ldm.img2img(images[:, :, :14, :14], CAPTIONS[:2])
    with pytest.raises(ValueError, match="got 3 prompts for 2 images"):
        ldm.img2img(images, CAPTIONS)
    with pytest.raises(ValueError, match="strength"):
        ldm.img2img(images, CAPTIONS[:2], strength=1.5)
    with pytest.raises(ValueError, match="fixed_point_iterations"):
        ldm.invert(images, CAPTIONS[:2], fixed_point_iterations=-1)
    with pytest.raises(TypeError, match="sampler must be a sampler object"):
        ldm.invert(images, CAPTIONS[:2], sampler="ddim")
    with pytest.raises(ValueError, match=r"masks must have shape \(2, 1, 16, 16\)"):
        ldm.inpaint(images, torch.ones(2, 3, 16, 16), CAPTIONS[:2])
    with pytest.raises(ValueError, match="only 0 \\(keep\\) and 1 \\(repaint\\)"):
        ldm.inpaint(images, torch.full((2, 1, 16, 16), 0.5), CAPTIONS[:2])
    with pytest.raises(TypeError, match="masks must be a float or bool tensor"):
        ldm.inpaint(images, torch.ones(2, 1, 16, 16, dtype=torch.long), CAPTIONS[:2])
    with pytest.raises(ValueError, match="noise must have the latents' shape"):
        ldm.img2img(images, CAPTIONS[:2], noise=torch.randn(1, 4, 4, 4))


def test_editing_leaves_the_models_training_flag_as_it_was():
    ldm = make_tiny_ldm("flow_prediction").train()
    ldm.img2img(images_like(ldm), CAPTIONS[:2], 0.5, 3)
    assert ldm.training and ldm.backbone.training
    ldm.eval()
    ldm.invert(images_like(ldm), CAPTIONS[:2], 3)
    assert not ldm.training


def test_a_model_with_concatenated_conditioning_is_sent_to_its_generate():
    from minildm.concat_conditioning import InpaintingCondition

    ldm = make_tiny_ldm("flow_prediction")
    ldm.concat_conditioning = InpaintingCondition()  # its backbone would need [z_t, mask, masked latents]
    with pytest.raises(ValueError, match=r"InpaintingCondition.*generate\(image=\.\.\., mask_image=\.\.\.\)"):
        ldm.img2img(images_like(ldm), CAPTIONS[:2], 0.5, 3)
