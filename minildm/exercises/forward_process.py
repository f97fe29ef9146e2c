"""Exercises of notebook 01, the forward process: the noise schedules, q(x_t | x_0), and the ε / x_0 / v algebra.

Notation as in schedule.py: β_t = betas[t], ᾱ_t = alphas_cumprod[t] = ∏_{s<=t} (1 - β_s), t = 0 .. T-1.
Each solution below is the code of the notebook's solution cell (between # BEGIN SOLUTION and # END SOLUTION);
each Mistake is a wrong answer students write, with the hint it earns.
"""

from __future__ import annotations

import math

import torch

from ..schedule import NoiseSchedule
from .core import Exercise, Mistake

T = 1000
SCHEDULE = NoiseSchedule()  # Stable Diffusion's scaled_linear betas, 0.00085 .. 0.012
SOURCE_HO = "Ho et al. 2020 (arXiv:2006.11239)"


def _timesteps(seed: int, batch: int) -> torch.Tensor:
    """`batch` timesteps: 0 and T - 1 always, the rest drawn with the seed."""
    g = torch.Generator().manual_seed(seed)
    middle = torch.randint(1, T - 1, (batch - 2,), generator=g)
    return torch.cat([torch.tensor([0]), middle, torch.tensor([T - 1])])


def _samples(seed: int, shape=(4, 3, 5, 2)):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _gather(alphas_cumprod, timesteps):  # ᾱ_t per sample, shaped to broadcast over (B, C, H, W)
    return alphas_cumprod[timesteps].view(-1, 1, 1, 1)


def _t_of(alpha_bar):
    """The timesteps whose ᾱ these are (the cases use the schedule's own values), for minildm's methods."""
    return (SCHEDULE.alphas_cumprod[None, :] - alpha_bar.view(-1, 1)).abs().argmin(dim=1)


# ---- ᾱ_t from the betas ------------------------------------------------------------------------------------------


def alphas_cumprod(betas):
    # BEGIN SOLUTION
    return torch.cumprod(1 - betas, dim=0)  # ᾱ_t = ∏_{s<=t} (1 - β_s)
    # END SOLUTION


def _betas_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [{"betas": SCHEDULE.betas}, {"betas": torch.rand(7, generator=g, dtype=torch.float64) * 0.1}]


ALPHAS_CUMPROD = Exercise(
    name="alphas_cumprod", notebook="01_forward_process",
    task="alphas_cumprod(betas) -> ᾱ (T,): the fraction of the signal's variance left after steps 0 .. t.",
    source=f"{SOURCE_HO}, section 2, with eq. (4): α_t = 1 - β_t, ᾱ_t = ∏_(s<=t) α_s",
    solution=alphas_cumprod, cases=_betas_cases,  # minildm's NoiseSchedule gives the same (tests/test_exercises.py)
    mistakes=(
        Mistake("that is ∏ β_s: the product must be of α_s = 1 - β_s, the signal kept at each step",
                lambda betas: torch.cumprod(betas, 0)),
        Mistake("that is 1 - Σ β_s: ᾱ is a product of the (1 - β_s), not one minus their sum",
                lambda betas: 1 - torch.cumsum(betas, 0)),
        Mistake("off by one step: ᾱ_0 must already include step 0, so ᾱ_0 = 1 - β_0, not 1",
                lambda betas: torch.cat([torch.ones(1, dtype=betas.dtype), torch.cumprod(1 - betas, 0)[:-1]])),
        Mistake("that is α_t = 1 - β_t alone: ᾱ_t multiplies the α of every step up to t",
                lambda betas: 1 - betas),
    ),
)


# ---- the schedules ---------------------------------------------------------------------------------------------------


def scaled_linear_betas(beta_start, beta_end, num_train_timesteps):
    # BEGIN SOLUTION
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    # END SOLUTION


def _range_cases(seed):
    return [{"beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000},
            {"beta_start": 1e-4 * (1 + seed), "beta_end": 0.02, "num_train_timesteps": 37}]


SCALED_LINEAR_BETAS = Exercise(
    name="scaled_linear_betas", notebook="01_forward_process",
    task="scaled_linear_betas(beta_start, beta_end, num_train_timesteps) -> β (T,) float64: Stable Diffusion's "
         "schedule, evenly spaced in sqrt(β).",
    source="Rombach et al. 2022 (the LDM code's 'linear' schedule, diffusers' 'scaled_linear'): "
           "sqrt(β_t) = linspace(sqrt(β_start), sqrt(β_end), T)",
    solution=scaled_linear_betas, cases=_range_cases,
    reference=lambda beta_start, beta_end, num_train_timesteps: NoiseSchedule(
        "scaled_linear", num_train_timesteps, beta_start, beta_end).betas,
    mistakes=(
        Mistake("that is evenly spaced β (the 'linear' schedule): space sqrt(β) evenly, then square",
                lambda beta_start, beta_end, num_train_timesteps: torch.linspace(
                    beta_start, beta_end, num_train_timesteps, dtype=torch.float64)),
        Mistake("the square is missing: linspace gives sqrt(β_t); square it",
                lambda beta_start, beta_end, num_train_timesteps: torch.linspace(
                    beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)),
        Mistake("the ends must be square roots too: linspace(sqrt(β_start), sqrt(β_end), T), then square",
                lambda beta_start, beta_end, num_train_timesteps: torch.linspace(
                    beta_start, beta_end, num_train_timesteps, dtype=torch.float64) ** 2),
    ),
)


def cosine_betas(num_train_timesteps, s=0.008):
    # BEGIN SOLUTION
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps  # t / T from 0 to 1
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # ᾱ up to a constant: f(t) / f(0)
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)  # β_t = 1 - ᾱ_t / ᾱ_{t-1}, capped as the paper does
    # END SOLUTION


def _cosine_cases(seed):
    return [{"num_train_timesteps": 1000}, {"num_train_timesteps": 50 + 13 * seed}]


def _cosine_alpha_bar(num_train_timesteps, s=0.008):
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f[1:] / f[0]


def _cosine_mistake(square=True, offset=True, cap=True, denominator=True):
    def betas(num_train_timesteps, s=0.008):
        t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        s_used = s if offset else 0.0
        f = torch.cos((t + s_used) / ((1 + s_used) if denominator else 1) * math.pi / 2) ** (2 if square else 1)
        beta = 1 - f[1:] / f[:-1]
        return beta.clamp(max=0.999) if cap else beta
    return betas


COSINE_BETAS = Exercise(
    name="cosine_betas", notebook="01_forward_process",
    task="cosine_betas(num_train_timesteps, s=0.008) -> β (T,) float64 of the cosine schedule, each β capped at 0.999.",
    source="Nichol & Dhariwal 2021 (arXiv:2102.09672), eq. (17): ᾱ_t = f(t) / f(0), "
           "f(t) = cos²((t/T + s) / (1 + s) · π/2), and β_t = 1 - ᾱ_t / ᾱ_(t-1) clipped to 0.999",
    solution=cosine_betas, cases=_cosine_cases,
    reference=lambda num_train_timesteps, s=0.008: NoiseSchedule("cosine", num_train_timesteps).betas,
    mistakes=(
        Mistake("cos, not cos²: f(t) is the cosine squared", _cosine_mistake(square=False)),
        Mistake("the offset s is missing: with s = 0, β_0 is vanishingly small (section 3.2)",
                _cosine_mistake(offset=False)),
        Mistake("the cap is missing: near t = T the ratio goes to 0 and β_t to 1; clip it at 0.999",
                _cosine_mistake(cap=False)),
        Mistake("divide (t/T + s) by (1 + s): without it the schedule does not end at π/2",
                _cosine_mistake(denominator=False)),
        Mistake("that is ᾱ_t = f(t) / f(0), the signal left: the betas are β_t = 1 - ᾱ_t / ᾱ_(t-1)",
                lambda num_train_timesteps, s=0.008: _cosine_alpha_bar(num_train_timesteps, s)),
    ),
)


# ---- q(x_t | x_0) ----------------------------------------------------------------------------------------------------


def add_noise(x0, noise, timesteps, alphas_cumprod):
    # BEGIN SOLUTION
    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1): one ᾱ_t per sample
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise  # x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε
    # END SOLUTION


def _noise_cases(seed):
    x0, noise = _samples(seed)
    return [{"x0": x0, "noise": noise, "timesteps": _timesteps(seed, 4), "alphas_cumprod": SCHEDULE.alphas_cumprod}]


ADD_NOISE = Exercise(
    name="add_noise", notebook="01_forward_process",
    task="add_noise(x0, noise, timesteps, alphas_cumprod) -> x_t (B, C, H, W): sample q(x_t | x_0) in one jump, "
         "with one timestep per sample (B,).",
    source=f"{SOURCE_HO}, eq. (4): q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)",
    solution=add_noise, cases=_noise_cases,
    reference=lambda x0, noise, timesteps, alphas_cumprod: SCHEDULE.add_noise(x0, noise, timesteps),
    mistakes=(
        Mistake("the square roots are missing: the mean is sqrt(ᾱ_t) x_0 and the standard deviation sqrt(1 - ᾱ_t)",
                lambda x0, noise, timesteps, alphas_cumprod: _gather(alphas_cumprod, timesteps) * x0
                + (1 - _gather(alphas_cumprod, timesteps)) * noise),
        Mistake("t is off by one: use alphas_cumprod[t], the ᾱ after step t (indices run 0 .. T-1)",
                lambda x0, noise, timesteps, alphas_cumprod: add_noise(x0, noise, (timesteps - 1).clamp(min=0),
                                                                       alphas_cumprod)),
        Mistake("t is off by one: alphas_cumprod[t - 1] (which at t = 0 wraps round to the last ᾱ) is the ᾱ of the "
                "step before; use alphas_cumprod[t]",
                lambda x0, noise, timesteps, alphas_cumprod: add_noise(x0, noise, timesteps - 1, alphas_cumprod)),
        Mistake("x_0 and ε swapped: the signal gets sqrt(ᾱ_t), the noise sqrt(1 - ᾱ_t)",
                lambda x0, noise, timesteps, alphas_cumprod: add_noise(noise, x0, timesteps, alphas_cumprod)),
        Mistake("one timestep for the whole batch: each sample has its own t, gather ᾱ per sample",
                lambda x0, noise, timesteps, alphas_cumprod: add_noise(x0, noise, timesteps[:1].expand(len(x0)),
                                                                       alphas_cumprod)),
    ),
)


# ---- what a network may predict: ε, x_0 or v ----------------------------------------------------------------------


def predict_x0_from_eps(x_t, eps, alpha_bar):
    # BEGIN SOLUTION
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()  # eq. (4) solved for x_0
    # END SOLUTION


def _alpha_bars(seed):
    return _gather(SCHEDULE.alphas_cumprod, _timesteps(seed, 4))  # (4, 1, 1, 1), 0 and T-1 included


def _x0_cases(seed):
    x_t, eps = _samples(seed)
    return [{"x_t": x_t, "eps": eps, "alpha_bar": _alpha_bars(seed)}]


PREDICT_X0_FROM_EPS = Exercise(
    name="predict_x0_from_eps", notebook="01_forward_process",
    task="predict_x0_from_eps(x_t, eps, alpha_bar) -> x̂_0: the clean sample that x_t and the noise ε imply "
         "(alpha_bar is ᾱ_t per sample, (B, 1, 1, 1)).",
    source=f"{SOURCE_HO}, eq. (4) solved for x_0 (Song et al. 2020, DDIM eq. (12)'s \"predicted x_0\")",
    solution=predict_x0_from_eps, cases=_x0_cases,
    reference=lambda x_t, eps, alpha_bar: SCHEDULE.predict_x0_from_eps(x_t, eps, _t_of(alpha_bar)),
    mistakes=(
        Mistake("divide by sqrt(ᾱ_t), do not multiply: x_t = sqrt(ᾱ_t) x_0 + ..., so x_0 = (...) / sqrt(ᾱ_t)",
                lambda x_t, eps, alpha_bar: (x_t - (1 - alpha_bar).sqrt() * eps) * alpha_bar.sqrt()),
        Mistake("the square roots are missing: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε",
                lambda x_t, eps, alpha_bar: (x_t - (1 - alpha_bar) * eps) / alpha_bar),
        Mistake("subtract the noise, do not add it",
                lambda x_t, eps, alpha_bar: (x_t + (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()),
    ),
)


def velocity(x0, noise, alpha_bar):
    # BEGIN SOLUTION
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0  # v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0
    # END SOLUTION


def _velocity_cases(seed):
    x0, noise = _samples(seed)
    return [{"x0": x0, "noise": noise, "alpha_bar": _alpha_bars(seed)}]


VELOCITY = Exercise(
    name="velocity", notebook="01_forward_process",
    task="velocity(x0, noise, alpha_bar) -> v (B, C, H, W): the v-prediction target.",
    source="Salimans & Ho 2022 (arXiv:2202.00512), section 4: v = α_t ε - σ_t x, with α_t = sqrt(ᾱ_t), "
           "σ_t = sqrt(1 - ᾱ_t)",
    solution=velocity, cases=_velocity_cases,
    reference=lambda x0, noise, alpha_bar: SCHEDULE.get_velocity(x0, noise, _t_of(alpha_bar)),
    mistakes=(
        Mistake("the sign is flipped: v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0",
                lambda x0, noise, alpha_bar: (1 - alpha_bar).sqrt() * x0 - alpha_bar.sqrt() * noise),
        Mistake("the coefficients are swapped: ε gets sqrt(ᾱ_t) (the signal's coefficient), x_0 sqrt(1 - ᾱ_t)",
                lambda x0, noise, alpha_bar: (1 - alpha_bar).sqrt() * noise - alpha_bar.sqrt() * x0),
        Mistake("that is x_t (a plus sign, and the coefficients of eq. 4): v is a difference, not the noisy sample",
                lambda x0, noise, alpha_bar: alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise),
    ),
)


def x0_and_eps_from_v(x_t, v, alpha_bar):
    # BEGIN SOLUTION
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()  # a² + s² = 1
    return a * x_t - s * v, s * x_t + a * v  # (x̂_0, ε̂): solve x_t = a x_0 + s ε, v = a ε - s x_0
    # END SOLUTION


def _from_v_cases(seed):
    x_t, v = _samples(seed)
    return [{"x_t": x_t, "v": v, "alpha_bar": _alpha_bars(seed)}]


X0_AND_EPS_FROM_V = Exercise(
    name="x0_and_eps_from_v", notebook="01_forward_process",
    task="x0_and_eps_from_v(x_t, v, alpha_bar) -> (x̂_0, ε̂): what a v-predicting network's output implies.",
    source="Salimans & Ho 2022 (arXiv:2202.00512), section 4 and appendix D: x = α_t z - σ_t v, ε = σ_t z + α_t v",
    solution=x0_and_eps_from_v, cases=_from_v_cases,
    reference=lambda x_t, v, alpha_bar: (SCHEDULE.predict_x0_from_v(x_t, v, _t_of(alpha_bar)),
                                         SCHEDULE.predict_eps_from_v(x_t, v, _t_of(alpha_bar))),
    mistakes=(
        Mistake("x̂_0 and ε̂ are swapped: return (x̂_0, ε̂) in that order",
                lambda x_t, v, alpha_bar: tuple(reversed(x0_and_eps_from_v(x_t, v, alpha_bar)))),
        Mistake("the signs of v are flipped: x̂_0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v and ε̂ = sqrt(1 - ᾱ) x_t + sqrt(ᾱ) v",
                lambda x_t, v, alpha_bar: x0_and_eps_from_v(x_t, -v, alpha_bar)),
        Mistake("the square roots are missing: the coefficients are sqrt(ᾱ_t) and sqrt(1 - ᾱ_t)",
                lambda x_t, v, alpha_bar: (alpha_bar * x_t - (1 - alpha_bar) * v,
                                           (1 - alpha_bar) * x_t + alpha_bar * v)),
    ),
)


EXERCISES = [ALPHAS_CUMPROD, SCALED_LINEAR_BETAS, COSINE_BETAS, ADD_NOISE, PREDICT_X0_FROM_EPS, VELOCITY,
             X0_AND_EPS_FROM_V]
