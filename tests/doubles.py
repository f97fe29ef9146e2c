"""Test doubles for the four slots of interfaces.py: the smallest classes that fill each slot, written here
without minildm's code, so that LatentDiffusion is shown to rely on the interface and nothing else.

    TrueNoiseBackbone   a backbone that knows the clean sample x_0 and returns the exact ε of its input
    HalvingFirstStage   a first stage with f = 2: average-pool to encode, nearest upsampling to decode
    CountConditioner    a conditioner whose states say how many words each prompt has
    HeunLikeSampler     a sampler in σ (Karras et al. 2022's variance-exploding form) with float timesteps,
                        init_noise_sigma != 1, a scale_model_input, two model calls per step (order 2) and
                        state that set_timesteps must reset; it records what the loop did
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TrueNoiseBackbone(nn.Module):
    """ε_θ(z_t, t) = (z_t - sqrt(ᾱ_t) x_0) / sqrt(1 - ᾱ_t), computed in float64 from the schedule's ᾱ: the
    noise a perfect model would predict for the fixed clean sample `x0` (1, c, h, w)."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor, cross_attention_dim: int = 8):
        super().__init__()
        self.in_channels = self.out_channels = x0.shape[1]
        self.cross_attention_dim = cross_attention_dim
        self.x0, self.alphas_cumprod = x0, alphas_cumprod
        self.weight = nn.Parameter(torch.zeros(()))  # something to train, and to carry a device and dtype
        self.timesteps_seen: list = []
        self.inputs_seen: list[torch.Tensor] = []

    def forward(self, sample, timestep, encoder_hidden_states):
        assert encoder_hidden_states.shape[:2] == (sample.shape[0], 2)
        self.timesteps_seen.append(timestep)
        self.inputs_seen.append(sample)
        t = timestep if not torch.is_tensor(timestep) or timestep.numel() == 1 else timestep[0]
        alpha_bar = self.alphas_cumprod[round(float(t))]  # float timesteps are read at the nearest integer
        eps = (sample.double() - alpha_bar.sqrt() * self.x0.double()) / (1 - alpha_bar).sqrt()
        return eps.to(sample.dtype) + 0 * self.weight  # (B, c, h, w)

    def cross_attention_modules(self) -> dict:
        return {}

    def config_dict(self) -> dict:
        return {}


class HalvingFirstStage(nn.Module):
    """E(x) = 2x2 average pool (f = 2), D(z) = nearest upsampling, with a learned-looking but fixed scale."""

    downsampling_factor = 2
    scaling_factor = 0.5

    def __init__(self, channels: int = 3):
        super().__init__()
        self.in_channels = self.latent_channels = channels
        self.gain = nn.Parameter(torch.ones(()), requires_grad=False)

    def encode(self, images):
        mean = F.avg_pool2d(images, 2) * self.gain  # (B, C, H, W) -> (B, C, H/2, W/2)
        return _PointMass(mean)

    def decode(self, latents):
        return F.interpolate(latents, scale_factor=2.0, mode="nearest")  # (B, C, h, w) -> (B, C, 2h, 2w)

    def config_dict(self) -> dict:
        return {"channels": self.in_channels}


class _PointMass:
    def __init__(self, value):
        self.mean, self.std = value, torch.zeros_like(value)

    def sample(self, generator=None):
        return self.mean

    def mode(self):
        return self.mean


class CountConditioner(nn.Module):
    """encode(prompts) -> (B, 2, D): a learned vector times the number of words, then a constant token."""

    null_condition = ""

    def __init__(self, hidden_size: int = 8):
        super().__init__()
        self.hidden_size = hidden_size
        self.direction = nn.Parameter(torch.linspace(-1, 1, hidden_size))

    def encode(self, prompts):
        counts = torch.tensor([float(len(p.split())) for p in prompts], device=self.direction.device)
        first = counts[:, None] * self.direction  # (B, D)
        return torch.stack([first, torch.ones_like(first)], dim=1)  # (B, 2, D)

    def tokens(self, prompt):
        return prompt.split()[:2]

    def ignored_words(self, prompt):
        words = prompt.split()
        return {"past the limit of 2 words": words[2:]} if len(words) > 2 else {}

    def config_dict(self) -> dict:
        return {"hidden_size": self.hidden_size}

    @classmethod
    def from_config_dict(cls, config: dict):
        return cls(**config)


class HeunLikeSampler:
    """Heun's method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 1 without churn) for an
    ε-predicting model of a DDPM schedule: x = x_0 + σ ε with σ(t) = sqrt((1 - ᾱ_t) / ᾱ_t). The model sees
    x / sqrt(σ² + 1), which is the DDPM sample at t. Timesteps are floats (a linspace from T - 1 to 0, read
    at the nearest integer); each step but the last takes two model calls (order 2), so every interior
    timestep is listed twice. step() keeps the first call's result as state, which set_timesteps resets;
    it asserts that the loop calls it in order, and it records what it was given."""

    order = 2
    prediction_type = "epsilon"

    def __init__(self, schedule):
        self.schedule = schedule
        self.timesteps = None
        self.set_timesteps_calls = 0
        self.scaled_at: list[float] = []

    def sigma(self, timestep) -> float:
        alpha_bar = float(self.schedule.alphas_cumprod[round(float(timestep))])
        return ((1 - alpha_bar) / alpha_bar) ** 0.5

    @property
    def init_noise_sigma(self) -> float:
        return self.sigma(self.schedule.num_train_timesteps - 1)  # x_T = σ_max ε

    def set_timesteps(self, num_inference_steps, device=None):
        t = torch.linspace(self.schedule.num_train_timesteps - 1, 0, num_inference_steps).tolist()  # (n,) floats
        self._t = t
        self._sigmas = [self.sigma(v) for v in t] + [0.0]  # σ_0 > ... > σ_{n-1} > σ_n = 0
        self.timesteps = torch.tensor([t[0]] + [v for v in t[1:] for _ in range(2)])  # (2n - 1,) float32
        self._i, self._pending = 0, None  # the state every call must start without
        self.set_timesteps_calls += 1

    def scale_model_input(self, sample, timestep):
        self.scaled_at.append(float(timestep))
        return sample / (self.sigma(timestep) ** 2 + 1) ** 0.5

    def step(self, model_output, timestep, sample, generator=None):
        i = self._i
        if self._pending is None:  # the first call of step i: Euler from σ_i to σ_{i+1}, dx/dσ = ε
            assert round(float(timestep)) == round(self._t[i]), "a step out of order (or state not reset)"
            sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
            prev = sample + (sigma_next - sigma) * model_output
            if sigma_next == 0:  # the last step is Euler only
                self._i += 1
            else:
                self._pending = (sample, model_output, sigma, sigma_next)
            return _Out(prev, sample - sigma * model_output)
        sample_i, derivative_i, sigma, sigma_next = self._pending  # the second call: Heun's correction
        assert round(float(timestep)) == round(self._t[i + 1]), "a step out of order"
        self._pending, self._i = None, i + 1
        prev = sample_i + (sigma_next - sigma) * 0.5 * (derivative_i + model_output)
        return _Out(prev, sample - sigma_next * model_output)


class _Out:
    def __init__(self, prev_sample, pred_original_sample):
        self.prev_sample, self.pred_original_sample = prev_sample, pred_original_sample
