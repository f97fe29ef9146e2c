"""Tests for minildm/schedule.py: each formula checked against an independent computation."""

import math

import numpy as np
import pytest
import torch

from minildm.schedule import BETA_SCHEDULES, PREDICTION_TYPES, NoiseSchedule

T = 1000


def reference_betas(name, T=1000, beta_start=0.00085, beta_end=0.012):
    """Betas written out in numpy, one python loop for cosine, as in the papers."""
    if name == "linear":
        return np.linspace(beta_start, beta_end, T)
    if name == "scaled_linear":
        return np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), T) ** 2
    # Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2)
    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_betas_match_numpy(name):
    schedule = NoiseSchedule(name)
    assert schedule.betas.dtype == torch.float64 and schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.betas.shape == (T,)
    np.testing.assert_allclose(schedule.betas.numpy(), reference_betas(name), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(schedule.alphas.numpy(), 1 - reference_betas(name), rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - reference_betas(name)), rtol=1e-10)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_alphas_cumprod_decreasing_in_unit_interval(name):
    alpha_bar = NoiseSchedule(name).alphas_cumprod
    assert (alpha_bar > 0).all() and (alpha_bar < 1).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()


def test_linear_uses_given_endpoints_and_cosine_is_capped():
    linear = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    scaled = NoiseSchedule("scaled_linear")
    assert scaled.betas[0].item() == pytest.approx(0.00085) and scaled.betas[-1].item() == pytest.approx(0.012)
    cosine = NoiseSchedule("cosine")
    assert cosine.betas.max().item() == pytest.approx(0.999)  # the cap is reached at t = T-1
    assert cosine.betas[-1].item() == pytest.approx(0.999)


def test_add_noise_exact_formula_and_broadcasting():
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.add_noise(x0, noise, t)
    assert x_t.shape == x0.shape and x_t.dtype == torch.float32
    for i, ti in enumerate(t.tolist()):
        a = float(np.cumprod(1 - reference_betas("scaled_linear"))[ti])
        expected = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]  # Ho eq. 4
        torch.testing.assert_close(x_t[i], expected, rtol=1e-5, atol=1e-6)
    # A python int means the same t for every sample, any rank works.
    torch.testing.assert_close(schedule.add_noise(x0, noise, 500)[1], x_t[1])
    x_t_flat = schedule.add_noise(x0.flatten(1), noise.flatten(1), t)  # (B, D)
    torch.testing.assert_close(x_t_flat, x_t.flatten(1))
    # dtype follows the input
    assert schedule.add_noise(x0.double(), noise.double(), t).dtype == torch.float64


def test_add_noise_matches_iterating_the_forward_process():
    """q(x_t | x_0) in one jump has the same mean and variance as t small steps of Ho eq. 2."""
    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    betas = reference_betas("linear", beta_start=1e-4, beta_end=0.02)
    rng = np.random.default_rng(0)
    n, x0_value, checkpoints = 20_000, 0.8, {10, 200, 600, 999}
    x = np.full(n, x0_value)  # float64
    iterated = {}
    for t in range(T):
        x = np.sqrt(1 - betas[t]) * x + np.sqrt(betas[t]) * rng.standard_normal(n)  # Ho eq. 2
        if t in checkpoints:
            iterated[t] = (x.mean(), x.var())

    x0 = torch.full((n,), x0_value, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for t, (it_mean, it_var) in iterated.items():
        jumped = schedule.add_noise(x0, torch.randn(n, generator=g, dtype=torch.float64), t)
        # With n = 20000 the standard error of a mean is sqrt(var / n) <= 0.007 and that of a
        # variance is var * sqrt(2 / n) = 0.01 var; tolerances are about 5 standard errors.
        # (The seeds are fixed, so the test is deterministic; the tolerances say why it passes.)
        assert jumped.mean().item() == pytest.approx(it_mean, abs=0.05)
        assert jumped.var().item() == pytest.approx(it_var, abs=0.07 * max(it_var, 0.1))
        # ...and both agree with the closed form sqrt(ᾱ_t) x_0, 1 - ᾱ_t
        alpha_bar = np.prod(1 - betas[: t + 1])
        assert it_mean == pytest.approx(math.sqrt(alpha_bar) * x0_value, abs=0.035)
        assert it_var == pytest.approx(1 - alpha_bar, abs=0.05 * max(1 - alpha_bar, 0.1))


def test_snr_formula_and_decreasing():
    schedule = NoiseSchedule()
    t = torch.arange(T)
    alpha_bar = np.cumprod(1 - reference_betas("scaled_linear"))
    snr = schedule.snr(t)
    assert snr.shape == (T,) and snr.dtype == torch.float32
    np.testing.assert_allclose(snr.numpy(), alpha_bar / (1 - alpha_bar), rtol=1e-6)
    assert (snr[1:] < snr[:-1]).all()
    assert schedule.snr(5).item() == pytest.approx(snr[5].item())


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_conversions_invert_each_other(name):
    schedule = NoiseSchedule(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 250, 700, 990])  # cosine's t = 999 has ᾱ ~ 1e-9: dividing by sqrt(ᾱ) is ill-posed
    x_t = schedule.add_noise(x0, eps, t)
    v = schedule.get_velocity(x0, eps, t)
    close = dict(rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(schedule.predict_x0_from_eps(x_t, eps, t), x0, **close)
    torch.testing.assert_close(schedule.predict_eps_from_x0(x_t, x0, t), eps, **close)
    torch.testing.assert_close(schedule.predict_x0_from_v(x_t, v, t), x0, **close)
    torch.testing.assert_close(schedule.predict_eps_from_v(x_t, v, t), eps, **close)
    # v by its definition (Salimans & Ho 2022): v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    # each prediction type gives back the same (x_0, ε)
    outputs = {"epsilon": eps, "sample": x0, "v_prediction": v}
    assert set(outputs) == set(PREDICTION_TYPES)
    for prediction_type, model_output in outputs.items():
        got_x0, got_eps = schedule.to_x0_and_eps(model_output, x_t, t, prediction_type)
        torch.testing.assert_close(got_x0, x0, **close)
        torch.testing.assert_close(got_eps, eps, **close)


def test_conversions_follow_input_dtype():
    schedule = NoiseSchedule()
    x = torch.randn(2, 3, dtype=torch.float16)
    assert schedule.predict_x0_from_eps(x, x, torch.tensor([3, 4])).dtype == torch.float16
    assert schedule.get_velocity(x.float(), x.float(), 7).dtype == torch.float32
    assert schedule.predict_x0_from_eps(x, x, 7).dtype == torch.float16
    assert schedule.add_noise(x.bfloat16(), x.bfloat16(), 7).dtype == torch.bfloat16


@pytest.mark.parametrize("t", [0, 480, 999])
def test_one_timestep_for_all_agrees_with_one_per_sample(t):
    """A sampler passes one int for the whole batch (taken as a python float) and training one timestep per
    sample (gathered as a tensor): the two paths give the same numbers."""
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(t)
    x, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    per_sample = torch.full((3,), t)
    for one in (t, torch.tensor(t)):
        torch.testing.assert_close(schedule.add_noise(x, eps, one), schedule.add_noise(x, eps, per_sample),
                                   rtol=1e-6, atol=1e-6)
        for prediction_type in PREDICTION_TYPES:
            for got, want in zip(schedule.to_x0_and_eps(eps, x, one, prediction_type),
                                 schedule.to_x0_and_eps(eps, x, per_sample, prediction_type)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # 1/sqrt(1 - ᾱ_0) = 100 amplifies


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(beta_schedule="squaredcos"), "beta_schedule"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
        (dict(beta_start=0.0), "beta_start"),
        (dict(beta_end=1.5), "beta_end"),
        (dict(beta_start=0.02, beta_end=0.01), "beta_start"),
    ],
)
def test_bad_arguments_raise(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        NoiseSchedule(**kwargs)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'linear', 'scaled_linear', 'cosine'"):
        NoiseSchedule("quadratic")


def test_bad_timesteps_raise():
    schedule = NoiseSchedule()
    x = torch.zeros(2, 3)
    for bad in (torch.tensor([0, 1000]), torch.tensor([-1, 3]), 1000):
        with pytest.raises(ValueError, match="between 0 and 999"):
            schedule.add_noise(x, x, bad)
    with pytest.raises(ValueError, match="integer"):
        schedule.add_noise(x, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="one timestep per sample"):
        schedule.add_noise(x, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="prediction_type"):
        schedule.to_x0_and_eps(x, x, 3, "eps")


def test_repr_names_the_schedule():
    text = repr(NoiseSchedule("linear", 50, 1e-4, 0.02))
    assert "beta_schedule='linear'" in text and "num_train_timesteps=50" in text and "0.02" in text
