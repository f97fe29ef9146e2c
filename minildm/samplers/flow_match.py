"""Samplers for a rectified flow (flow.py): solve dx/dσ = v_θ(x, σ) from σ = 1 (noise) to σ = 0 (data).

    Euler:  x_{σ'} = x_σ + (σ' - σ) v_θ(x_σ, σ)                                  one model call per step
    Heun:   x̃ = x_σ + (σ' - σ) v_1,  v_1 = v_θ(x_σ, σ)                          the Euler guess, then
            x_{σ'} = x_σ + (σ' - σ) (v_1 + v_θ(x̃, σ')) / 2                      the trapezoid rule's correction

(Karras et al. 2022, arXiv:2206.00364, Algorithm 1 is the same Heun step for σ-space diffusion.) A flow
trained well has nearly straight paths, so even a few Euler steps land close to the data.

The interface is diffusers' FlowMatchEulerDiscreteScheduler's and FlowMatchHeunDiscreteScheduler's, and so
are the units: sigmas in [0, 1], timesteps = σ · num_train_timesteps (floats), set_timesteps(n) spaces n
values of σ evenly from 1 to the shifted 1/T, then applies the time shift (flow.time_shift) and ends on
σ = 0. Heun visits every timestep but the first twice (2n - 1 model calls for n steps; the last step,
to σ = 0, stays Euler as diffusers does); `order` is 2 and `timesteps` lists each visit, so the plain loop
    for t in sampler.timesteps: x = sampler.step(model(x, t), t, x).prev_sample
runs either sampler. Depends on flow.py and base.py.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..checks import check_generator
from ..flow import FlowMatchSchedule, time_shift
from ..schedule import check_samples
from .base import SamplerOutput


class FlowMatchEulerSampler:
    """Euler's method on the flow's ODE, with diffusers' FlowMatchEulerDiscreteScheduler's timesteps.

    schedule: the model's FlowMatchSchedule. shift: the time shift of the sampling σ (1 = none; SD3 uses 3).
    Raises TypeError / ValueError for a bad schedule or shift.
    """

    init_noise_sigma = 1.0  # x at σ = 1 is the noise itself
    order = 1
    prediction_type = "flow_prediction"

    def __init__(self, schedule: FlowMatchSchedule, shift: float = 1.0):
        if not isinstance(schedule, FlowMatchSchedule):
            raise TypeError(f"schedule must be a FlowMatchSchedule (a flow model's), got {type(schedule).__name__}; "
                            f"diffusion models use DDIMSampler, DDPMSampler or DPMSolverMultistepSampler")
        if not isinstance(shift, numbers.Real) or isinstance(shift, bool) or not 0 < shift < float("inf"):
            raise ValueError(f"shift must be a positive finite number (1 = no shift), got {shift!r}")
        self.schedule = schedule
        self.shift = float(shift)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None  # (n * order - (order - 1),) float32 σ · T, set by set_timesteps
        self.sigmas: torch.Tensor | None = None  # float32, the σ of each visit and a final 0
        self._step_index = 0

    def _step_sigmas(self, n: int) -> np.ndarray:
        """The n + 1 values of σ the steps go through, from 1 down to 0 (diffusers' spacing and shift)."""
        T = self.schedule.num_train_timesteps
        sigma_max, sigma_min = time_shift(1.0, self.shift), time_shift(1.0 / T, self.shift)  # of the training grid
        sigmas = time_shift(np.linspace(sigma_max, sigma_min, n), self.shift)
        return np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """n steps from σ = 1 to σ = 0; timesteps = σ · T for the model. Resets the step counter.
        Raises ValueError for n not an integer >= 1."""
        n = num_inference_steps
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        self._set_sigmas(torch.from_numpy(self._step_sigmas(int(n))), int(n), device)

    def _set_sigmas(self, sigmas: torch.Tensor, n: int, device) -> None:
        try:
            timesteps = (sigmas[:-1] * self.schedule.num_train_timesteps).to(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device must be a torch device this machine has, got {device!r} ({e})") from e
        self.num_inference_steps = n
        self.sigmas = sigmas
        self.timesteps = timesteps
        self._step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The model sees x_σ as it is."""
        return sample

    def _sigma_pair(self, timestep) -> tuple[float, float]:
        """(σ, σ_next) of the visit `timestep` must be: the loop's next one, in order."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = self._step_index
        if i >= len(self.timesteps):
            raise ValueError(f"all {len(self.timesteps)} steps have been taken; call set_timesteps again")
        expected = self.timesteps[i].item()
        value = timestep.item() if torch.is_tensor(timestep) and timestep.numel() == 1 else timestep
        if not isinstance(value, numbers.Real) or abs(float(value) - expected) > 1e-3:
            raise ValueError(f"step {i} expects timestep {expected:.4f} (loop over sampler.timesteps in order), "
                             f"got {timestep!r:.40}")
        self._step_index += 1
        return self.sigmas[i].item(), self.sigmas[i + 1].item()

    def _check(self, model_output, sample, generator) -> None:
        check_samples(sample, "sample", model_output, "model_output")
        check_generator(generator)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerOutput:
        """x_{σ'} = x_σ + (σ' - σ) v (Euler). model_output v, sample x_σ: (B, ...). Deterministic."""
        self._check(model_output, sample, generator)
        sigma, sigma_next = self._sigma_pair(timestep)
        x0 = sample - sigma * model_output  # where the straight line through x_σ with velocity v meets σ = 0
        return SamplerOutput(sample + (sigma_next - sigma) * model_output, x0)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shift={self.shift}, num_inference_steps={self.num_inference_steps}) "
                f"on {self.schedule!r}")


class FlowMatchHeunSampler(FlowMatchEulerSampler):
    """Heun's method (the trapezoid rule): two model calls per step but the last, diffusers'
    FlowMatchHeunDiscreteScheduler's timesteps. Arguments as FlowMatchEulerSampler."""

    order = 2

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """As Euler's, with every σ but the first visited twice: the guess's and the correction's model call."""
        n = num_inference_steps
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        sigmas = torch.from_numpy(self._step_sigmas(int(n)))  # (n + 1,)
        visits = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])  # σ0, σ1, σ1, σ2, σ2, ..., 0
        self._set_sigmas(visits, int(n), device)
        self._first = None  # (v_1, x_σ, dt) of the Euler guess waiting for its correction

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerOutput:
        """Alternately the Euler guess x̃ (stores v_1) and the correction from the stored x_σ."""
        self._check(model_output, sample, generator)
        i = self._step_index
        sigma, sigma_next = self._sigma_pair(timestep)
        if i % 2 == 0:  # visits 0, 2, 4, ...: an Euler guess from x_σ to σ' (the loop's order is checked above)
            dt = sigma_next - sigma
            self._first = (model_output, sample, dt)
            return SamplerOutput(sample + dt * model_output, sample - sigma * model_output)
        # visits 1, 3, ...: model_output is v_θ(x̃, σ'), with σ' = this visit's σ
        first_velocity, start, dt = self._first
        self._first = None
        x0 = sample - sigma * model_output
        return SamplerOutput(start + dt * (first_velocity + model_output) / 2, x0)
