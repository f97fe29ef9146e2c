"""The optional adversarial part of the autoencoder's loss: a patch discriminator with hinge losses.

The LDM paper trains its autoencoders "with a perceptual loss and a patch-based adversarial objective"
(Rombach et al. 2022, section 3.1, following Esser et al. 2021). The discriminator D_ψ scores every
overlapping patch of an image as real or reconstructed (Isola et al. 2017, "PatchGAN"), which pushes the
decoder towards sharp edges that an L1/L2 loss alone blurs.

Hinge losses (Lim & Ye 2017), with l = D_ψ(x) the patch logits:

    L_D = mean(ReLU(1 - l_real)) / 2 + mean(ReLU(1 + l_fake)) / 2
    L_G = -mean(l_fake)                         (added to the autoencoder's loss, times a weight)

Depends on torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Strided 4x4 convolutions: (B, C, H, W) -> patch logits (B, 1, H/2^n, W/2^n), n = num_layers."""

    def __init__(self, in_channels: int = 3, width: int = 32, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * channels),
                       nn.LeakyReLU(0.2)]
            channels *= 2
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))  # one logit per patch
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = ½ mean(ReLU(1 - l_real)) + ½ mean(ReLU(1 + l_fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -mean(l_fake): the decoder is rewarded where the discriminator believes its patches."""
    return -logits_fake.mean()
