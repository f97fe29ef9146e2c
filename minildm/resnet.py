"""ResNet blocks and resampling layers shared by the UNet and the autoencoder.

ResnetBlock2D (Ho et al. 2020, appendix B; as in Stable Diffusion):

    h = conv1(SiLU(GroupNorm(x)))
    h = h + Linear(SiLU(t_emb))[:, :, None, None]      # time injection (UNet only)
    h = conv2(Dropout(SiLU(GroupNorm(h))))
    out = shortcut(x) + h                               # 1x1 conv when channels change

GroupNorm instead of BatchNorm because diffusion batches mix very different noise levels, and the
statistics of one batch say little about the next. Depends on torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None = None,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        # eps: the GroupNorms' (diffusers' name): 1e-6 in SD's autoencoder, 1e-5 in its UNet (`norm_eps`).
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_in, H, W) -> (B, C_out, H, W)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out) -> (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 convolution (learned, unlike pooling).

    padding (diffusers' meaning): 1 pads one zero on every side (the UNet); 0 pads one zero only on the right
    and at the bottom, (0, 1, 0, 1), before an unpadded convolution, as Stable Diffusion's autoencoder encoder
    does (the original CompVis code). On an even size both give H/2, but the 3x3 windows sit one pixel apart,
    so weights trained with one padding give other outputs with the other. An odd H gives (H + 1) / 2 with
    padding 1 and (H - 1) / 2 with padding 0.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"padding must be 1 (symmetric) or 0 (Stable Diffusion's asymmetric (0, 1, 0, 1)), "
                             f"got {padding!r}")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H, W) -> (B, C, H + 1, W + 1): a zero column right, row below
        return self.conv(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 convolution (no checkerboard artefacts).

    `output_size` (H', W') upsamples to that size instead: the UNet passes its skip connection's size, so
    an odd size that a stride-2 convolution rounded up (7 -> 4) comes back as it was (4 -> 7, not 8).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")  # (B, C, H, W) -> (B, C, H', W')
        return self.conv(x)
