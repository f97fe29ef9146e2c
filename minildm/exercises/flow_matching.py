"""Exercises of notebook 10, flow matching: the straight path and its velocity, the time shift of the sampling σ,
and one Euler and one Heun step of the flow's ODE.

Notation as in flow.py and samplers/flow_match.py: σ in [0, 1] (0 = data, 1 = noise), x_σ = (1 - σ) x_0 + σ ε,
v = ε - x_0, σ_next the next (smaller) σ of the sampling loop, T = 1000. Each solution below is the code of the
notebook's solution cell (between # BEGIN SOLUTION and # END SOLUTION); each Mistake is a wrong answer students
write, with the hint it earns. minildm's own code is the reference: FlowMatchSchedule.add_noise and get_velocity,
flow.time_shift, FlowMatchEulerSampler.step and FlowMatchHeunSampler.step, driven through their public loop.
"""

from __future__ import annotations

import torch

from ..flow import FlowMatchSchedule
from ..flow import time_shift as minildm_time_shift
from ..samplers import FlowMatchEulerSampler, FlowMatchHeunSampler
from .core import Exercise, Mistake

SCHEDULE = FlowMatchSchedule()  # T = 1000, as the notebook's model
SOURCE_LIU = "Liu et al. 2022 (arXiv:2209.03003)"
SOURCE_ESSER = "Esser et al. 2024 (arXiv:2403.03206)"


def _samples(seed: int, count: int, shape=(4, 3, 5, 2)):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


# ---- the straight path and its velocity -------------------------------------------------------------------------


def flow_path(x0, noise, sigmas):
    # BEGIN SOLUTION
    sigma = sigmas.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1): one σ per sample
    x_sigma = (1 - sigma) * x0 + sigma * noise  # the straight line from x_0 (σ = 0) to ε (σ = 1)
    velocity = noise - x0  # dx_σ / dσ = ε - x_0: the same at every σ
    return x_sigma, velocity
    # END SOLUTION


def _path_cases(seed):
    x0, noise = _samples(seed, 2)
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor([0.0, 0.35, 0.8, 1.0], dtype=torch.float64)  # both ends of the path
    drawn = torch.sigmoid(torch.randn(4, generator=g, dtype=torch.float64))  # logit-normal, as training draws them
    x0_other, noise_other = _samples(seed + 10, 2, shape=(3, 2, 4, 6))
    return [{"x0": x0, "noise": noise, "sigmas": ends}, {"x0": x0, "noise": noise, "sigmas": drawn},
            {"x0": x0_other, "noise": noise_other, "sigmas": torch.rand(3, generator=g, dtype=torch.float64)}]


def _schedule_path(x0, noise, sigmas):
    return SCHEDULE.add_noise(x0, noise, sigmas), SCHEDULE.get_velocity(x0, noise)


def _path_mistake(swapped=False, square_roots=False, velocity="eps - x0"):
    def path(x0, noise, sigmas):
        sigma = sigmas.view(-1, 1, 1, 1)
        if swapped:
            x_sigma = sigma * x0 + (1 - sigma) * noise
        elif square_roots:
            x_sigma = (1 - sigma).sqrt() * x0 + sigma.sqrt() * noise
        else:
            x_sigma = (1 - sigma) * x0 + sigma * noise
        targets = {"eps - x0": noise - x0, "x0 - eps": x0 - noise, "eps": noise,
                   "sigma (eps - x0)": sigma * (noise - x0)}
        return x_sigma, targets[velocity]
    return path


FLOW_PATH = Exercise(
    name="flow_path", notebook="10_flow_matching",
    task="flow_path(x0, noise, sigmas) -> (x_sigma, velocity), both (B, C, H, W): the point at σ on the straight "
         "path from the data x0 (σ = 0) to the noise ε (σ = 1), and the velocity dx_σ/dσ along it, the network's "
         "target. sigmas is (B,), one σ in [0, 1] per sample.",
    source=f"{SOURCE_LIU}, section 2 (X_t = t X_1 + (1 - t) X_0, velocity X_1 - X_0); {SOURCE_ESSER}, section 2: "
           "x_σ = (1 - σ) x_0 + σ ε, v = ε - x_0",
    solution=flow_path, cases=_path_cases, reference=_schedule_path,
    mistakes=(
        Mistake("the ends are swapped: σ = 0 must give the data x_0 and σ = 1 the noise ε, so x_σ = (1 - σ) x_0 + σ ε",
                _path_mistake(swapped=True)),
        Mistake("the velocity points the wrong way: x_σ moves from x_0 towards ε as σ grows, dx_σ/dσ = ε - x_0 "
                "(sampling then walks it backwards, from σ = 1 to 0)", _path_mistake(velocity="x0 - eps")),
        Mistake("those square roots make diffusion's curved path, sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε with ᾱ = 1 - σ; the "
                "flow's path is the straight line (1 - σ) x_0 + σ ε", _path_mistake(square_roots=True)),
        Mistake("ε is the target of ε-prediction; the flow's network predicts the velocity dx_σ/dσ = ε - x_0",
                _path_mistake(velocity="eps")),
        Mistake("σ (ε - x_0) = x_σ - x_0 is how far the path has come, not its velocity: the derivative of "
                "(1 - σ) x_0 + σ ε in σ is ε - x_0, the same at every σ", _path_mistake(velocity="sigma (eps - x0)")),
    ),
)


# ---- the time shift ---------------------------------------------------------------------------------------------


def time_shift(sigmas, shift):
    # BEGIN SOLUTION
    return shift * sigmas / (1 + (shift - 1) * sigmas)  # σ' = s σ / (1 + (s - 1) σ): 0 and 1 stay where they are
    # END SOLUTION


def _shift_cases(seed):
    g = torch.Generator().manual_seed(200 + seed)
    return [{"sigmas": torch.linspace(0, 1, 11, dtype=torch.float64), "shift": 3.0},
            {"sigmas": torch.rand(3, 5, generator=g, dtype=torch.float64), "shift": 0.5 + seed},
            {"sigmas": torch.rand(7, generator=g, dtype=torch.float64), "shift": 1.0},
            {"sigmas": torch.rand(6, generator=g, dtype=torch.float64), "shift": 6.0 - 2.5 * seed}]


def _shift_mistake(kind):
    def shift_sigmas(sigmas, shift):
        if kind == "inverse":  # the shift by 1 / shift
            return sigmas / (shift - (shift - 1) * sigmas)
        if kind == "no numerator":
            return sigmas / (1 + (shift - 1) * sigmas)
        if kind == "shift in the denominator":
            return shift * sigmas / (1 + shift * sigmas)
        return (shift * sigmas).clamp(max=1)  # a scale
    return shift_sigmas


TIME_SHIFT = Exercise(
    name="time_shift", notebook="10_flow_matching",
    task="time_shift(sigmas, shift) -> the shifted σ' (same shape as sigmas, any shape, values in [0, 1]), for a "
         "shift > 0 (a float): σ = 0 and σ = 1 stay in place and, for shift > 1, every σ in between moves towards 1.",
    source=f"{SOURCE_ESSER}, section 5.3.2 (resolution-dependent shifting of timestep schedules): "
           "σ' = shift · σ / (1 + (shift - 1) · σ)",
    solution=time_shift, cases=_shift_cases, reference=minildm_time_shift,
    mistakes=(
        Mistake("this moves σ towards 0 (less noise) for shift > 1: it is the shift by 1 / shift. "
                "σ' = shift · σ / (1 + (shift - 1) · σ)", _shift_mistake("inverse")),
        Mistake("the factor shift in the numerator is missing: without it σ = 1 goes to 1 / shift, and sampling would "
                "not start from pure noise", _shift_mistake("no numerator")),
        Mistake("the denominator is 1 + (shift - 1) · σ: with shift · σ, σ = 1 goes to shift / (1 + shift), not 1",
                _shift_mistake("shift in the denominator")),
        Mistake("the shift is not a scale: shift · σ, clamped at 1, sends every σ above 1 / shift to pure noise; "
                "σ' = shift · σ / (1 + (shift - 1) · σ) bends the schedule and keeps it inside [0, 1]",
                _shift_mistake("scale")),
    ),
)


# ---- one Euler step -----------------------------------------------------------------------------------------------


def euler_step(velocity, sample, sigma, sigma_next):
    # BEGIN SOLUTION
    return sample + (sigma_next - sigma) * velocity  # x_{σ_next} = x_σ + (σ_next - σ) v, with σ_next < σ
    # END SOLUTION


# The samplers whose steps the cases take: (num_inference_steps, shift, num_train_timesteps). The last step goes from
# the shifted σ = 1/T to 0; a schedule with a small T makes that step long enough for its mistakes to show.
EULER_SETTINGS = ((10, 1.0, 1000), (7, 3.0, 1000), (5, 0.5, 20))


def _sampler(sampler_class, n: int, shift: float, T: int):
    sampler = sampler_class(FlowMatchSchedule(num_train_timesteps=T), shift=shift)
    sampler.set_timesteps(n)
    return sampler


def _step_sigmas(n: int, shift: float, T: int) -> list[float]:
    """The n + 1 values of σ an n-step flow sampler goes through, from 1 to 0, as python floats."""
    return _sampler(FlowMatchEulerSampler, n, shift, T).sigmas.tolist()


def _euler_cases(seed):
    velocity, sample = _samples(seed, 2, shape=(2, 3, 5, 4))
    g = torch.Generator().manual_seed(300 + seed)
    cases = []
    for setting, step in ((0, 0), (1, "middle"), (2, -1), (0, "middle"), (1, -1)):
        sigmas = _step_sigmas(*EULER_SETTINGS[setting])
        k = int(torch.randint(1, len(sigmas) - 2, (), generator=g)) if step == "middle" else step % (len(sigmas) - 1)
        cases.append({"velocity": velocity, "sample": sample, "sigma": sigmas[k], "sigma_next": sigmas[k + 1]})
    return cases


def _find_step(sigma, sigma_next, settings) -> tuple[tuple, int]:
    """(the setting, k): the setting whose k-th step goes from sigma to sigma_next."""
    for setting in settings:
        sigmas = _step_sigmas(*setting)
        for k in range(setting[0]):
            if (sigmas[k], sigmas[k + 1]) == (sigma, sigma_next):
                return setting, k
    raise ValueError(f"no step from σ = {sigma} to {sigma_next} in {settings}")


def _sampler_euler_step(velocity, sample, sigma, sigma_next):
    """FlowMatchEulerSampler.step for the step from sigma to sigma_next, reached through the sampler's own loop."""
    setting, k = _find_step(sigma, sigma_next, EULER_SETTINGS)
    sampler = _sampler(FlowMatchEulerSampler, *setting)
    for t in sampler.timesteps[:k]:  # the steps before this one: any input will do
        sampler.step(torch.zeros_like(sample), t, torch.zeros_like(sample))
    return sampler.step(velocity, sampler.timesteps[k], sample).prev_sample


def _euler_mistake(kind):
    def step(velocity, sample, sigma, sigma_next):
        if kind == "sign":
            return sample + (sigma - sigma_next) * velocity
        if kind == "to x0":
            return sample - sigma * velocity
        x0_hat = sample - sigma * velocity
        return (1 - sigma_next) * x0_hat + sigma_next * sample  # the sample taken for the noise ε
    return step


EULER_STEP = Exercise(
    name="euler_step", notebook="10_flow_matching",
    task="euler_step(velocity, sample, sigma, sigma_next) -> the sample at sigma_next (B, C, H, W): one Euler step of "
         "dx/dσ = v from x_σ = sample, with the network's velocity v at (x_σ, σ); sigma and sigma_next are floats, "
         "sigma_next < sigma (the last step lands on 0).",
    source="Euler's method on the flow's ODE dx/dσ = v_θ(x, σ) (samplers/flow_match.py; diffusers' "
           "FlowMatchEulerDiscreteScheduler.step): x_{σ_next} = x_σ + (σ_next - σ) v",
    solution=euler_step, cases=_euler_cases, reference=_sampler_euler_step,
    mistakes=(
        Mistake("the step goes the wrong way: σ falls from σ to σ_next, so dσ = σ_next - σ is negative, and "
                "dx = v dσ", _euler_mistake("sign")),
        Mistake("that is x̂_0 = x_σ - σ v, a jump all the way to σ = 0 along the line; one step goes only as far as "
                "σ_next", _euler_mistake("to x0")),
        Mistake("the sample is pure noise only at σ = 1: the line through x_σ with velocity v meets σ = 1 at "
                "ε̂ = x_σ + (1 - σ) v, not at x_σ. (1 - σ_next) x̂_0 + σ_next ε̂ is the Euler step",
                _euler_mistake("sample as noise")),
    ),
)


# ---- one Heun step ------------------------------------------------------------------------------------------------


class ToyVelocity:
    """A velocity field that bends, v(x, σ) = tanh(2x) + σ x, standing in for v_θ: along it, Euler and Heun, and
    each of the mistakes, land in different places. Called as velocity_fn(x, sigma) with sigma a float."""

    def __call__(self, x, sigma):
        return torch.tanh(2 * x) + sigma * x

    def __repr__(self) -> str:
        return "ToyVelocity(tanh(2x) + σ x)"


def heun_step(velocity_fn, sample, sigma, sigma_next):
    # BEGIN SOLUTION
    dt = sigma_next - sigma  # negative: from more noise to less
    v1 = velocity_fn(sample, sigma)  # the slope where the step starts
    guess = sample + dt * v1  # Euler's guess x̃ at σ_next
    if sigma_next == 0:  # the last step stays Euler (Karras et al.'s Algorithm 1, diffusers' Heun scheduler)
        return guess
    v2 = velocity_fn(guess, sigma_next)  # the slope where the guess lands
    return sample + dt * (v1 + v2) / 2  # the trapezoid rule: the average slope, from the same start
    # END SOLUTION


HEUN_SETTINGS = ((6, 1.0, 1000), (4, 3.0, 20))  # as EULER_SETTINGS


def _heun_cases(seed):
    (sample,) = _samples(seed, 1, shape=(2, 3, 5, 4))
    g = torch.Generator().manual_seed(400 + seed)
    velocity_fn = ToyVelocity()
    cases = []
    for setting, step in ((0, 0), (0, "middle"), (1, "middle"), (1, -1), (0, -1)):
        sigmas = _step_sigmas(*HEUN_SETTINGS[setting])
        k = int(torch.randint(1, len(sigmas) - 2, (), generator=g)) if step == "middle" else step % (len(sigmas) - 1)
        cases.append({"velocity_fn": velocity_fn, "sample": sample, "sigma": sigmas[k], "sigma_next": sigmas[k + 1]})
    return cases


def _sampler_heun_step(velocity_fn, sample, sigma, sigma_next):
    """FlowMatchHeunSampler's two visits of the step from sigma to sigma_next (one for the last step), reached through
    the sampler's own loop: its k-th step is visits 2k (the guess) and 2k + 1 (the correction)."""
    setting, k = _find_step(sigma, sigma_next, HEUN_SETTINGS)
    sampler = _sampler(FlowMatchHeunSampler, *setting)
    for t in sampler.timesteps[:2 * k]:  # the steps before this one: any input will do
        sampler.step(torch.zeros_like(sample), t, torch.zeros_like(sample))
    guess = sampler.step(velocity_fn(sample, sigma), sampler.timesteps[2 * k], sample).prev_sample
    if k == setting[0] - 1:  # the last step: one visit
        return guess
    return sampler.step(velocity_fn(guess, sigma_next), sampler.timesteps[2 * k + 1], guess).prev_sample


def _heun_mistake(kind):
    def step(velocity_fn, sample, sigma, sigma_next):
        dt = sigma_next - sigma
        v1 = velocity_fn(sample, sigma)
        guess = sample + dt * v1
        if kind == "euler" or (sigma_next == 0 and kind != "heun at the end"):
            return guess
        v2 = velocity_fn(guess, sigma if kind == "second slope at sigma" else sigma_next)
        if kind == "from the guess":
            return guess + dt * (v1 + v2) / 2
        if kind == "second slope only":
            return sample + dt * v2
        return sample + dt * (v1 + v2) / 2
    return step


HEUN_STEP = Exercise(
    name="heun_step", notebook="10_flow_matching",
    task="heun_step(velocity_fn, sample, sigma, sigma_next) -> the sample at sigma_next (B, C, H, W): one Heun step of "
         "dx/dσ = v from x_σ = sample, calling velocity_fn(x, σ) for the velocity: Euler's guess, then the step with "
         "the average of the slopes at its start and at the guess. On the last step (sigma_next == 0) the guess "
         "itself, as minildm's FlowMatchHeunSampler does.",
    source="Karras et al. 2022 (arXiv:2206.00364), Algorithm 1 (Heun's 2nd order method; no correction on the step "
           "to σ = 0), on the flow's ODE: x̃ = x_σ + (σ_next - σ) v_1, x_{σ_next} = x_σ + (σ_next - σ) (v_1 + "
           "v_θ(x̃, σ_next)) / 2",
    solution=heun_step, cases=_heun_cases, reference=_sampler_heun_step,
    mistakes=(
        Mistake("that is Euler's step: Heun evaluates the velocity again where the guess lands, v_θ(x̃, σ_next), and "
                "steps with the average of the two slopes", _heun_mistake("euler")),
        Mistake("the corrected step starts from x_σ again, not from the guess x̃: x_σ + (σ_next - σ) (v_1 + v_2) / 2",
                _heun_mistake("from the guess")),
        Mistake("the second slope belongs to where the guess lands, σ_next: v_2 = v_θ(x̃, σ_next), not v_θ(x̃, σ)",
                _heun_mistake("second slope at sigma")),
        Mistake("Heun averages the two slopes, (v_1 + v_2) / 2; the second slope alone is no better than the first",
                _heun_mistake("second slope only")),
        Mistake("the last step, to σ = 0, is Euler's guess alone, as in Karras et al.'s Algorithm 1 and minildm's and "
                "diffusers' Heun samplers: one model call, not two", _heun_mistake("heun at the end")),
    ),
)


EXERCISES = [FLOW_PATH, TIME_SHIFT, EULER_STEP, HEUN_STEP]  # in the notebook's order
