"""Rectified flow (flow.py) and its samplers (samplers/flow_match.py): the path and velocity against their
formulas, logit-normal σ, the time shift, diffusers' FlowMatchEuler/Heun timesteps and chains on a
nonlinear toy model, exactness on straight paths, and the switch through LatentDiffusion (training loss by
hand, generate, guidance, save/load, the sampler checks, errors)."""

import math

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm

from minildm import (
    DDIMSampler,
    FlowMatchEulerSampler,
    FlowMatchHeunSampler,
    FlowMatchSchedule,
    LatentDiffusion,
    NoiseSchedule,
    TrainingConfig,
    time_shift,
    train_ldm,
)


def toy_velocity(x, t):
    return 0.9 * torch.tanh(1.3 * x + 0.001 * float(t))


def run(sampler, n, x, model=toy_velocity):
    sampler.set_timesteps(n)
    for t in sampler.timesteps:
        x = sampler.step(model(x, t), t, x).prev_sample
    return x


def noise(shape=(2, 4, 5, 5), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_the_path_its_velocity_and_x0():
    schedule = FlowMatchSchedule()
    x0, eps = noise(seed=1), noise(seed=2)
    sigmas = torch.tensor([0.0, 0.3])
    x_t = schedule.add_noise(x0, eps, sigmas)
    torch.testing.assert_close(x_t[0], x0[0])  # σ = 0: the data
    torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * eps[1])
    torch.testing.assert_close(schedule.add_noise(x0, eps, 1.0), eps)  # σ = 1: the noise
    velocity = schedule.get_velocity(x0, eps)
    torch.testing.assert_close(velocity, eps - x0)
    # the velocity is the path's derivative: a finite difference along σ
    h = 1e-3
    derivative = (schedule.add_noise(x0, eps, 0.5 + h) - schedule.add_noise(x0, eps, 0.5 - h)) / (2 * h)
    torch.testing.assert_close(derivative, velocity, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(schedule.predict_x0(x_t, velocity, sigmas), x0)


def test_logit_normal_sigmas():
    schedule = FlowMatchSchedule(logit_mean=0.5, logit_std=0.8)
    sigmas = schedule.sample_sigmas(20000, torch.Generator().manual_seed(0))
    assert sigmas.shape == (20000,) and ((sigmas > 0) & (sigmas < 1)).all()
    logits = torch.log(sigmas / (1 - sigmas))
    assert logits.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logits.std().item() == pytest.approx(0.8, abs=0.03)
    again = schedule.sample_sigmas(20000, torch.Generator().manual_seed(0))
    assert torch.equal(sigmas, again)


def test_time_shift():
    sigmas = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = time_shift(sigmas, 3.0)
    torch.testing.assert_close(shifted, 3 * sigmas / (1 + 2 * sigmas))
    assert shifted[0] == 0 and shifted[-1] == 1 and shifted[5].item() == pytest.approx(0.75)
    assert (shifted[1:-1] > sigmas[1:-1]).all()  # towards the noise
    torch.testing.assert_close(time_shift(sigmas, 1.0), sigmas)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 5, 10, 28])
@pytest.mark.parametrize("kind", ["euler", "heun"])
def test_timesteps_and_chains_match_diffusers(shift, n, kind):
    diffusers = pytest.importorskip("diffusers")
    if kind == "euler":
        ours = FlowMatchEulerSampler(FlowMatchSchedule(), shift=shift)
        theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    else:
        ours = FlowMatchHeunSampler(FlowMatchSchedule(), shift=shift)
        theirs = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=1e-3)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=1e-6)
    assert len(ours.timesteps) == (n if kind == "euler" else 2 * n - 1)
    x = noise()
    y = x.clone()
    for t, u in zip(ours.timesteps, theirs.timesteps):
        x = ours.step(toy_velocity(x, t), t, x).prev_sample
        y = theirs.step(toy_velocity(y, u), u, y).prev_sample
    assert ((x - y).abs().max() / y.abs().max()).item() < 2e-5


@pytest.mark.parametrize("sampler_class", [FlowMatchEulerSampler, FlowMatchHeunSampler])
@pytest.mark.parametrize("n", [1, 3, 10])
def test_a_straight_path_is_followed_exactly(sampler_class, n):
    """For data that is one point c, the true velocity at x_σ is (x_σ - c) / σ, the same all along the line
    from ε to c: any number of Euler or Heun steps lands on c."""
    c = torch.full((1, 4, 3, 3), 0.4, dtype=torch.float64)
    sampler = sampler_class(FlowMatchSchedule(), shift=3.0)

    def exact(x, t):
        return (x - c) / (float(t) / 1000)

    torch.testing.assert_close(run(sampler, n, noise((1, 4, 3, 3), dtype=torch.float64), exact), c)


def test_heun_is_more_accurate_than_euler_per_step():
    schedule = FlowMatchSchedule()
    x = noise(dtype=torch.float64)
    reference = run(FlowMatchEulerSampler(schedule), 2000, x.clone())
    euler = run(FlowMatchEulerSampler(schedule), 10, x.clone())
    heun = run(FlowMatchHeunSampler(schedule), 10, x.clone())
    assert (heun - reference).abs().mean() < 0.2 * (euler - reference).abs().mean()


def test_sampler_errors():
    schedule = FlowMatchSchedule()
    with pytest.raises(TypeError, match="FlowMatchSchedule"):
        FlowMatchEulerSampler(NoiseSchedule())
    with pytest.raises(ValueError, match="shift"):
        FlowMatchEulerSampler(schedule, shift=0)
    sampler = FlowMatchEulerSampler(schedule)
    with pytest.raises(ValueError, match="set_timesteps"):
        sampler.step(torch.zeros(1, 4, 2, 2), 1000.0, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        sampler.set_timesteps(0)
    sampler.set_timesteps(2)
    with pytest.raises(ValueError, match="expects timestep 1000"):
        sampler.step(torch.zeros(1, 4, 2, 2), sampler.timesteps[1], torch.zeros(1, 4, 2, 2))
    x = torch.zeros(1, 4, 2, 2)
    for t in sampler.timesteps:
        x = sampler.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="all 2 steps"):
        sampler.step(torch.zeros_like(x), sampler.timesteps[-1], x)
    sampler.set_timesteps(2)
    with pytest.raises(ValueError, match="shape"):
        sampler.step(torch.zeros(1, 4, 3, 3), sampler.timesteps[0], x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedule.add_noise(x, x, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="logit_std"):
        FlowMatchSchedule(logit_std=0)


# ---- through LatentDiffusion ------------------------------------------------------------------------------


def test_the_flow_training_loss_by_hand():
    ldm = make_tiny_ldm("flow_prediction")
    latents, eps = noise((3, 4, 4, 4), seed=3), noise((3, 4, 4, 4), seed=4)
    timesteps = torch.tensor([10.0, 500.0, 990.0])
    dropped = torch.tensor([False, True, False])
    loss = ldm.diffusion_loss(latents, CAPTIONS, timesteps, eps, dropped)
    sigma = (timesteps / 1000).view(3, 1, 1, 1)
    captions = [CAPTIONS[0], ldm.conditioner.null_condition, CAPTIONS[2]]
    out = ldm.backbone((1 - sigma) * latents + sigma * eps, timesteps, ldm.conditioner.encode(captions))
    torch.testing.assert_close(loss, ((out - (eps - latents)) ** 2).mean())


def test_flow_training_draws_logit_normal_timesteps():
    ldm = make_tiny_ldm("flow_prediction")
    timesteps, _, _ = ldm.draw_training_noise((4000, 4, 4, 4), 0.1, torch.Generator().manual_seed(0))
    assert timesteps.dtype == torch.float32 and ((timesteps > 0) & (timesteps < 1000)).all()
    sigmas = timesteps / 1000
    assert torch.log(sigmas / (1 - sigmas)).std().item() == pytest.approx(1.0, abs=0.05)


def test_a_flow_model_trains_samples_saves_and_loads(tmp_path):
    ldm = make_tiny_ldm("flow_prediction")
    assert ldm.is_flow and isinstance(ldm.make_sampler(), FlowMatchEulerSampler)
    history = train_ldm(ldm, torch.rand(6, 3, 16, 16) * 2 - 1, CAPTIONS * 2,
                        TrainingConfig(steps=3, batch_size=4, progress=False))
    assert len(history["loss"]) == 3 and all(math.isfinite(x) for x in history["loss"])
    for name in ("euler", "heun"):
        out = ldm.generate(CAPTIONS[:2], 4, sampler=ldm.make_sampler(name, shift=2.0),
                           generator=torch.Generator().manual_seed(0), return_intermediates=True)
        assert out.images.shape == (2, 3, 16, 16) and 0 <= out.images.min() and out.images.max() <= 1
        assert out.timesteps[0] == 1000.0 and len(out.timesteps) == (4 if name == "euler" else 7)
    guided = ldm.generate(CAPTIONS[:2], 4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    unguided = ldm.generate(CAPTIONS[:2], 4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(guided, unguided)
    ldm.save(tmp_path / "flow")
    loaded = LatentDiffusion.load(tmp_path / "flow")
    assert isinstance(loaded.schedule, FlowMatchSchedule) and loaded.prediction_type == "flow_prediction"
    torch.testing.assert_close(loaded.generate(CAPTIONS[:2], 4, guidance_scale=3.0,
                                               generator=torch.Generator().manual_seed(0)), guided, rtol=0, atol=0)


def test_the_switch_refuses_mixed_families():
    ldm = make_tiny_ldm("flow_prediction")
    with pytest.raises(ValueError, match="flow"):
        make_tiny_ldm("epsilon", schedule=FlowMatchSchedule())
    with pytest.raises(ValueError, match="flow_prediction"):
        make_tiny_ldm("flow_prediction", schedule=NoiseSchedule())
    with pytest.raises(ValueError, match="diffusion models"):
        ldm.make_sampler("ddim")
    with pytest.raises(ValueError, match="is a rectified flow, but DDIMSampler samples a diffusion model"):
        ldm.generate(CAPTIONS[:1], 2, sampler=DDIMSampler(NoiseSchedule()))
    diffusion = make_tiny_ldm("v_prediction")
    with pytest.raises(ValueError, match="is a diffusion model, but FlowMatchEulerSampler"):
        diffusion.generate(CAPTIONS[:1], 2, sampler=FlowMatchEulerSampler(FlowMatchSchedule()))
    with pytest.raises(ValueError, match="another noise schedule"):
        ldm.generate(CAPTIONS[:1], 2, sampler=FlowMatchEulerSampler(FlowMatchSchedule(num_train_timesteps=500)))
