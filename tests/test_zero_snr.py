"""Zero terminal SNR (Lin et al. 2023, Algorithm 1), Min-SNR-γ weighting (Hang et al. 2023) and rescaled
classifier-free guidance (Lin et al. sec. 3.4): formulas checked against independent computations and
diffusers, no division by zero, errors for bad settings."""

import math
import warnings

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm

from minildm import LatentDiffusion, NoiseSchedule, TrainingConfig, min_snr_weights, train_ldm
from minildm.ldm import rescale_guidance


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_ends_at_zero_and_keeps_the_start(beta_schedule):
    plain = NoiseSchedule(beta_schedule)
    rescaled = NoiseSchedule(beta_schedule, rescale_betas_zero_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.snr(999).item() == 0.0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    assert rescaled.betas[-1].item() == pytest.approx(1.0)
    # Algorithm 1, written independently: sqrt(ᾱ) is an affine map of the old sqrt(ᾱ), shifted and scaled
    old = plain.alphas_cumprod.sqrt()
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(rescaled.alphas_cumprod.sqrt(), expected, rtol=0, atol=1e-12)
    assert (rescaled.alphas_cumprod[1:] < rescaled.alphas_cumprod[:-1]).all()  # still decreasing


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_matches_diffusers_ddim(beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    ours = NoiseSchedule(beta_schedule, rescale_betas_zero_snr=True)
    name = "squaredcos_cap_v2" if beta_schedule == "cosine" else beta_schedule
    theirs = diffusers.DDIMScheduler(beta_schedule=name, beta_start=ours.beta_start, beta_end=ours.beta_end,
                                     rescale_betas_zero_snr=True)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=0, atol=1e-6)
    assert theirs.alphas_cumprod[-1].item() == 0.0


def test_zero_terminal_snr_is_saved_and_old_configs_read_the_same():
    schedule = NoiseSchedule(rescale_betas_zero_snr=True)
    assert NoiseSchedule(**schedule.config_dict()) == schedule
    assert "rescale_betas_zero_snr" not in NoiseSchedule().config_dict()  # old folders: no new key
    assert schedule != NoiseSchedule()
    assert "rescale_betas_zero_snr=True" in repr(schedule)
    with pytest.raises(TypeError, match="True or False"):
        NoiseSchedule(rescale_betas_zero_snr="yes")
    with pytest.raises(ValueError, match=">= 2"):
        NoiseSchedule(num_train_timesteps=1, rescale_betas_zero_snr=True)


def test_no_division_by_zero_at_the_first_step():
    schedule = NoiseSchedule(rescale_betas_zero_snr=True)
    x_t, out = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        x0, eps = schedule.to_x0_and_eps(out, x_t, 999, prediction_type)
        assert torch.isfinite(x0).all() and torch.isfinite(eps).all(), prediction_type
    # v at SNR 0: x_0 = -v and ε = x_t, exactly
    x0, eps = schedule.to_x0_and_eps(out, x_t, 999, "v_prediction")
    torch.testing.assert_close(x0, -out)
    torch.testing.assert_close(eps, x_t)
    # ε at SNR 0 uses the floor ᾱ = 2⁻²⁴: x_0 = (x_t - sqrt(1 - 2⁻²⁴) ε) / 2⁻¹²
    x0, _ = schedule.to_x0_and_eps(out, x_t, 999, "epsilon")
    torch.testing.assert_close(x0, (x_t - math.sqrt(1 - 2**-24) * out) * 2**12)


def test_a_zero_snr_v_model_samples_finite_images_with_every_sampler():
    ldm = make_tiny_ldm("v_prediction", schedule=NoiseSchedule(rescale_betas_zero_snr=True))
    for name in ("ddim", "ddpm", "dpm_solver"):
        out = ldm.generate(CAPTIONS[:2], 3, sampler=ldm.make_sampler(name), generator=torch.Generator().manual_seed(0),
                           return_intermediates=True)
        assert out.timesteps[0] == 999, name  # trailing: the first step is the SNR-0 one
        assert torch.isfinite(out.latents).all() and torch.isfinite(out.pred_original_latents).all(), name


def test_an_epsilon_model_on_a_zero_snr_schedule_is_warned_about():
    with pytest.warns(UserWarning, match="v_prediction"):
        make_tiny_ldm("epsilon", schedule=NoiseSchedule(rescale_betas_zero_snr=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_tiny_ldm("v_prediction", schedule=NoiseSchedule(rescale_betas_zero_snr=True))


# ---- Min-SNR-γ ------------------------------------------------------------------------------------------------


def test_min_snr_weights_against_the_formulas():
    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 7.5, 1000.0])
    gamma = 5.0
    capped = [min(s, gamma) for s in snr.tolist()]
    expected = {
        "sample": capped,
        "v_prediction": [c / (s + 1) for c, s in zip(capped, snr.tolist())],
        "epsilon": [1.0] + [c / s for c, s in zip(capped[1:], snr.tolist()[1:])],  # SNR 0: the limit, 1
    }
    for prediction_type, values in expected.items():
        torch.testing.assert_close(min_snr_weights(snr, gamma, prediction_type), torch.tensor(values))


def test_min_snr_weighted_loss_is_the_weighted_mean_of_per_sample_errors():
    ldm = make_tiny_ldm("epsilon")
    latents = torch.randn(3, 4, 4, 4)
    timesteps, noise = torch.tensor([5, 400, 999]), torch.randn(3, 4, 4, 4)
    dropped = torch.zeros(3, dtype=torch.bool)
    weighted = ldm.diffusion_loss(latents, CAPTIONS, timesteps, noise, dropped, snr_gamma=5.0)
    # the same by hand: the network's output and each sample's MSE
    noisy = ldm.schedule.add_noise(latents, noise, timesteps)
    out = ldm.backbone(noisy, timesteps, ldm.conditioner.encode(CAPTIONS))
    per_sample = ((out - noise) ** 2).mean(dim=(1, 2, 3))
    snr = ldm.schedule.alphas_cumprod[timesteps] / (1 - ldm.schedule.alphas_cumprod[timesteps])
    weights = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    torch.testing.assert_close(weighted, (weights.float() * per_sample).mean())
    assert weights[0] < 1 and weights[2] == 1  # the easy t = 5 step is weighed down, the hard one not
    plain = ldm.diffusion_loss(latents, CAPTIONS, timesteps, noise, dropped)
    torch.testing.assert_close(plain, per_sample.mean())


def test_min_snr_with_zero_terminal_snr_and_epsilon_is_finite_in_training():
    with pytest.warns(UserWarning):
        ldm = make_tiny_ldm("epsilon", schedule=NoiseSchedule(rescale_betas_zero_snr=True))
    loss = ldm.diffusion_loss(torch.randn(2, 4, 4, 4), CAPTIONS[:2], torch.tensor([999, 999]), torch.randn(2, 4, 4, 4),
                              torch.zeros(2, dtype=torch.bool), snr_gamma=5.0)
    assert torch.isfinite(loss)
    history = train_ldm(ldm, torch.rand(4, 3, 16, 16) * 2 - 1, CAPTIONS[:2] * 2,
                        TrainingConfig(steps=2, batch_size=2, progress=False), snr_gamma=5.0)
    assert all(math.isfinite(x) for x in history["loss"])


def test_min_snr_refuses_bad_settings():
    snr = torch.ones(2)
    with pytest.raises(ValueError, match="positive"):
        min_snr_weights(snr, 0, "epsilon")
    with pytest.raises(ValueError, match="flow_prediction"):
        min_snr_weights(snr, 5.0, "flow_prediction")
    with pytest.raises(ValueError, match=">= 0"):
        min_snr_weights(torch.tensor([-1.0]), 5.0, "epsilon")
    ldm = make_tiny_ldm("flow_prediction")
    with pytest.raises(ValueError, match="a rectified flow has none"):
        ldm.diffusion_loss(torch.randn(2, 4, 4, 4), CAPTIONS[:2], torch.tensor([10.0, 500.0]), torch.randn(2, 4, 4, 4),
                           torch.zeros(2, dtype=torch.bool), snr_gamma=5.0)
    with pytest.raises(ValueError, match="Min-SNR"):
        train_ldm(ldm, torch.rand(2, 3, 16, 16) * 2 - 1, CAPTIONS[:2], TrainingConfig(steps=1, batch_size=2,
                                                                                        progress=False), snr_gamma=5.0)


# ---- rescaled guidance ----------------------------------------------------------------------------------------


def test_rescale_guidance_against_the_formula():
    guided, conditional = torch.randn(3, 4, 5, 5) * 3, torch.randn(3, 4, 5, 5)
    for phi in (0.0, 0.7, 1.0):
        out = rescale_guidance(guided, conditional, phi)
        for i in range(3):  # per sample, by hand
            rescaled = guided[i] * conditional[i].std() / guided[i].std()
            torch.testing.assert_close(out[i], phi * rescaled + (1 - phi) * guided[i])
    assert rescale_guidance(guided, conditional, 1.0)[0].std().item() == pytest.approx(conditional[0].std().item(),
                                                                                      rel=1e-5)


def test_generate_with_guidance_rescale():
    ldm: LatentDiffusion = make_tiny_ldm("v_prediction")
    kwargs = dict(num_inference_steps=3, guidance_scale=7.0, generator=None)
    plain = ldm.generate(CAPTIONS[:2], **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    zero = ldm.generate(CAPTIONS[:2], guidance_rescale=0.0, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    rescaled = ldm.generate(CAPTIONS[:2], guidance_rescale=0.7,
                            **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert torch.equal(plain, zero)
    assert not torch.equal(plain, rescaled)
    for bad in (-0.1, 1.5, "0.5"):
        with pytest.raises(ValueError, match="guidance_rescale"):
            ldm.generate(CAPTIONS[:1], 2, guidance_rescale=bad)
