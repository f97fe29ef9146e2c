"""Samplers that run the diffusion process backwards: DDPM (ancestral) and DDIM.

DDPM (Ho et al. 2020, arXiv:2006.11239) samples x_{t-1} from the posterior of the forward process,
with the network's x_0 in place of the true one:

    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)
    μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t) · x_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t   (Ho eq. 7)
    β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t                                               (Ho eq. 7)

DDIM (Song et al. 2020, arXiv:2010.02502) jumps from x_t to an earlier step x_prev along the
predicted noise direction, and can skip steps:

    x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ_t²) ε + σ_t z                      (Song eq. 12)
    σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)                     (Song eq. 16)

η = 0 is deterministic; η = 1 with every training step is exactly DDPM.

Notation: alphas_cumprod[t] = ᾱ_t, eps = ε (predicted), x̂_0 = pred_original_sample, "prev" is the
next timestep of the loop (a smaller t), z ~ N(0, I). With fewer inference steps than training steps,
one step jumps from t to prev, and its effective β_t = 1 - ᾱ_t / ᾱ_prev.

How to write the loop yourself (the user owns the loop, as in diffusers):

    sampler = DDIMSampler(NoiseSchedule())
    sampler.set_timesteps(50)
    x = torch.randn(shape, generator=generator) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        eps = model(x, t)
        x = sampler.step(eps, t, x, generator=generator).prev_sample

Depends on schedule.py only; a sampler never sees a network.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import torch

from .schedule import PREDICTION_TYPES, NoiseSchedule, check_samples

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SamplerOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_prev, the input of the next step
    pred_original_sample: torch.Tensor  # x̂_0, the model's current guess of the clean sample


def _randn(sample: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `sample`, drawn on the generator's device, then moved."""
    device = generator.device if generator is not None else sample.device
    noise = torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype)
    if noise.device.type == "cpu" and sample.device.type == "cuda":
        # From pinned memory the copy runs without making the host wait for the GPU's queued work.
        return noise.pin_memory().to(sample.device, non_blocking=True)
    return noise.to(sample.device)


class BaseSampler:
    """What DDPM and DDIM share: arguments, the inference timesteps, and the step bookkeeping."""

    init_noise_sigma = 1.0  # x_T ~ N(0, I): these samplers start from unit-variance noise
    # The attributes repr() shows; DDIM adds its own.
    _repr_names = ("timestep_spacing", "steps_offset", "prediction_type", "clip_sample", "num_inference_steps")

    def __init__(self, schedule, timestep_spacing, steps_offset, prediction_type, clip_sample):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        if not isinstance(steps_offset, numbers.Integral) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if not isinstance(clip_sample, bool):
            raise TypeError(f"clip_sample must be True or False, got {clip_sample!r}")
        self.schedule = schedule
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None  # set by set_timesteps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose which of the T training timesteps the loop visits, as diffusers does (descending).

        With T = num_train_timesteps and n = num_inference_steps:
          - "leading":  arange(0, n) * (T // n) + steps_offset, reversed. T=1000, n=10, offset 1
                        gives 901, 801, ..., 1 (Stable Diffusion's DDIM).
          - "trailing": round(arange(T, 0, -T / n)) - 1, so the loop starts at t = T - 1, the
                        noisiest step (recommended by Lin et al. 2023, arXiv:2305.08891).
          - "linspace": round(linspace(0, T - 1, n)), reversed.
        steps_offset is used by "leading" only.
        """
        T = self.schedule.num_train_timesteps
        n = num_inference_steps
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be between 1 and {T}, got {n!r}")
        # numpy, not torch, because diffusers uses numpy and the two round some values differently.
        if self.timestep_spacing == "leading":
            timesteps = np.arange(0, n)[::-1] * (T // n) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            # A float arange can yield one value too many (for n=61 the last is -6e-13); keep n.
            timesteps = np.round(np.arange(T, 0, -T / n))[:n] - 1
        else:  # "linspace"
            timesteps = np.round(np.linspace(0, T - 1, n))[::-1]
        if timesteps.max() >= T:  # only "leading" adds an offset, the others end at T - 1
            raise ValueError(
                f'timestep_spacing="leading" with steps_offset={self.steps_offset} and '
                f"num_inference_steps={n} would use timestep {int(timesteps.max())}, but the schedule "
                f'only has timesteps 0 to {T - 1}; use timestep_spacing="trailing" or steps_offset=0'
            )
        try:
            device = torch.device(device) if device is not None and not isinstance(device, bool) else device
            timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)  # (n,) descending
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # not a device, or one this machine lacks
            raise ValueError(f"device must be a torch device this machine has, got {device!r} ({e})") from e
        if isinstance(device, bool) or timesteps.is_meta:  # step() reads the timesteps: they must hold values
            raise ValueError(f"device must be a torch device that holds values, got {device!r}")
        self.num_inference_steps = int(n)
        self.timesteps = timesteps
        # Each visited timestep -> the next one (-1 after the last), built once: step() looks it up every call.
        visited = timesteps.tolist()
        self._next_timestep = dict(zip(visited, visited[1:] + [-1]))
        self._alphas_cumprod = self.schedule.alphas_cumprod.tolist()  # ᾱ_t as python floats, read every step

    def _check_timestep(self, timestep: int | torch.Tensor) -> int:
        """Check that `timestep` is one the loop visits and return it as a python int."""
        if self.timesteps is None:
            raise ValueError(
                "call set_timesteps(num_inference_steps) before step(): the sampler does not yet know "
                "which timesteps the loop will visit"
            )
        if isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
            raise ValueError(f"step() takes one timestep for the whole batch, got shape {tuple(timestep.shape)}")
        is_integer_tensor = isinstance(timestep, torch.Tensor) and not (
            timestep.is_floating_point() or timestep.is_complex() or timestep.dtype == torch.bool)
        if not (is_integer_tensor or isinstance(timestep, numbers.Integral)) or isinstance(timestep, bool):
            raise TypeError(f"timestep must be an int or a one-element integer tensor from sampler.timesteps, "
                            f"got {timestep!r:.60}")
        t = int(timestep)
        if t not in self._next_timestep:
            raise ValueError(
                f"timestep {t} is not one of this sampler's timesteps; loop over sampler.timesteps "
                f"(set by set_timesteps({self.num_inference_steps}))"
            )
        return t

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep the loop visits after `timestep`, or -1 after the last one (meaning x_0).

        diffusers' DDIM uses `timestep - T // n` instead. The two agree for "leading" always and for
        "trailing" when n divides T; otherwise that jumps off the grid (for "linspace" with n = 10 it
        goes 999 -> 899 though the next timestep is 888), while this follows sampler.timesteps.
        """
        return self._next_timestep[self._check_timestep(timestep)]

    def _predict_x0_and_eps(self, model_output, t, sample, generator):
        check_samples(sample, "sample", model_output, "model_output")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        x0, eps = self.schedule.to_x0_and_eps(model_output, sample, t, self.prediction_type)
        if self.clip_sample:
            # Pixel data lives in [-1, 1]; clamping x̂_0 stops early, noisy guesses from running away.
            # Like diffusers (use_clipped_model_output=False), ε is not recomputed from the clamped x̂_0.
            x0 = x0.clamp(-1, 1)
        return x0, eps

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_names)
        return f"{type(self).__name__}({args}) on {self.schedule!r}"


class DDIMSampler(BaseSampler):
    """DDIM (Song et al. 2020): eq. (12) for the step, eq. (16) for its noise σ_t(η).

    eta: η in [0, 1]; 0 is the deterministic DDIM sampler, 1 matches DDPM's variance.
    set_alpha_to_one: which ᾱ the final step lands on. False (Stable Diffusion) uses ᾱ_0, the
        least noisy training step; True uses 1, a fully clean x_0.
    Stable Diffusion's DDIM is the default: "leading" spacing with steps_offset=1.
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
            prev_sample = prev_sample + sigma_t * _randn(sample, generator)  # + σ_t z
        return SamplerOutput(prev_sample, x0)


class DDPMSampler(BaseSampler):
    """DDPM ancestral sampling (Ho et al. 2020), posterior mean and variance of eq. (7).

    The variance is β̃_t ("fixed_small" in diffusers). No noise is added at the last step, which
    jumps to ᾱ_prev = 1 and so returns x̂_0 itself (its eq. 7 weights are 1 on x̂_0 and 0 on x_t).
    With fewer inference steps than training steps, each step uses ᾱ at the previous inference
    timestep and β_t = 1 - ᾱ_t / ᾱ_prev, as diffusers does.

    steps_offset defaults to 0 (DDIM's default is 1) so that DDPM with all 1000 steps, the way it
    was trained, works out of the box: "leading" with offset 1 would ask for timestep 1000.
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
            prev_sample = prev_sample + variance**0.5 * _randn(sample, generator)  # + sqrt(β̃_t) z
        return SamplerOutput(prev_sample, x0)
