"""Rectified flow / flow matching: a straight path from data to noise, and the velocity along it.

Instead of a Markov chain of small noisings, draw x_0 from the data and ε ~ N(0, I), and join them by a
straight line traversed as σ goes from 0 to 1 (Liu et al. 2022, arXiv:2209.03003, sec. 2; Lipman et al.
2022, arXiv:2210.02747, its optimal-transport path; Esser et al. 2024, arXiv:2403.03206, sec. 2):

    x_σ = (1 - σ) x_0 + σ ε                                  the path
    dx_σ / dσ = ε - x_0                                      its velocity, the network's target

The network v_θ(x_σ, σ) is trained to predict that velocity, L = E ||(ε - x_0) - v_θ(x_σ, σ)||², and an
image is made by solving dx/dσ = v_θ(x, σ) from pure noise at σ = 1 down to σ = 0 (samplers/flow_match.py).
Unlike v-prediction's v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0, which lives on a circle, this v is the constant
velocity of a straight line: prediction_type="flow_prediction" keeps the two apart.

Two choices of Stable Diffusion 3 (Esser et al. 2024):
  - where to train: σ = sigmoid(u), u ~ N(m, s²), "logit-normal" sampling (their sec. 3.1), which puts
    more of the training on the middle of the path, where predicting the velocity is hardest;
  - where to sample: the time shift σ' = shift · σ / (1 + (shift - 1) · σ) (their sec. 5.3.2,
    "resolution-dependent shifting"): shift > 1 spends more of the steps at high noise.

The network sees timestep = σ · num_train_timesteps, a float in [0, T], as diffusers' flow-matching
schedulers give it. Notation: sigma = σ in [0, 1] (0 = data, 1 = noise), T = num_train_timesteps.
Depends on torch only.
"""

from __future__ import annotations

import math
import numbers

import torch

from .schedule import MAX_TRAIN_TIMESTEPS, check_samples


def time_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = shift · σ / (1 + (shift - 1) · σ) (Esser et al. 2024, sec. 5.3.2); keeps 0 and 1 in place and,
    for shift > 1, moves every σ in between towards 1 (more noise). sigmas: any shape, in [0, 1]."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatchSchedule:
    """The rectified-flow path x_σ = (1 - σ) x_0 + σ ε and how training draws σ.

    num_train_timesteps: T; the network sees timestep = σ · T (diffusers' convention, T = 1000).
    logit_mean, logit_std: m and s of logit-normal σ sampling (SD3's defaults 0 and 1).
    Raises ValueError for T outside 1 .. 100000 or s <= 0.

        schedule = FlowMatchSchedule()
        sigmas = schedule.sample_sigmas(x0.shape[0], generator)        # (B,) in (0, 1)
        x_t = schedule.add_noise(x0, noise, sigmas)                     # (B, C, H, W)
        target = schedule.get_velocity(x0, noise)                       # ε - x_0
        timesteps = sigmas * schedule.num_train_timesteps               # what the network sees
    """

    prediction_type = "flow_prediction"

    def __init__(self, num_train_timesteps: int = 1000, logit_mean: float = 0.0, logit_std: float = 1.0):
        if (not isinstance(num_train_timesteps, numbers.Integral) or isinstance(num_train_timesteps, bool)
                or not 1 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS):
            raise ValueError(f"num_train_timesteps must be an integer from 1 to {MAX_TRAIN_TIMESTEPS}, "
                             f"got {num_train_timesteps!r}")
        for name, value in (("logit_mean", logit_mean), ("logit_std", logit_std)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)

    def config_dict(self) -> dict:
        """The arguments that rebuild this schedule: FlowMatchSchedule(**schedule.config_dict())."""
        return {"num_train_timesteps": self.num_train_timesteps, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std}

    def __eq__(self, other) -> bool:
        if not isinstance(other, FlowMatchSchedule):
            return NotImplemented
        return self.config_dict() == other.config_dict()

    def __repr__(self) -> str:
        return (f"FlowMatchSchedule(num_train_timesteps={self.num_train_timesteps}, logit_mean={self.logit_mean}, "
                f"logit_std={self.logit_std})")

    def sample_sigmas(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch_size,) float32 σ = sigmoid(u), u ~ N(logit_mean, logit_std²), drawn on the CPU (SD3 sec. 3.1)."""
        u = torch.randn(batch_size, generator=generator) * self.logit_std + self.logit_mean
        return torch.sigmoid(u)

    def _check_sigmas(self, sigmas: torch.Tensor) -> None:
        """Raise ValueError unless `sigmas` is a 0-d or 1-d floating-point tensor with values in [0, 1]."""
        if not torch.is_tensor(sigmas) or not sigmas.is_floating_point() or sigmas.ndim > 1:
            raise ValueError(f"sigmas must be a number or a 0-d / 1-d floating-point tensor, got {sigmas!r:.60}")
        if sigmas.numel() and (sigmas.min() < 0 or sigmas.max() > 1):
            raise ValueError(f"sigmas must lie in [0, 1], got values from {sigmas.min().item():.4g} to "
                             f"{sigmas.max().item():.4g}; timesteps are σ · {self.num_train_timesteps}")

    def _sigmas(self, sigmas, like: torch.Tensor) -> torch.Tensor | float:
        """σ as a python float, or (B,) -> (B, 1, ..., 1) in like's dtype and device; checked to lie in [0, 1]."""
        if isinstance(sigmas, numbers.Real) and not isinstance(sigmas, bool):
            if not 0 <= sigmas <= 1:
                raise ValueError(f"sigma must lie in [0, 1] (0 = data, 1 = noise), got {sigmas}")
            return float(sigmas)
        self._check_sigmas(sigmas)
        if sigmas.ndim == 1 and (like.ndim == 0 or sigmas.shape[0] not in (1, like.shape[0])):
            raise ValueError(f"got {sigmas.shape[0]} sigmas for a batch of shape {tuple(like.shape)}")
        return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, sigmas) -> torch.Tensor:
        """x_σ = (1 - σ) x_0 + σ ε. original_samples x_0, noise ε: (B, ...); sigmas: (B,) or a number in [0, 1]."""
        check_samples(original_samples, "original_samples", noise, "noise")
        sigma = self._sigmas(sigmas, original_samples)
        return (1 - sigma) * original_samples + sigma * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The target u = dx_σ/dσ = ε - x_0, the same at every σ. sample is the clean x_0, noise ε."""
        check_samples(sample, "sample", noise, "noise")
        return noise - sample

    def predict_x0(self, x_t: torch.Tensor, velocity: torch.Tensor, sigmas) -> torch.Tensor:
        """x_0 = x_σ - σ v: follow the straight line back to σ = 0 (x_σ - σ (ε - x_0) = x_0)."""
        check_samples(x_t, "x_t", velocity, "velocity")
        return x_t - self._sigmas(sigmas, x_t) * velocity

    def to_sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The network's timesteps σ · T (B,) back to σ (B,) float32, checked to lie in [0, T]."""
        if (not torch.is_tensor(timesteps) or timesteps.ndim > 1 or timesteps.is_complex()
                or timesteps.dtype == torch.bool):
            raise ValueError(f"timesteps must be a 0-d or 1-d real tensor, got {timesteps!r:.60}")
        sigmas = timesteps.float() / self.num_train_timesteps
        self._check_sigmas(sigmas)
        return sigmas
