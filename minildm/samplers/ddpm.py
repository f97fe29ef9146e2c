"""DDPM ancestral sampling (Ho et al. 2020, arXiv:2006.11239): x_{t-1} drawn from the forward process's
posterior, with the network's x̂_0 in place of the true x_0:

    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)
    μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t) · x_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t   (Ho eq. 7)
    β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t                                               (Ho eq. 7)

With fewer inference steps than training steps, one step jumps from t to prev, and its effective
β_t = 1 - ᾱ_t / ᾱ_prev (as diffusers does). Notation as in ddim.py. Depends on base.py and schedule.py.
"""

from __future__ import annotations

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .base import BaseSampler, SamplerOutput, randn_tensor


class DDPMSampler(BaseSampler):
    """DDPM ancestral sampling (Ho et al. 2020), posterior mean and variance of eq. (7).

    The variance is β̃_t ("fixed_small" in diffusers). No noise is added at the last step, which
    jumps to ᾱ_prev = 1 and so returns x̂_0 itself (its eq. 7 weights are 1 on x̂_0 and 0 on x_t).
    With fewer inference steps than training steps, each step uses ᾱ at the previous inference
    timestep and β_t = 1 - ᾱ_t / ᾱ_prev, as diffusers does.

    Until set_timesteps is called the sampler steps through every training timestep, T - 1 down to
    0, as diffusers' DDPMScheduler does, so a loop written for diffusers runs unchanged.
    steps_offset defaults to 0 (DDIM's default is 1) so that "leading" with all T steps works:
    with offset 1 it would ask for timestep T.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
    ):
        super().__init__(schedule, timestep_spacing, steps_offset, prediction_type, clip_sample)
        self._use_timesteps(np.arange(schedule.num_train_timesteps)[::-1])  # the full chain, T - 1 .. 0

    def _coefficients(self, t: int) -> tuple[float, float, float]:
        """(ᾱ_t, ᾱ_prev, β_t) for the jump from t to the previous inference timestep."""
        prev_t = self._next_timestep[t]
        alpha_bar_t = self._alphas_cumprod[t]
        alpha_bar_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else 1.0  # ᾱ_{-1} = 1
        beta_t = 1 - alpha_bar_t / alpha_bar_prev  # = betas[t] when every step is visited
        return alpha_bar_t, alpha_bar_prev, beta_t

    @staticmethod
    def _variance(alpha_bar_t: float, alpha_bar_prev: float, beta_t: float) -> float:
        return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t

    def variance(self, timestep: int | torch.Tensor) -> float:
        """β̃_t = (1 - ᾱ_prev) / (1 - ᾱ_t) · β_t, the posterior variance (Ho eq. 7); 0 at the last step."""
        return self._variance(*self._coefficients(self._check_timestep(timestep)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        """One ancestral step: x_prev ~ N(μ̃_t(x_t, x̂_0), β̃_t I). model_output, sample: (B, ...)."""
        t = self._check_timestep(timestep)
        alpha_bar_t, alpha_bar_prev, beta_t = self._coefficients(t)
        x0, _ = self._predict_x0_and_eps(model_output, t, sample, generator)  # x̂_0: (B, ...)

        # Ho eq. 7: μ̃_t = sqrt(ᾱ_prev) β_t / (1 - ᾱ_t) · x̂_0 + sqrt(α_t) (1 - ᾱ_prev) / (1 - ᾱ_t) · x_t
        x0_coeff = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
        sample_coeff = (1 - beta_t) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)  # sqrt(α_t) = sqrt(1 - β_t)
        prev_sample = x0_coeff * x0 + sample_coeff * sample
        if self._next_timestep[t] >= 0:  # the last step returns the mean: no noise on the result
            variance = self._variance(alpha_bar_t, alpha_bar_prev, beta_t)
            z = randn_tensor(sample.shape, generator, sample.device, sample.dtype)
            prev_sample = prev_sample + variance**0.5 * z  # + sqrt(β̃_t) z
        return SamplerOutput(prev_sample, x0)
