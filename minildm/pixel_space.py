"""The identity first stage: diffusion directly on pixels, the paper's LDM-1 (f = 1, z_0 = x).

Rombach et al. 2022 (section 4.1) compare first stages with downsampling factors f = 1, 2, 4, ..., 32;
f = 1 is a plain pixel-space diffusion model, the baseline that shows what the latent space buys. Here it
is a first stage like any other (interfaces.FirstStage), so the pipeline needs no special case:
`encode` returns the images themselves as a point mass, `decode` returns the latents as images, and the
scaling factor is 1 (pixels in [-1, 1] are already close to unit scale).

Depends on torch only.
"""

from __future__ import annotations

import torch
from torch import nn


class PointMass:
    """A deterministic encoder's "distribution": all its mass on one value. mean = sample() = mode(), std = 0."""

    def __init__(self, value: torch.Tensor):
        self.mean = value
        self.std = torch.zeros_like(value)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


class PixelSpace(nn.Module):
    """E(x) = x and D(z) = z for images of `channels` channels: a first stage with f = 1 and no weights."""

    scaling_factor = 1.0
    downsampling_factor = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        self.in_channels = self.latent_channels = channels

    def encode(self, images: torch.Tensor) -> PointMass:
        """images (B, C, H, W) in [-1, 1] -> a point mass at the images themselves."""
        return PointMass(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, H, W) -> the same tensor, as images."""
        return latents

    def config_dict(self) -> dict:
        return {"channels": self.in_channels}

    @classmethod
    def from_config_dict(cls, config: dict) -> PixelSpace:
        return cls(**config)

    def extra_repr(self) -> str:
        return f"channels={self.in_channels}"
