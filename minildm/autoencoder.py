"""AutoencoderKL: the perceptual compression stage of the LDM paper (Rombach et al. 2022, section 3.1).

The encoder E maps an image x (B, 3, H, W) to a diagonal Gaussian q(z | x) over latents z of shape
(B, c, H/f, W/f), with downsampling factor f = 2^(levels - 1); the decoder D maps z back. Diffusion then
runs on z instead of x: f² times fewer positions, which is the whole point of the paper.

Training loss (section 3.1 and appendix G), written out in `training_loss`:

    L = |x - D(z)|_1 + |x - D(z)|²  +  kl_weight * KL(q(z|x) || N(0, I))  [+ adversarial term, discriminator.py]

The paper pairs L1 with an LPIPS perceptual loss; LPIPS needs pretrained VGG weights, which cannot be
downloaded here. In its place minildm adds a squared error: L1 alone lets a few badly wrong pixels (a
corner of a small square rounded off) cost little, the square makes them count. Measured on
ShapesDataset, 1200 steps: PSNR 32.6 dB -> 35.5 dB, shapes read back correctly 89% -> 92%.

Scaling factor (sections 4.3.2 and D.1): the diffusion model wants latents of unit variance, so latents are
multiplied by scaling_factor = 1 / std(z) estimated on training data. Stable Diffusion's 0.18215 is
exactly this number for its autoencoder. It is stored in the config and saved with the model.

Notation: f downsampling factor, c latent_channels. Layout and names follow diffusers' AutoencoderKL
(encoder.down_blocks.0.resnets.0, quant_conv, post_quant_conv, decoder.up_blocks...).
Depends on resnet.py and attention.py (and checkpoint.py for save/load).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .checkpoint import load_module, save_module
from .checks import check_images, check_like_weights
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one entry per level: f = 2^(levels - 1)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    scaling_factor: float = 1.0  # set from data by estimate_scaling_factor()
    # How the encoder's stride-2 convolutions pad (resnet.Downsample2D): 1 on every side (minildm's default), or
    # 0, Stable Diffusion's (0, 1, 0, 1), which its weights need. config_dict() writes it only when it is 0.
    downsample_padding: int = 1

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if not 1 <= len(self.block_out_channels) <= 4:
            raise ValueError(f"block_out_channels needs 1 to 4 levels (f = 1, 2, 4 or 8), "
                             f"got {self.block_out_channels}")
        sizes = {"in_channels": self.in_channels, "latent_channels": self.latent_channels,
                 "layers_per_block": self.layers_per_block, "norm_num_groups": self.norm_num_groups}
        sizes.update({f"block_out_channels[{i}]": ch for i, ch in enumerate(self.block_out_channels)})
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (layers_per_block, latent_channels and "
                                 f"in_channels must be at least 1), got {value!r}")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups != 0:
                raise ValueError(f"block_out_channels entries must divide by norm_num_groups={self.norm_num_groups}, "
                                 f"got {ch}")
        if not isinstance(self.scaling_factor, (int, float)) or not 0 < self.scaling_factor < math.inf:
            raise ValueError(f"scaling_factor must be positive and finite, got {self.scaling_factor!r}")
        if self.downsample_padding not in (0, 1) or isinstance(self.downsample_padding, bool):
            raise ValueError(f"downsample_padding must be 1 (symmetric) or 0 (Stable Diffusion's (0, 1, 0, 1)), "
                             f"got {self.downsample_padding!r}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def for_factor(cls, f: int, in_channels: int = 3, latent_channels: int = 4, width: int = 32,
                   norm_num_groups: int = 16, layers_per_block: int = 1) -> AutoencoderConfig:
        """A small autoencoder with downsampling factor f in {1, 2, 4, 8}; channels double after the first level."""
        levels = {1: 1, 2: 2, 4: 3, 8: 4}
        if f not in levels:
            raise ValueError(f"downsampling factor f must be one of 1, 2, 4, 8, got {f}")
        channels = tuple(width * min(2**level, 2) for level in range(levels[f]))
        return cls(in_channels, latent_channels, channels, layers_per_block, norm_num_groups)


class DiagonalGaussianDistribution:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's (B, 2c, h, w) output."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, 2c, h, w) -> 2 x (B, c, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * ε, ε ~ N(0, I) (the reparameterisation trick, Kingma & Welling 2014)."""
        # Drawn where the generator lives (a CPU generator gives the same noise whatever the model's device).
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(μ, σ²) || N(0, 1)) = ½ Σ (μ² + σ² - 1 - log σ²), summed over (c, h, w): (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VAEAttention(Attention):
    """Single-head self-attention over all h*w positions of a feature map, with its GroupNorm and residual."""

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__(channels, None, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        h = super().forward(h)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)


class VAEMidBlock(nn.Module):
    """ResNet, self-attention, ResNet at the lowest resolution: the one place the autoencoder sees globally."""

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, norm_num_groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, norm_num_groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, C, H, W) -> (B, 2c, H/f, W/f), the mean and log-variance; with double_z=False (diffusers' name)
    (B, c, H/f, W/f), one value per latent, for a deterministic encoder (VQModel, vq.py)."""

    def __init__(self, c: AutoencoderConfig, double_z: bool = True):
        super().__init__()
        channels = c.block_out_channels
        self.conv_in = nn.Conv2d(c.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        in_ch = channels[0]
        for level, out_ch in enumerate(channels):
            block = nn.Module()
            block.resnets = nn.ModuleList(
                [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, c.norm_num_groups)
                 for i in range(c.layers_per_block)]
            )
            block.downsamplers = nn.ModuleList([Downsample2D(out_ch, c.downsample_padding)]
                                               if level < len(channels) - 1 else [])
            self.down_blocks.append(block)
            in_ch = out_ch
        self.mid_block = VAEMidBlock(channels[-1], c.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[-1], eps=1e-6)
        out_channels = 2 * c.latent_channels if double_z else c.latent_channels  # mean and log-variance, or z
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, 3, H, W) -> (B, C0, H, W)
        for block in self.down_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            for downsampler in block.downsamplers:
                x = downsampler(x)  # (B, C, H, W) -> (B, C, H/2, W/2)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2c or c, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        channels = tuple(reversed(c.block_out_channels))
        self.conv_in = nn.Conv2d(c.latent_channels, channels[0], 3, padding=1)
        self.mid_block = VAEMidBlock(channels[0], c.norm_num_groups)
        self.up_blocks = nn.ModuleList()
        in_ch = channels[0]
        for level, out_ch in enumerate(channels):
            block = nn.Module()
            # One more ResNet than the encoder per level, as in Stable Diffusion's decoder.
            block.resnets = nn.ModuleList(
                [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, c.norm_num_groups)
                 for i in range(c.layers_per_block + 1)]
            )
            block.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if level < len(channels) - 1 else [])
            self.up_blocks.append(block)
            in_ch = out_ch
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)  # (B, c, h, w) -> (B, C_last, h, w)
        x = self.mid_block(x)
        for block in self.up_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            for upsampler in block.upsamplers:
                x = upsampler(x)  # (B, C, h, w) -> (B, C, 2h, 2w)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config if config is not None else AutoencoderConfig()
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    # The first-stage slot (interfaces.FirstStage): what LatentDiffusion asks of any first stage.
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def config_dict(self) -> dict:
        """The config as JSON-able values; downsample_padding only when it is not the default 1, so the folder
        of a model that does not use it is the one an earlier minildm wrote and can read."""
        config = asdict(self.config)
        if config["downsample_padding"] == 1:
            del config["downsample_padding"]
        return config

    @classmethod
    def from_config_dict(cls, config: dict) -> AutoencoderKL:
        return cls(AutoencoderConfig(**config))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x (B, C, H, W) in [-1, 1] -> q(z | x) over latents (B, c, H/f, W/f). Latents are *not* scaled here.

        Raises TypeError for a non-tensor or a dtype unlike the weights', ValueError for a wrong shape,
        H or W not a multiple of f, or another device."""
        c = self.config
        check_images(x, "x", c.in_channels, c.downsampling_factor)
        check_like_weights(x, "x", self.quant_conv.weight, "images")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, c, h, w) -> images (B, C, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        check_images(z, "z", self.config.latent_channels, what="latents")
        check_like_weights(z, "z", self.quant_conv.weight, "latents")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def training_loss(self, x: torch.Tensor, kl_weight: float = 1e-6, generator: torch.Generator | None = None,
                      noise: torch.Tensor | None = None):
        """L1 + L2 reconstruction + kl_weight * KL, each averaged per element (C*H*W) so kl_weight does not
        depend on the image size (the ratio CompVis uses); returns (loss, reconstruction, parts dict) with
        parts "reconstruction" (the L1 term alone, comparable across runs) and "kl".

        x (B, C, H, W) in [-1, 1]. z = μ + σ ε with ε = `noise` (B, c, H/f, W/f) when given, else drawn
        from `generator`."""
        posterior = self.encode(x)
        if noise is not None:
            check_images(noise, "noise", self.config.latent_channels, what="latents")
            z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # the reparameterisation trick
        else:
            z = posterior.sample(generator)
        reconstruction = self.decode(z)
        error = x - reconstruction
        l1 = error.abs().mean()  # |x - D(z)|_1 per element
        rec_loss = l1 + error.pow(2).mean()  # + |x - D(z)|² per element
        kl_loss = posterior.kl().mean() / x[0].numel()  # KL per element
        loss = rec_loss + kl_weight * kl_loss
        return loss, reconstruction, {"reconstruction": l1.detach(), "kl": kl_loss.detach()}

    @torch.no_grad()
    def estimate_scaling_factor(self, images: torch.Tensor, batch_size: int = 256,
                                generator: torch.Generator | None = None) -> float:
        """1 / std of posterior samples over `images` (LDM sections 4.3.2 and D.1); sets config.scaling_factor and
        returns it."""
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        latents = torch.cat([self.encode(batch).sample(generator) for batch in batches])  # (N, c, h, w)
        self.config.scaling_factor = float(1.0 / latents.flatten().std())
        return self.config.scaling_factor

    def save(self, directory: str | os.PathLike) -> None:
        """autoencoder.safetensors + autoencoder.json (the config, scaling factor included), written atomically."""
        save_module(self, self.config, directory, "autoencoder")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AutoencoderKL:
        return load_module(cls, AutoencoderConfig, directory, "autoencoder")
