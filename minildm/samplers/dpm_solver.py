"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2): a second-order multistep ODE solver
that samples well in 10 to 20 steps, the default of most Stable Diffusion front ends.

Sampling with DDIM solves the probability-flow ODE. Written in the half log-SNR λ_t = log(α_t / σ_t),
with α_t = sqrt(ᾱ_t) and σ_t = sqrt(1 - ᾱ_t), its exact solution from s to an earlier t is

    x_t = (σ_t / σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x̂_0(x_λ, λ) dλ                          (Lu et al. eq. 9)

DPM-Solver++ approximates the data prediction x̂_0 in that integral, step h = λ_t - λ_s:
  - first order (x̂_0 constant; this is DDIM, eq. 12 of Song et al.):
        x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) x̂_0(s)
  - second order, multistep "2M": x̂_0 linear in λ, its slope from the previous step's x̂_0 (no extra
    model call), with r = h_prev / h:
        D = (1 + 1 / (2r)) x̂_0(s) - 1 / (2r) x̂_0(s_prev)
        x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) D

The first step has no previous x̂_0 and the last is first order too (diffusers' lower_order_final with
final_sigmas_type="zero": the last step lands on σ = 0, where h is infinite and the step returns x̂_0).

As in diffusers' DPMSolverMultistepScheduler, the timesteps are integers, the model sees x_t as it is,
and where ᾱ_t = 0 (zero terminal SNR) the solver uses ᾱ_t = 2⁻²⁴ so that λ is finite. Its spacings differ
from DDIM's for "linspace" and "leading": they split the schedule into n + 1 parts and drop the last.
Notation as in ddim.py. Depends on base.py and schedule.py.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ..checks import check_generator
from ..schedule import ALPHA_BAR_FLOOR, NoiseSchedule, check_samples
from .base import BaseSampler, SamplerOutput

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class DPMSolverMultistepSampler(BaseSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), with diffusers' defaults and timestep lists.

    timestep_spacing: "linspace" (diffusers' default for this solver), "leading" or "trailing".
    final_sigmas_type: "zero" lands the last step on a clean x_0 (diffusers' default); "sigma_min" on ᾱ_0.
    solver_order: 2 (2M) or 1 (which is DDIM with set_alpha_to_one for "zero").
    Raises ValueError for settings out of range, and in set_timesteps for a number of steps whose spacing
    would visit one timestep twice.
    """

    _repr_names = ("solver_order", "final_sigmas_type", *BaseSampler._repr_names)

    def __init__(
        self,
        schedule: NoiseSchedule,
        solver_order: int = 2,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
    ):
        super().__init__(schedule, timestep_spacing, steps_offset, prediction_type, clip_sample)
        if solver_order not in (1, 2) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1 or 2 (DPM-Solver++(2M)), got {solver_order!r}")
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
        self.solver_order = solver_order
        self.final_sigmas_type = final_sigmas_type
        floored = schedule.alphas_cumprod.clamp(min=ALPHA_BAR_FLOOR).tolist()  # ᾱ_t, never 0
        self._alpha_sigma = [(a**0.5, (1 - a) ** 0.5) for a in floored]  # (α_t, σ_t) per timestep
        self._previous: tuple[int, torch.Tensor] | None = None  # (timestep, x̂_0) of the last step

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """diffusers' DPM-Solver timesteps for n steps (T = num_train_timesteps), descending:
          - "linspace": round(linspace(0, T - 1, n + 1)), reversed, the last (0) dropped;
          - "leading":  arange(0, n + 1) · (T // (n + 1)) reversed, the last dropped, + steps_offset;
          - "trailing": round(arange(T, 0, -T / n)) - 1, as for DDIM.
        Also forgets the previous step's x̂_0. Raises ValueError for n outside 1..T, or for an n whose
        spacing would visit a timestep twice (or one past T - 1).
        """
        T = self.schedule.num_train_timesteps
        n = num_inference_steps
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an integer between 1 and {T}, got {n!r}")
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            timesteps = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + self.steps_offset
        else:  # "trailing"
            timesteps = np.round(np.arange(T, 0, -T / n))[:n] - 1
        if len(np.unique(timesteps)) != n or timesteps.max() >= T:
            raise ValueError(f'timestep_spacing="{self.timestep_spacing}" with {n} steps would visit timesteps '
                             f"{timesteps.max():.0f} .. {timesteps.min():.0f} with repeats or past {T - 1}: use fewer "
                             f'steps or timestep_spacing="trailing"')
        self._use_timesteps(timesteps, device)
        self._previous = None

    def _target(self, t: int) -> tuple[float, float]:
        """(α, σ) the step from t lands on: the next timestep's, or the final one's."""
        prev_t = self._next_timestep[t]
        if prev_t >= 0:
            return self._alpha_sigma[prev_t]
        if self.final_sigmas_type == "zero":
            return 1.0, 0.0
        return self._alpha_sigma[0]

    def _data_prediction(self, model_output, sample, alpha, sigma):
        """x̂_0 from the model's output with this solver's (α, σ), floored where ᾱ = 0, as diffusers does."""
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha  # x_t = α x_0 + σ ε solved for x_0
        elif self.prediction_type == "v_prediction":
            x0 = alpha * sample - sigma * model_output  # v = α ε - σ x_0
        else:
            x0 = model_output
        return x0.clamp(-1, 1) if self.clip_sample else x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        """One DPM-Solver++ step from x_t (`sample`) to the next timestep. model_output, sample: (B, ...).
        Deterministic: `generator` is accepted for the sampler interface and not used."""
        t = self._check_timestep(timestep)
        check_samples(sample, "sample", model_output, "model_output")
        check_generator(generator)
        alpha_s, sigma_s = self._alpha_sigma[t]
        x0 = self._data_prediction(model_output, sample, alpha_s, sigma_s)  # x̂_0(s): (B, ...)
        alpha_t, sigma_t = self._target(t)
        previous, self._previous = self._previous, (t, x0)
        if sigma_t == 0:  # λ_t = ∞: e^{-h} = 0 and the step lands on x̂_0 (first order, as diffusers)
            return SamplerOutput(x0.clone(), x0)
        lambda_s, lambda_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)  # λ = log(α / σ)
        h = lambda_t - lambda_s
        data = x0  # first order: D = x̂_0(s)
        is_last = self._next_timestep[t] < 0
        lower_order_final = is_last and self.num_inference_steps < 15  # diffusers' lower_order_final
        if (self.solver_order == 2 and previous is not None and self._next_timestep[previous[0]] == t
                and not lower_order_final):
            alpha_p, sigma_p = self._alpha_sigma[previous[0]]
            r = (lambda_s - math.log(alpha_p / sigma_p)) / h  # r = h_prev / h
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[1]  # Algorithm 2's D_i
        prev_sample = (sigma_t / sigma_s) * sample - (alpha_t * math.expm1(-h)) * data
        return SamplerOutput(prev_sample, x0)
