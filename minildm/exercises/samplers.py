"""Exercises of notebook 07, samplers: the DDIM step, which timesteps a sampler visits, a DDIM loop to debug,
and the Fréchet distance behind the FID.

Notation as in samplers/ddim.py: ᾱ_t = alphas_cumprod[t], "prev" is the next timestep of the loop (a smaller
t), η = eta, σ_t = σ_t(η), z ~ N(0, I). Each solution below is the code of the notebook's solution cell
(between # BEGIN SOLUTION and # END SOLUTION); each Mistake is a wrong answer students write, with the hint it
earns. minildm's own code is the reference: DDIMSampler.step and set_timesteps, fid.frechet_distance.
"""

from __future__ import annotations

import inspect
import textwrap

import numpy as np
import torch

from ..fid import frechet_distance as minildm_frechet_distance
from ..samplers import DDIMSampler
from ..schedule import NoiseSchedule
from .core import Calls, Exercise, Mistake, stack_calls

T = 1000
SCHEDULE = NoiseSchedule()  # Stable Diffusion's scaled_linear betas, as the notebook's model
SOURCE_SONG = "Song et al. 2020 (arXiv:2010.02502)"


def _samples(seed: int, count: int, shape=(2, 3, 5, 4)):
    g = torch.Generator().manual_seed(500 + seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


# ---- one DDIM step ----------------------------------------------------------------------------------------------


def ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev, eta, noise):
    # BEGIN SOLUTION
    x0_hat = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5  # eq. (12)'s "predicted x_0"
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)) ** 0.5 * (1 - alpha_bar_t / alpha_bar_prev) ** 0.5  # (16)
    direction = (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps  # eq. (12)'s "direction pointing to x_t"
    return alpha_bar_prev**0.5 * x0_hat + direction + sigma * noise  # x_prev, eq. (12)
    # END SOLUTION


# The samplers whose steps the cases take: (timestep_spacing, steps_offset, set_alpha_to_one, num_inference_steps)
DDIM_SETTINGS = (("leading", 1, False, 10),  # Stable Diffusion's DDIM: its last step lands on ᾱ_0
                 ("trailing", 0, True, 7),  # LatentDiffusion.make_sampler()'s kind: from t = T - 1 to a clean x_0
                 ("linspace", 0, False, 6))


def _ddim_sampler(eta, spacing, offset, set_alpha_to_one, n) -> DDIMSampler:
    sampler = DDIMSampler(SCHEDULE, eta, spacing, offset, set_alpha_to_one)
    sampler.set_timesteps(n)
    return sampler


def _alpha_bars(sampler: DDIMSampler, t: int) -> tuple[float, float]:
    """(ᾱ_t, ᾱ_prev) of the sampler's step from t; after its last timestep ᾱ_prev is its final_alpha_cumprod."""
    prev = sampler.previous_timestep(t)
    alpha_bar_prev = SCHEDULE.alphas_cumprod[prev].item() if prev >= 0 else sampler.final_alpha_cumprod
    return SCHEDULE.alphas_cumprod[t].item(), alpha_bar_prev


def _ddim_cases(seed):
    eps, x_t, noise = _samples(seed, 3)
    g = torch.Generator().manual_seed(seed)
    cases = []
    # (setting, which step, η): η > 0 before the last steps, where a σ_t without its first factor gives NaN
    for setting, step, eta in ((0, 0, 0.0), (1, 0, 1.0), (2, "middle", 0.5), (0, "middle", 1.0), (1, "middle", 0.5),
                               (1, -1, 0.5), (0, -1, 1.0), (2, -1, 0.0)):
        sampler = _ddim_sampler(eta, *DDIM_SETTINGS[setting])
        timesteps = sampler.timesteps.tolist()
        index = int(torch.randint(1, len(timesteps) - 1, (), generator=g)) if step == "middle" else step
        alpha_bar_t, alpha_bar_prev = _alpha_bars(sampler, timesteps[index])
        cases.append({"eps": eps, "x_t": x_t, "alpha_bar_t": torch.tensor(alpha_bar_t, dtype=torch.float64),
                      "alpha_bar_prev": torch.tensor(alpha_bar_prev, dtype=torch.float64), "eta": eta, "noise": noise})
    return cases


def _sampler_step(eps, x_t, alpha_bar_t, alpha_bar_prev, eta, noise):
    """DDIMSampler.step for the step of DDIM_SETTINGS whose ᾱ_t and ᾱ_prev these are, with `noise` as its z: the
    step draws z from a generator seeded 0, so the same z is drawn again here and swapped."""
    for setting in DDIM_SETTINGS:
        sampler = _ddim_sampler(eta, *setting)
        for t in sampler.timesteps.tolist():
            if _alpha_bars(sampler, t) == (alpha_bar_t.item(), alpha_bar_prev.item()):
                x_prev = sampler.step(eps, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
                z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0), dtype=x_t.dtype)
                return x_prev + sampler.variance(t) ** 0.5 * (noise - z)  # η = 0: variance 0, nothing drawn
    raise ValueError("not a step of DDIM_SETTINGS")


def _ddim_mistake(sqrt_prev=True, minus_sigma=True, first_factor=True, add_noise=True, variance=False):
    def step(eps, x_t, alpha_bar_t, alpha_bar_prev, eta, noise):
        x0_hat = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
        factor = ((1 - alpha_bar_prev) / (1 - alpha_bar_t)) ** 0.5 if first_factor else 1
        sigma = eta * factor * (1 - alpha_bar_t / alpha_bar_prev) ** 0.5
        direction = (1 - alpha_bar_prev - (sigma**2 if minus_sigma else 0)) ** 0.5 * eps
        signal = alpha_bar_prev**0.5 if sqrt_prev else alpha_bar_prev
        return signal * x0_hat + direction + ((sigma**2 if variance else sigma) * noise if add_noise else 0)
    return step


DDIM_STEP = Exercise(
    name="ddim_step", notebook="07_samplers",
    task="ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev, eta, noise) -> x_prev (B, C, H, W): one DDIM step from "
         "x_t to the previous timestep of the loop with the network's ε, η = eta (a float in [0, 1]) and the noise "
         "z given; alpha_bar_t and alpha_bar_prev are 0-dim tensors (ᾱ_prev is 1, or ᾱ_0, after the last step).",
    source=f"{SOURCE_SONG}, eq. (12): x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ_t²) ε + σ_t z, with eq. (16): "
           "σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev) (the paper writes α for ᾱ)",
    solution=ddim_step, cases=_ddim_cases, reference=_sampler_step,
    mistakes=(
        Mistake("x̂_0's coefficient is sqrt(ᾱ_prev), not ᾱ_prev: x_prev keeps the signal of x_prev ~ q(x_prev | x_0) "
                "= N(sqrt(ᾱ_prev) x_0, (1 - ᾱ_prev) I)", _ddim_mistake(sqrt_prev=False)),
        Mistake("the direction term must leave room for the fresh noise: sqrt(1 - ᾱ_prev - σ_t²) ε, so that the "
                "variances add up to 1 - ᾱ_prev", _ddim_mistake(minus_sigma=False)),
        Mistake("σ_t lacks its first factor: σ_t = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev); "
                "η sqrt(1 - ᾱ_t / ᾱ_prev) alone is the forward step's standard deviation, not the posterior's",
                _ddim_mistake(first_factor=False)),
        Mistake("the fresh noise σ_t z is missing: with η > 0 each step adds it (η = 0 is the deterministic DDIM)",
                _ddim_mistake(add_noise=False)),
        Mistake("the fresh noise is scaled by σ_t², the variance: z ~ N(0, I) times the standard deviation σ_t",
                _ddim_mistake(variance=True)),
    ),
)


# ---- which timesteps a sampler visits ------------------------------------------------------------------------------


def inference_timesteps(num_inference_steps, num_train_timesteps, spacing, steps_offset):
    # BEGIN SOLUTION
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "leading":
        timesteps = np.arange(0, n)[::-1] * (T // n) + steps_offset  # every T // n-th step from 0, shifted
    elif spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / n))[:n] - 1  # T - 1 first; [:n]: a float arange may give n + 1
    else:  # "linspace"
        timesteps = np.round(np.linspace(0, T - 1, n))[::-1]  # both ends, T - 1 and 0
    return torch.from_numpy(timesteps.astype(np.int64))  # (n,) descending
    # END SOLUTION


def _spacing_cases(seed):
    settings = [("leading", 10, 1000, 1), ("leading", 3 + seed, 1000, seed), ("trailing", 7, 1000, 1),
                ("trailing", 10 + 3 * seed, 1000, 0), ("linspace", 7, 1000, 0), ("linspace", 10, 1000, 1),
                ("leading", 6, 50 + seed, 1), ("trailing", 8, 50 + seed, 1), ("linspace", 9 - seed, 50 + seed, 1)]
    return [{"num_inference_steps": n, "num_train_timesteps": T, "spacing": spacing, "steps_offset": offset}
            for spacing, n, T, offset in settings]


def _sampler_timesteps(num_inference_steps, num_train_timesteps, spacing, steps_offset):
    sampler = DDIMSampler(NoiseSchedule(num_train_timesteps=num_train_timesteps), timestep_spacing=spacing,
                          steps_offset=steps_offset)
    sampler.set_timesteps(num_inference_steps)
    return sampler.timesteps


def _spacing_mistake(trailing_minus_one=True, descending=True, round_linspace=True, offset=True):
    def timesteps(num_inference_steps, num_train_timesteps, spacing, steps_offset):
        n, T = num_inference_steps, num_train_timesteps
        if spacing == "leading":
            values = np.arange(0, n) * (T // n) + (steps_offset if offset else 0)
        elif spacing == "trailing":
            values = np.round(np.arange(T, 0, -T / n))[:n][::-1] - (1 if trailing_minus_one else 0)
        else:
            values = np.linspace(0, T - 1, n)
            values = np.round(values) if round_linspace else values
        values = values[::-1] if descending else values
        return torch.from_numpy(values.astype(np.int64))
    return timesteps


INFERENCE_TIMESTEPS = Exercise(
    name="inference_timesteps", notebook="07_samplers",
    task="inference_timesteps(num_inference_steps, num_train_timesteps, spacing, steps_offset) -> the timesteps a "
         "sampler visits, a descending int64 tensor (n,), for spacing \"leading\" (every T // n-th step from 0, plus "
         "steps_offset), \"trailing\" (from T - 1 down, every T / n, rounded) or \"linspace\" (n evenly spaced "
         "from T - 1 to 0, rounded), as diffusers computes them with numpy. steps_offset shifts \"leading\" only.",
    source="Lin et al. 2023 (arXiv:2305.08891), 'Sample from the last timestep', which compares the three "
           "spacings; diffusers' DDIMScheduler.set_timesteps (timestep_spacing)",
    solution=inference_timesteps, cases=_spacing_cases, reference=_sampler_timesteps,
    mistakes=(
        Mistake("\"trailing\" needs the - 1: round(arange(T, 0, -T / n)) starts at T, which is not a timestep; "
                "minus 1 it starts at T - 1", _spacing_mistake(trailing_minus_one=False)),
        Mistake("the order is ascending: a sampler goes from the noisiest timestep down, reverse it",
                _spacing_mistake(descending=False)),
        Mistake("\"linspace\" must be rounded (np.round: halves go to the even number), not truncated by the cast to "
                "integers", _spacing_mistake(round_linspace=False)),
        Mistake("\"leading\" adds steps_offset to every timestep (Stable Diffusion's 1 gives 901, ..., 1 for n = 10)",
                _spacing_mistake(offset=False)),
    ),
)


# ---- debug this: a DDIM loop ------------------------------------------------------------------------------------


class PerfectNoiseModel:
    """A stand-in for ε_θ(x_t, t) that always answers ε, the noise that made x_T. Along the exact η = 0 DDIM path
    every x_t is sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, so ε is the true noise at every step, and the loop ends on x_0."""

    def __init__(self, eps: torch.Tensor):
        self.eps = eps

    def __call__(self, x, t):
        return self.eps

    def __repr__(self) -> str:
        return "PerfectNoiseModel(ε)"


class NudgedNoiseModel(PerfectNoiseModel):
    """ε plus a small offset that changes with t: an imperfect model, so that where a loop ends depends on every
    step it takes (with a perfect model, the first step's x̂_0 is already x_0)."""

    def __call__(self, x, t):
        return self.eps + 0.05 * torch.sin(torch.tensor(t / 37.0, dtype=self.eps.dtype))

    def __repr__(self) -> str:
        return "NudgedNoiseModel(ε + 0.05 sin(t / 37))"


def ddim_sample(model, x_T, timesteps, alphas_cumprod):
    # BEGIN SOLUTION
    x = x_T
    for i, t in enumerate(timesteps):
        eps = model(x, t)  # ε_θ(x_t, t)
        alpha_bar_t = alphas_cumprod[t]  # ᾱ_t
        # ᾱ of the next timestep the loop visits, and 1 (a clean x_0) after the last one
        alpha_bar_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(alpha_bar_t)
        x0_hat = (x - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # eq. (12)'s "predicted x_0"
        x = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev).sqrt() * eps  # eq. (12) with σ_t = 0
    return x
    # END SOLUTION


def _broken_ddim_sample(model, x_T, timesteps, alphas_cumprod):
    x = x_T
    for t in timesteps:
        eps = model(x, t)  # ε_θ(x_t, t)
        alpha_bar_t = alphas_cumprod[t]  # ᾱ_t
        alpha_bar_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones_like(alpha_bar_t)  # ᾱ of the previous step
        x0_hat = (x - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # eq. (12)'s "predicted x_0"
        x = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev).sqrt() * eps  # eq. (12) with σ_t = 0
    return x


# The broken loop the student version starts from: _broken_ddim_sample's body.
DDIM_SAMPLE_STUB = textwrap.dedent("\n".join(inspect.getsource(_broken_ddim_sample).splitlines()[1:]))


def _loop_cases(seed):
    x0, eps = _samples(seed, 2, shape=(2, 1, 6, 5))
    cases = []
    for spacing, offset, n in (("leading", 1, 10), ("trailing", 0, 7 + seed)):
        sampler = DDIMSampler(SCHEDULE, timestep_spacing=spacing, steps_offset=offset)
        sampler.set_timesteps(n)
        timesteps = sampler.timesteps.tolist()
        model = PerfectNoiseModel(eps) if spacing == "leading" else NudgedNoiseModel(eps)
        cases.append({"model": model, "x_T": SCHEDULE.add_noise(x0, eps, timesteps[0]),
                      "timesteps": timesteps, "alphas_cumprod": SCHEDULE.alphas_cumprod})
    return cases


def _loop_mistake(alpha_bar_index=0, final="one", skip_last=False):
    def loop(model, x_T, timesteps, alphas_cumprod):
        x = x_T
        visited = timesteps[:-1] if skip_last else timesteps
        for i, t in enumerate(visited):
            eps = model(x, t)
            alpha_bar_t = alphas_cumprod[t - alpha_bar_index]
            last = alphas_cumprod[0] if final == "alpha_bar_0" else torch.ones_like(alpha_bar_t)
            alpha_bar_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else last
            x0_hat = (x - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
            x = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev).sqrt() * eps
        return x
    return loop


DDIM_SAMPLE = Exercise(
    name="ddim_sample", notebook="07_samplers",
    task="Debug this: ddim_sample(model, x_T, timesteps, alphas_cumprod) runs η = 0 DDIM over `timesteps` "
         "(descending ints, e.g. 901, 801, ..., 1) and should return x_0. Given a perfect model, which answers the "
         "true noise, its last image must be exactly the clean one; the loop it starts from ends on an image that "
         "is still noisy, because each step lands on the wrong noise level. Find the bug and repair it. (The check "
         "also runs it with a slightly imperfect model, against minildm's DDIMSampler.)",
    source=f"{SOURCE_SONG}, eq. (12) with σ_t = 0, run on a subsequence of the timesteps (section 4.2, "
           "'Accelerated generation processes')",
    solution=ddim_sample, cases=_loop_cases, stub=DDIM_SAMPLE_STUB,
    mistakes=(
        Mistake("this is still the loop you started from: after a step from t, x is the sample of which timestep? "
                "Compare the noise level each step lands on with the one the next step assumes",
                _broken_ddim_sample),
        Mistake("ᾱ_t is alphas_cumprod[t], the noise level of x_t: alphas_cumprod[t - 1] is one step off",
                _loop_mistake(alpha_bar_index=1)),
        Mistake("after the last timestep ᾱ_prev must be 1 (a clean x_0): alphas_cumprod[0] leaves the noise of "
                "step 0 in the image", _loop_mistake(final="alpha_bar_0")),
        Mistake("the loop stops one step early: every timestep needs its step, the last one jumps to x_0",
                _loop_mistake(skip_last=True)),
    ),
)


# ---- the Fréchet distance, behind the FID ---------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2):
    # BEGIN SOLUTION
    def sqrtm(matrix):  # the square root of a symmetric positive semi-definite matrix: V diag(sqrt(λ)) Vᵀ
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        return eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T

    root1 = sqrtm(sigma1)  # Σ1^½
    covariance_term = torch.trace(sigma1 + sigma2 - 2 * sqrtm(root1 @ sigma2 @ root1))  # Tr(Σ1 + Σ2 - 2 (...)^½)
    return ((mu1 - mu2) ** 2).sum() + covariance_term  # ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½)
    # END SOLUTION


def _gaussian(g, d, positive=True):
    """A mean (d,) and a covariance (d, d), float64; with positive=True every entry of the covariance is positive
    (A Aᵀ for an A of positive entries), so that an elementwise square root stays real."""
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.rand(d, d + 2, generator=g, dtype=torch.float64)
    if not positive:
        a = a - 0.5
    return mu, a @ a.T / (d + 2) + 0.05 * torch.eye(d, dtype=torch.float64)


def _frechet_cases(seed):
    g = torch.Generator().manual_seed(700 + seed)
    calls = []
    for d in (4, 3 + seed, 6):
        (mu1, sigma1), (mu2, sigma2) = _gaussian(g, d), _gaussian(g, d)
        calls.append({"mu1": mu1, "sigma1": sigma1, "mu2": mu2, "sigma2": sigma2})
    mu, sigma = _gaussian(g, 5)
    calls.append({"mu1": mu, "sigma1": sigma, "mu2": mu.clone(), "sigma2": sigma.clone()})  # the same Gaussian: 0
    return [{"calls": Calls(calls, "4 pairs of Gaussians, d = 3..6")}]


def _frechet_mistake(factor=2, matrix_sqrt=True, square_norm=True, separate_roots=False):
    def sqrtm(matrix):
        if not matrix_sqrt:
            return matrix.sqrt()  # elementwise
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        return eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T

    def distance(mu1, sigma1, mu2, sigma2):
        root1 = sqrtm(sigma1)
        cross = root1 @ sqrtm(sigma2) if separate_roots else sqrtm(root1 @ sigma2 @ root1)
        norm = ((mu1 - mu2) ** 2).sum()
        return (norm if square_norm else norm.sqrt()) + torch.trace(sigma1 + sigma2 - factor * cross)
    return distance


FRECHET_DISTANCE = Exercise(
    name="frechet_distance", notebook="07_samplers",
    task="frechet_distance(mu1, sigma1, mu2, sigma2) -> d², a number: the squared Fréchet distance between "
         "N(μ1, Σ1) and N(μ2, Σ2), for means (d,) and covariances (d, d), float64. Take the matrix square root of "
         "a symmetric matrix from torch.linalg.eigh. The check runs it on four pairs of Gaussians.",
    source="Heusel et al. 2017 (arXiv:1706.08500), the FID as its experiments section (and appendix A1) defines it: "
           "d² = ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½), Dowson & Landau 1982; (Σ1 Σ2)^½ has the trace of "
           "(Σ1^½ Σ2 Σ1^½)^½",
    solution=frechet_distance, run=stack_calls, cases=_frechet_cases,
    reference=minildm_frechet_distance,
    mistakes=(
        Mistake("the factor 2 is missing: Tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½)", _frechet_mistake(factor=1)),
        Mistake("that is an elementwise square root (tensor.sqrt()): the formula needs the matrix square root, "
                "M^½ M^½ = M, from the eigendecomposition V diag(sqrt(λ)) Vᵀ", _frechet_mistake(matrix_sqrt=False)),
        Mistake("the norm is not squared: ||μ1 - μ2||², the sum of the squared differences, without a square root",
                _frechet_mistake(square_norm=False)),
        Mistake("(Σ1 Σ2)^½ is not Σ1^½ Σ2^½ unless the two covariances commute: take the square root of "
                "Σ1^½ Σ2 Σ1^½, which has the same trace as (Σ1 Σ2)^½ and is symmetric",
                _frechet_mistake(separate_roots=True)),
    ),
)


EXERCISES = [INFERENCE_TIMESTEPS, DDIM_STEP, DDIM_SAMPLE, FRECHET_DISTANCE]  # in the notebook's order
