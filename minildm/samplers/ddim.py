"""DDIM (Song et al. 2020, arXiv:2010.02502): jump from x_t to an earlier step along the predicted noise.

    x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ_t²) ε + σ_t z                      (Song eq. 12)
    σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)                     (Song eq. 16)

η = 0 is deterministic; η = 1 with every training step is exactly DDPM (ddpm.py). DDIM may skip steps
because its eq. (12) keeps the same marginals q(x_t | x_0) as the training process for any subset of
the timesteps, so a model trained on all T of them can be sampled on 50.

Notation: alphas_cumprod[t] = ᾱ_t, eps = ε (predicted), x̂_0 = pred_original_sample, eta = η, "prev" is
the next timestep of the loop (a smaller t), z ~ N(0, I). Depends on base.py and schedule.py.
"""

from __future__ import annotations

import numbers

import torch

from ..schedule import NoiseSchedule
from .base import BaseSampler, SamplerOutput, randn_tensor


class DDIMSampler(BaseSampler):
    """DDIM (Song et al. 2020): eq. (12) for the step, eq. (16) for its noise σ_t(η).

    eta: η in [0, 1]; 0 is the deterministic DDIM sampler, 1 matches DDPM's variance.
    set_alpha_to_one: which ᾱ the final step lands on. False (Stable Diffusion) uses ᾱ_0, the
        least noisy training step; True uses 1, a fully clean x_0.
    The constructor's defaults are Stable Diffusion's DDIM: "leading" spacing with steps_offset=1 and
    set_alpha_to_one=False. They fail at n = T (timestep T does not exist) and at n = 1 visit only
    t = 1, which leaves the noise as it is; LatentDiffusion's default sampler is therefore "trailing"
    with set_alpha_to_one=True, for which every n from 1 to T works.
    """

    _repr_names = ("eta", "set_alpha_to_one", *BaseSampler._repr_names)

    def __init__(
        self,
        schedule: NoiseSchedule,
        eta: float = 0.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
    ):
        super().__init__(schedule, timestep_spacing, steps_offset, prediction_type, clip_sample)
        if not isinstance(set_alpha_to_one, bool):
            raise TypeError(f"set_alpha_to_one must be True or False, got {set_alpha_to_one!r}")
        if not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be between 0 (deterministic DDIM) and 1 (DDPM-like noise), got {eta}")
        self.eta = eta
        self.set_alpha_to_one = set_alpha_to_one
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0].item()

    def _alpha_bars(self, t: int) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_prev) as python floats (float64); a python float scales any dtype on any device."""
        prev_t = self._next_timestep[t]
        alpha_bar_t = self._alphas_cumprod[t]
        alpha_bar_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        return alpha_bar_t, alpha_bar_prev

    def _variance(self, alpha_bar_t: float, alpha_bar_prev: float) -> float:
        return self.eta**2 * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)

    def variance(self, timestep: int | torch.Tensor) -> float:
        """σ_t(η)², the variance of the noise that step(…, timestep, …) adds  (Song eq. 16, squared)."""
        return self._variance(*self._alpha_bars(self._check_timestep(timestep)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        """One DDIM step from x_t (`sample`) to x_prev. model_output, sample: (B, ...)."""
        t = self._check_timestep(timestep)
        alpha_bar_t, alpha_bar_prev = self._alpha_bars(t)
        x0, eps = self._predict_x0_and_eps(model_output, t, sample, generator)  # x̂_0 and ε, both (B, ...)

        sigma_t = self._variance(alpha_bar_t, alpha_bar_prev) ** 0.5  # Song eq. 16
        direction = (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps  # "direction pointing to x_t"
        prev_sample = alpha_bar_prev**0.5 * x0 + direction  # Song eq. 12, without the noise term
        if self.eta > 0:
            z = randn_tensor(sample.shape, generator, sample.device, sample.dtype)
            prev_sample = prev_sample + sigma_t * z  # + σ_t z
        return SamplerOutput(prev_sample, x0)
