"""What every sampler shares: the inference timesteps, the step's bookkeeping, and its output.

A sampler runs the diffusion process backwards from x_T ~ N(0, init_noise_sigma² I) to x_0, one
`step` per entry of `timesteps`. It never sees a network: the loop (yours, or LatentDiffusion.generate)
calls the model and hands its output to `step`, as in diffusers:

    sampler = DDIMSampler(NoiseSchedule())
    sampler.set_timesteps(50)                       # also resets any state a sampler keeps between steps
    x = randn_tensor(shape, generator) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        model_output = model(sampler.scale_model_input(x, t), t)
        x = sampler.step(model_output, t, x, generator=generator).prev_sample

What a sampler must offer for that loop is written down in interfaces.Sampler. DDPM and DDIM step in
the timesteps the model was trained on (integers 0 .. T-1), start from unit-variance noise and feed the
model x_t as it is (init_noise_sigma = 1, scale_model_input is the identity), one model call per step
(order = 1). Samplers that work in σ (Euler, Heun) or in flow time differ in exactly those places.

Notation: alphas_cumprod[t] = ᾱ_t, T = num_train_timesteps, n = num_inference_steps; "prev" is the
next timestep of the loop (a smaller t), -1 after the last one. Depends on schedule.py (and checks.py).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import torch

from ..checks import check_generator
from ..schedule import PREDICTION_TYPES, NoiseSchedule, check_samples

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SamplerOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_prev, the input of the next step
    pred_original_sample: torch.Tensor  # x̂_0, the model's current guess of the clean sample


def randn_tensor(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn where the generator lives, then moved to `device`.

    Drawing on the generator's device (the CPU for torch.Generator()) makes one seed give the same noise
    whatever device the model is on (diffusers' `randn_tensor` does the same). The copy to a GPU goes
    through pinned memory, so it does not make the host wait for the GPU's queued work: a sampler step
    would otherwise stall the loop once per step (measured in benchmarks/sampling.py).
    """
    draw_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    device = torch.device(device) if device is not None else noise.device
    if noise.device.type == "cpu" and device.type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


class BaseSampler:
    """What DDPM and DDIM share: arguments, the inference timesteps, and the step bookkeeping."""

    init_noise_sigma = 1.0  # x_T ~ N(0, I): these samplers start from unit-variance noise
    order = 1  # one model call per step
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
        self._alphas_cumprod = schedule.alphas_cumprod.tolist()  # ᾱ_t as python floats, read every step

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose which of the T training timesteps the loop visits, as diffusers does (descending).

        With T = num_train_timesteps and n = num_inference_steps:
          - "leading":  arange(0, n) * (T // n) + steps_offset, reversed. T=1000, n=10, offset 1
                        gives 901, 801, ..., 1 (Stable Diffusion's DDIM). It never reaches t = T - 1:
                        the first step starts from less noise than training ended with.
          - "trailing": round(arange(T, 0, -T / n)) - 1, so the loop starts at t = T - 1, the
                        noisiest step, for any n (recommended by Lin et al. 2023, arXiv:2305.08891).
          - "linspace": round(linspace(0, T - 1, n)), reversed.
        steps_offset is used by "leading" only. `timesteps` stays on the CPU unless `device` says otherwise:
        step() reads each one as a python int, which on a GPU tensor would wait for the GPU every step.

        Raises ValueError for n outside 1..T, for a "leading" offset that runs past T - 1, or a bad device.
        """
        T = self.schedule.num_train_timesteps
        n = num_inference_steps
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an integer between 1 and {T}, got {n!r}")
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
        self._use_timesteps(timesteps, device)

    def _use_timesteps(self, timesteps: np.ndarray, device=None) -> None:
        """Make `timesteps` (descending integers) the ones the loop visits."""
        try:
            device = torch.device(device) if device is not None and not isinstance(device, bool) else device
            timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)  # (n,) descending
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # not a device, or one this machine lacks
            raise ValueError(f"device must be a torch device this machine has, got {device!r} ({e})") from e
        if isinstance(device, bool) or timesteps.is_meta:  # step() reads the timesteps: they must hold values
            raise ValueError(f"device must be a torch device that holds values, got {device!r}")
        self.num_inference_steps = len(timesteps)
        self.timesteps = timesteps
        # Each visited timestep -> the next one (-1 after the last), built once: step() looks it up every call.
        visited = timesteps.tolist()
        self._next_timestep = dict(zip(visited, visited[1:] + [-1]))

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """The model sees x_t as it is (Euler-type samplers, working in σ, scale it here)."""
        return sample

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
        check_generator(generator)
        x0, eps = self.schedule.to_x0_and_eps(model_output, sample, t, self.prediction_type)
        if self.clip_sample:
            # Pixel data lives in [-1, 1]; clamping x̂_0 stops early, noisy guesses from running away.
            # Like diffusers (use_clipped_model_output=False), ε is not recomputed from the clamped x̂_0.
            x0 = x0.clamp(-1, 1)
        return x0, eps

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_names)
        return f"{type(self).__name__}({args}) on {self.schedule!r}"
