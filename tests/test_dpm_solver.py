"""DPM-Solver++(2M) (samplers/dpm_solver.py): Algorithm 2 of Lu et al. 2022 written out here, diffusers'
DPMSolverMultistepScheduler's timesteps and chains on a nonlinear toy model (ε and v, zero terminal SNR
included), exactness on a model that knows x_0, the API's sampler checks, errors."""

import math

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm

from minildm import DDIMSampler, DPMSolverMultistepSampler, NoiseSchedule


def toy_model(x, t):
    """Nonlinear in x and t, bounded: a stand-in network whose chain tells solvers apart."""
    return 0.9 * torch.tanh(1.3 * x + 0.001 * float(t))


def run(sampler, n, x):
    sampler.set_timesteps(n)
    for t in sampler.timesteps:
        x = sampler.step(toy_model(x, t), t, x).prev_sample
    return x


def start_noise():
    return torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_timesteps_and_chains_match_diffusers(zero_snr, prediction_type, spacing, n):
    diffusers = pytest.importorskip("diffusers")
    ours = DPMSolverMultistepSampler(NoiseSchedule(rescale_betas_zero_snr=zero_snr), timestep_spacing=spacing,
                                     prediction_type=prediction_type)
    theirs = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                   timestep_spacing=spacing, prediction_type=prediction_type,
                                                   rescale_betas_zero_snr=zero_snr)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x = start_noise().float()
    y = x.clone()
    for t in ours.timesteps:
        x = ours.step(toy_model(x, t), t, x).prev_sample
        y = theirs.step(toy_model(y, t), t, y).prev_sample
    # diffusers keeps its sigmas in float32: agreement to float32 precision, relative to the sample's size
    assert ((x - y).abs().max() / y.abs().max()).item() < 1e-5


def algorithm_2(schedule, timesteps, x):
    """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)) for an ε-model, written from the paper, float64:
    α = sqrt(ᾱ), σ = sqrt(1 - ᾱ), λ = log(α / σ); the first step and the last (to σ = 0) are first order."""
    abar = schedule.alphas_cumprod.tolist()
    ts = list(timesteps) + [None]  # None: the clean end, α = 1, σ = 0
    previous = None
    for i, t in enumerate(ts[:-1]):
        a, s = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        x0 = (x - s * toy_model(x, t)) / a
        nxt = ts[i + 1]
        if nxt is None:
            return x0
        a_n, s_n = math.sqrt(abar[nxt]), math.sqrt(1 - abar[nxt])
        h = math.log(a_n / s_n) - math.log(a / s)
        if previous is None or (i == len(ts) - 2 and len(timesteps) < 15):
            d = x0
        else:
            t_prev, x0_prev = previous
            h_prev = math.log(a / s) - math.log(math.sqrt(abar[t_prev]) / math.sqrt(1 - abar[t_prev]))
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = (s_n / s) * x - a_n * (math.exp(-h) - 1) * d
        previous = (t, x0)
    return x


@pytest.mark.parametrize("n", [3, 10, 20])
def test_step_is_algorithm_2(n):
    sampler = DPMSolverMultistepSampler(NoiseSchedule(), timestep_spacing="trailing")
    x = start_noise()
    sampler.set_timesteps(n)
    torch.testing.assert_close(run(sampler, n, x.clone()), algorithm_2(sampler.schedule, sampler.timesteps.tolist(), x),
                               rtol=1e-10, atol=1e-10)


def test_first_order_is_ddim():
    """DPM-Solver++1 is DDIM (Lu et al. 2022, sec. 4.1): the same chain to float64 precision."""
    schedule = NoiseSchedule()
    dpm = DPMSolverMultistepSampler(schedule, solver_order=1, timestep_spacing="trailing")
    ddim = DDIMSampler(schedule, timestep_spacing="trailing", set_alpha_to_one=True)
    x = start_noise()
    torch.testing.assert_close(run(dpm, 10, x.clone()), run(ddim, 10, x.clone()), rtol=1e-10, atol=1e-10)


def test_second_order_beats_first_order_on_a_smooth_ode():
    """The exact ODE solution of a model that knows the data x_0 = c is reached by any solver; on the toy model
    DPM-Solver++(2M) at 10 steps is nearer a 500-step reference than DDIM at 10 steps."""
    schedule = NoiseSchedule()
    x = start_noise()
    reference = run(DDIMSampler(schedule, timestep_spacing="trailing", set_alpha_to_one=True), 500, x.clone())
    dpm = run(DPMSolverMultistepSampler(schedule, timestep_spacing="trailing"), 10, x.clone())
    ddim = run(DDIMSampler(schedule, timestep_spacing="trailing", set_alpha_to_one=True), 10, x.clone())
    assert (dpm - reference).abs().mean() < 0.5 * (ddim - reference).abs().mean()


def test_a_model_that_knows_x0_lands_on_it():
    schedule = NoiseSchedule()
    target = torch.full((1, 4, 3, 3), 0.3, dtype=torch.float64)
    sampler = DPMSolverMultistepSampler(schedule, prediction_type="sample")
    x = start_noise()[:1, :, :3, :3]
    sampler.set_timesteps(7)
    for t in sampler.timesteps:
        x = sampler.step(target, t, x).prev_sample
    torch.testing.assert_close(x, target)


def test_through_generate_and_the_api_checks():
    ldm = make_tiny_ldm("v_prediction")
    sampler = ldm.make_sampler("dpm_solver")
    assert isinstance(sampler, DPMSolverMultistepSampler) and sampler.timestep_spacing == "trailing"
    first = ldm.generate(CAPTIONS[:2], 10, sampler=sampler, generator=torch.Generator().manual_seed(0))
    again = ldm.generate(CAPTIONS[:2], 10, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)  # set_timesteps forgets the previous run's x̂_0
    with pytest.raises(ValueError, match="prediction_type"):
        ldm.generate(CAPTIONS[:1], 3, sampler=DPMSolverMultistepSampler(ldm.schedule))
    with pytest.raises(ValueError, match="euler"):
        ldm.make_sampler("euler")


def test_errors():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepSampler(schedule, solver_order=3)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DPMSolverMultistepSampler(schedule, final_sigmas_type="one")
    sampler = DPMSolverMultistepSampler(schedule)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        sampler.set_timesteps(0)
    with pytest.raises(ValueError, match="repeats"):
        sampler.set_timesteps(1000)  # linspace over 1000 + 1 points repeats a timestep
    with pytest.raises(ValueError, match="set_timesteps"):
        DPMSolverMultistepSampler(schedule).step(torch.zeros(1, 4, 2, 2), 999, torch.zeros(1, 4, 2, 2))
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of"):
        sampler.step(torch.zeros(1, 4, 2, 2), 501, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        sampler.step(torch.zeros(1, 4, 2, 2), int(sampler.timesteps[0]), torch.zeros(1, 4, 3, 3))
    assert np.all(np.diff(sampler.timesteps.numpy()) < 0)
