"""Tests for minildm/samplers/: timesteps, DDIM eqs. (12) and (16), DDPM eq. (7), diffusers' loops, errors."""

import math

import numpy as np
import pytest
import torch

from minildm.samplers import DDIMSampler, DDPMSampler, SamplerOutput
from minildm.schedule import NoiseSchedule

T = 1000
# Stable Diffusion's betas written out independently of schedule.py (scaled_linear, 0.00085 .. 0.012).
BETAS = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T) ** 2
ALPHAS_CUMPROD = np.cumprod(1 - BETAS)


def alpha_bar(t):
    """ᾱ_t with the convention ᾱ_{-1} = 1 (nothing noised yet)."""
    return 1.0 if t < 0 else float(ALPHAS_CUMPROD[t])


def make_x0_eps(shape=(2, 3, 4, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- timesteps

# Expected values worked out by hand from the formulas diffusers uses, with T = 1000:
#   leading:  arange(0, n) * (T // n) + steps_offset, reversed.  n=3: T//3 = 333 -> 0, 333, 666 -> +1.
#   trailing: round(arange(T, 0, -T/n)) - 1.  n=7: T/7 = 142.857.. -> 1000, 857.14, 714.29, 571.43,
#             428.57, 285.71, 142.86 -> rounded 1000, 857, 714, 571, 429, 286, 143 -> minus 1.
#   linspace: round(linspace(0, 999, n)), reversed.  n=7: step 166.5 -> 0, 166.5, 333, 499.5, 666,
#             832.5, 999; numpy rounds halves to even: 166, 500, 832.
EXPECTED_TIMESTEPS = [
    ("leading", 1, 10, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ("leading", 1, 3, [667, 334, 1]),
    ("leading", 0, 4, [750, 500, 250, 0]),
    ("trailing", 1, 10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("trailing", 0, 7, [999, 856, 713, 570, 428, 285, 142]),
    ("linspace", 1, 10, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ("linspace", 0, 7, [999, 832, 666, 500, 333, 166, 0]),
]


@pytest.mark.parametrize("spacing, offset, n, expected", EXPECTED_TIMESTEPS)
@pytest.mark.parametrize("sampler_class", [DDIMSampler, DDPMSampler])
def test_timesteps_match_diffusers(sampler_class, spacing, offset, n, expected):
    sampler = sampler_class(NoiseSchedule(), timestep_spacing=spacing, steps_offset=offset)
    sampler.set_timesteps(n)
    assert sampler.num_inference_steps == n
    assert sampler.timesteps.dtype == torch.long and sampler.timesteps.ndim == 1
    assert sampler.timesteps.tolist() == expected


def test_trailing_has_exactly_n_timesteps_and_ddpm_runs_all_1000():
    # np.arange(1000, 0, -1000/61) has 62 entries (the last is -6e-13, rounding to timestep -1).
    # 1000/61 = 16.39..., so the smallest timestep is round(1000 - 60 * 16.39...) - 1 = 16 - 1 = 15.
    sampler = DDIMSampler(NoiseSchedule(), timestep_spacing="trailing")
    sampler.set_timesteps(61)
    assert len(sampler.timesteps) == 61 and sampler.timesteps[-1].item() == 15
    ddpm = DDPMSampler(NoiseSchedule())  # default steps_offset=0
    ddpm.set_timesteps(1000)
    assert ddpm.timesteps.tolist() == list(range(999, -1, -1))
    assert ddpm.previous_timestep(500) == 499 and ddpm.previous_timestep(0) == -1


# ----------------------------------------------------------------------------- DDIM


def test_ddim_eta0_is_deterministic_and_uses_no_randomness():
    sampler = DDIMSampler(NoiseSchedule(), eta=0.0)
    sampler.set_timesteps(20)
    x, eps = make_x0_eps()
    t = sampler.timesteps[3]
    rng_state = torch.get_rng_state()
    a = sampler.step(eps, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = sampler.step(eps, t, x, generator=torch.Generator().manual_seed(2)).prev_sample
    c = sampler.step(eps, t, x).prev_sample
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global generator was not touched
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_perfect_model_lands_on_add_noise(prediction_type):
    """With the true ε, x̂_0 is x_0 and the η = 0 step is x_prev = sqrt(ᾱ_prev) x_0 + sqrt(1 - ᾱ_prev) ε,
    which is add_noise(x_0, ε, t_prev): eq. (12) moves along the same noise."""
    schedule = NoiseSchedule()
    sampler = DDIMSampler(schedule, prediction_type=prediction_type)
    sampler.set_timesteps(50)  # 981, 961, ..., 1
    x0, eps = make_x0_eps(dtype=torch.float64)
    for t, t_prev in [(981, 961), (501, 481), (21, 1), (1, 0)]:  # 1 -> 0: set_alpha_to_one=False uses ᾱ_0
        x_t = schedule.add_noise(x0, eps, t)
        true_output = {"epsilon": eps, "sample": x0, "v_prediction": schedule.get_velocity(x0, eps, t)}
        out = sampler.step(true_output[prediction_type], t, x_t)
        assert isinstance(out, SamplerOutput)
        torch.testing.assert_close(out.pred_original_sample, x0)
        torch.testing.assert_close(out.prev_sample, schedule.add_noise(x0, eps, t_prev))


def test_ddim_set_alpha_to_one_ends_on_x0():
    schedule = NoiseSchedule()
    sampler = DDIMSampler(schedule, set_alpha_to_one=True)
    sampler.set_timesteps(10)
    x0, eps = make_x0_eps(dtype=torch.float64)
    out = sampler.step(eps, 1, schedule.add_noise(x0, eps, 1))
    torch.testing.assert_close(out.prev_sample, x0)


def test_ddim_eta1_full_steps_variance_is_ddpm_posterior_variance():
    """Song eq. (16) with η = 1 and prev = t - 1 is β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t (Ho eq. 7)."""
    sampler = DDIMSampler(NoiseSchedule(), eta=1.0, timestep_spacing="trailing")
    sampler.set_timesteps(T)
    expected = [(1 - alpha_bar(t - 1)) / (1 - alpha_bar(t)) * BETAS[t] for t in range(T)]
    got = [sampler.variance(t) for t in range(T)]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
    assert sampler.variance(500) > 0


def test_ddim_step_adds_sigma_times_generator_noise():
    """The random part of a DDIM step is σ_t z, with σ_t² = variance(t) and z from the generator."""
    sampler_noisy = DDIMSampler(NoiseSchedule(), eta=0.7)
    sampler_clean = DDIMSampler(NoiseSchedule(), eta=0.7)
    for s in (sampler_noisy, sampler_clean):
        s.set_timesteps(25)
    x, eps = make_x0_eps(dtype=torch.float64)
    t = 601  # leading, n = 25: step 40, so prev = 561
    a = sampler_noisy.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    b = sampler_noisy.step(eps, t, x, generator=torch.Generator().manual_seed(6)).prev_sample
    z_a = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z_b = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sigma2 = 0.7**2 * (1 - alpha_bar(561)) / (1 - alpha_bar(601)) * (1 - alpha_bar(601) / alpha_bar(561))
    assert sampler_noisy.variance(t) == pytest.approx(sigma2, rel=1e-9)
    torch.testing.assert_close(a - b, math.sqrt(sigma2) * (z_a - z_b))
    # and the deterministic part is eq. (12) written out here
    x0_hat = (x - math.sqrt(1 - alpha_bar(601)) * eps) / math.sqrt(alpha_bar(601))
    mean = math.sqrt(alpha_bar(561)) * x0_hat + math.sqrt(1 - alpha_bar(561) - sigma2) * eps
    torch.testing.assert_close(a, mean + math.sqrt(sigma2) * z_a)


def test_ddim_eta1_all_steps_equals_ddpm():
    schedule = NoiseSchedule()
    ddim = DDIMSampler(schedule, eta=1.0, timestep_spacing="trailing")
    ddpm = DDPMSampler(schedule)
    ddim.set_timesteps(T)
    ddpm.set_timesteps(T)
    x, eps = make_x0_eps(dtype=torch.float64)
    for t in (999, 500, 1):  # at t = 0 they differ on purpose: DDIM lands on ᾱ_0, DDPM on x̂_0
        a = ddim.step(eps, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        b = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("n, t", [(T, 500), (10, 500), (10, 0)])
def test_ddpm_step_is_the_bayes_posterior(n, t):
    """q(x_prev | x_t, x_0) by Bayes' rule, not by eq. (7)'s closed form: the product of the
    Gaussians q(x_t | x_prev) = N(sqrt(α) x_prev, 1 - α), with α = ᾱ_t / ᾱ_prev, and
    q(x_prev | x_0) = N(sqrt(ᾱ_prev) x_0, 1 - ᾱ_prev) has precision α / (1 - α) + 1 / (1 - ᾱ_prev)."""
    sampler = DDPMSampler(NoiseSchedule(), prediction_type="sample")
    sampler.set_timesteps(n)
    x0, x_t = make_x0_eps(dtype=torch.float64)
    t_prev = t - T // n
    alpha = alpha_bar(t) / alpha_bar(t_prev)
    if t_prev < 0:  # last step: the posterior is a point mass on x_0
        mean, var = x0, 0.0
    else:
        precision = alpha / (1 - alpha) + 1 / (1 - alpha_bar(t_prev))
        weighted = math.sqrt(alpha) / (1 - alpha) * x_t + math.sqrt(alpha_bar(t_prev)) / (1 - alpha_bar(t_prev)) * x0
        mean, var = weighted / precision, 1 / precision
    assert sampler.variance(t) == pytest.approx(var, rel=1e-9, abs=1e-15)
    out = sampler.step(x0, t, x_t, generator=torch.Generator().manual_seed(4))
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(out.prev_sample, mean + math.sqrt(var) * z)
    torch.testing.assert_close(out.pred_original_sample, x0)


def test_ddpm_seeded_reproducibility():
    sampler = DDPMSampler(NoiseSchedule())
    sampler.set_timesteps(50)
    x, eps = make_x0_eps()

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        sample = x
        for t in sampler.timesteps[:5]:
            sample = sampler.step(eps, t, sample, generator=g).prev_sample
        return sample

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_ddpm_full_loop_with_perfect_x0_model_ends_at_x0():
    schedule = NoiseSchedule()
    sampler = DDPMSampler(schedule, prediction_type="sample")
    sampler.set_timesteps(T)
    x0, _ = make_x0_eps(shape=(1, 2, 3, 3), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x0.shape, generator=g, dtype=torch.float64) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        x = sampler.step(x0, t, x, generator=g).prev_sample
    torch.testing.assert_close(x, x0)


@pytest.mark.parametrize(
    "sampler",
    [DDPMSampler(NoiseSchedule()), DDIMSampler(NoiseSchedule(), eta=0.0), DDIMSampler(NoiseSchedule(), eta=1.0)],
    ids=["ddpm", "ddim-eta0", "ddim-eta1"],
)
def test_perfect_model_keeps_forward_marginals(sampler):
    """If x̂_0 is the true x_0, every step keeps x ~ q(x_prev | x_0) = N(sqrt(ᾱ_prev) x_0, 1 - ᾱ_prev):
    the property both papers build their samplers on (DDIM for any η, Song et al. sec. 4.1)."""
    schedule = sampler.schedule
    sampler.set_timesteps(20)
    n, x0_value = 20_000, 0.6
    x0 = torch.full((n,), x0_value, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = schedule.add_noise(x0, torch.randn(n, generator=g, dtype=torch.float64), sampler.timesteps[0])
    for t in sampler.timesteps:
        eps = schedule.predict_eps_from_x0(x, x0, t)  # the ε a perfect model would predict
        x = sampler.step(eps, t, x, generator=g).prev_sample
        t_prev = sampler.previous_timestep(t)
        if t_prev >= 0 or isinstance(sampler, DDPMSampler):
            a = alpha_bar(t_prev)  # DDPM's last step goes to ᾱ_{-1} = 1: x_0 itself
        else:
            a = alpha_bar(0)  # DDIM with set_alpha_to_one=False ends on ᾱ_0
        # standard errors: sqrt(1 / n) = 0.007 for the mean, sqrt(2 / n) var = 0.01 var for the variance
        assert x.mean().item() == pytest.approx(math.sqrt(a) * x0_value, abs=0.03)
        assert x.var().item() == pytest.approx(1 - a, abs=0.05 * (1 - a) + 1e-12)


def test_clip_sample_clamps_x0_and_dtype_follows_input():
    sampler = DDIMSampler(NoiseSchedule(), prediction_type="sample", clip_sample=True)
    sampler.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = sampler.step(torch.full_like(x, 3.0), 501, x)
    assert (out.pred_original_sample == 1.0).all()
    assert out.prev_sample.dtype == torch.float64 and out.pred_original_sample.dtype == torch.float64
    ddpm = DDPMSampler(NoiseSchedule())
    ddpm.set_timesteps(10)
    assert ddpm.step(x.float(), 900, x.float()).prev_sample.dtype == torch.float32


# ----------------------------------------------------------------------------- errors


def test_ddpm_steps_through_the_training_chain_before_set_timesteps():
    # diffusers' DDPMScheduler does, so a loop written for it runs unchanged: 1000 steps, 999 .. 0.
    schedule = NoiseSchedule()
    fresh = DDPMSampler(schedule)
    assert fresh.timesteps.tolist() == list(range(T - 1, -1, -1)) and fresh.num_inference_steps == T
    explicit = DDPMSampler(schedule)
    explicit.set_timesteps(T)
    x, eps = make_x0_eps()
    a, b = x, x
    for t in fresh.timesteps[:3]:
        a = fresh.step(eps, t, a, generator=torch.Generator().manual_seed(int(t))).prev_sample
        b = explicit.step(eps, t, b, generator=torch.Generator().manual_seed(int(t))).prev_sample
    assert torch.equal(a, b)


def test_a_diffusers_ddpm_loop_runs_unchanged_and_agrees():
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     clip_sample=False)
    ours = DDPMSampler(NoiseSchedule())

    def denoise(scheduler):  # a loop as diffusers' docs write it, no set_timesteps
        x0, _ = make_x0_eps(seed=3)
        sample = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
        generator = torch.Generator().manual_seed(5)
        for t in scheduler.timesteps[:50]:
            noise_pred = (sample - ALPHAS_CUMPROD[int(t)] ** 0.5 * x0) / (1 - ALPHAS_CUMPROD[int(t)]) ** 0.5
            sample = scheduler.step(noise_pred.float(), t, sample, generator=generator).prev_sample
        return sample

    torch.testing.assert_close(denoise(ours), denoise(theirs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler_class", [DDIMSampler, DDPMSampler])
def test_errors_name_the_argument(sampler_class):
    schedule = NoiseSchedule()
    sampler = sampler_class(schedule)
    x = torch.zeros(1, 4)
    if sampler_class is DDIMSampler:  # DDPM has its full chain before set_timesteps
        with pytest.raises(ValueError, match="set_timesteps"):
            sampler.step(x, 1, x)
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match=f"num_inference_steps must be an integer between 1 and 1000, got {bad}"):
            sampler.set_timesteps(bad)
    with pytest.raises(ValueError, match="timestep_spacing"):
        sampler_class(schedule, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="prediction_type"):
        sampler_class(schedule, prediction_type="eps")
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        sampler.step(x, 555, x)
    with pytest.raises(ValueError, match="model_output"):
        sampler.step(torch.zeros(1, 8), int(sampler.timesteps[0]), x)


def test_leading_offset_overflow_suggests_a_fix():
    sampler = DDIMSampler(NoiseSchedule())  # leading, steps_offset=1
    with pytest.raises(ValueError, match='steps_offset=1.*timestep 1000.*"trailing" or steps_offset=0'):
        sampler.set_timesteps(T)
    sampler.set_timesteps(999)  # T // 999 = 1: 998 + 1 = 999 still fits
    assert sampler.timesteps[0].item() == 999


def test_bad_eta_and_schedule():
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(NoiseSchedule(), eta=-0.1)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        DDIMSampler("scaled_linear")
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule("sigmoid")
