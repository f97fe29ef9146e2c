"""The denoising UNet ε_θ(z_t, t, τ_θ(y)) of the LDM paper (Rombach et al. 2022, section 3.3).

    sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, L, D_text)
      -> conv_in -> down_blocks (ResNet [+ spatial transformer], downsample)   ── skips ──┐
      -> mid_block (ResNet, spatial transformer, ResNet)                                  │
      -> up_blocks (concat skip, ResNet [+ spatial transformer], upsample)  <─────────────┘
      -> GroupNorm, SiLU, conv_out -> (B, C, h, w)

The timestep enters every ResNet block through a sinusoidal embedding (Vaswani et al. 2017, as in
Ho et al. 2020) and an MLP; the text enters the spatial transformers through cross-attention
(attention.py). Sub-module names follow Stable Diffusion's UNet in diffusers (down_blocks.0.resnets.1,
down_blocks.1.attentions.0.transformer_blocks.0.attn2, ...) so its weights load by renaming keys.

Depends on attention.py and resnet.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, Transformer2DModel
from .checks import check_like_weights, check_text_states
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (64, 128)
    attention_levels: tuple[bool, ...] = (False, True)  # a spatial transformer at this level?
    layers_per_block: int = 1
    cross_attention_dim: int | None = 128  # width of the text encoder's tokens; None = unconditional
    # The width of one attention head (heads = channels / attention_head_dim), one for every level or one per
    # level. Not diffusers' `attention_head_dim`, which for historical reasons counts heads: SD 1.x's "8" is
    # 8 heads at every level, head widths (40, 80, 160, 160) here; SD 2.x's [5, 10, 20, 20] is 64 here.
    attention_head_dim: int | tuple[int, ...] = 32
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    dropout: float = 0.0
    # Stable Diffusion's settings (their defaults are minildm's earlier fixed choices; config_dict() writes them
    # only when they differ, so folders saved before they existed read the same):
    use_linear_projection: bool = True  # spatial transformers' proj_in / proj_out: Linear (SD 2.x) or 1x1 conv (SD 1.x)
    norm_eps: float = 1e-6  # eps of the ResNets' GroupNorms and of conv_norm_out; SD uses 1e-5
    upcast_attention: bool = False  # attention in float32 when the model runs in float16 / bfloat16 (SD 2.1)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(self.attention_levels)
        if isinstance(self.attention_head_dim, (list, tuple)):
            self.attention_head_dim = tuple(self.attention_head_dim)
            if len(self.attention_head_dim) != len(self.block_out_channels):
                raise ValueError(f"attention_head_dim needs one entry per level ({len(self.block_out_channels)}) or "
                                 f"one for all, got {self.attention_head_dim}")
        sizes = {"in_channels": self.in_channels, "out_channels": self.out_channels, "layers_per_block":
                 self.layers_per_block, "norm_num_groups":
                 self.norm_num_groups, "transformer_layers_per_block": self.transformer_layers_per_block,
                 "cross_attention_dim": 1 if self.cross_attention_dim is None else self.cross_attention_dim}
        sizes.update({f"block_out_channels[{i}]": ch for i, ch in enumerate(self.block_out_channels)})
        sizes.update({f"attention_head_dim[{i}]" if isinstance(self.attention_head_dim, tuple) else
                      "attention_head_dim": self.head_dim(i) for i in range(len(self.block_out_channels))})
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one level, got ()")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if len(self.block_out_channels) != len(self.attention_levels):
            raise ValueError(
                f"attention_levels needs one entry per level: {len(self.block_out_channels)} levels in "
                f"block_out_channels={self.block_out_channels}, got attention_levels={self.attention_levels}"
            )
        for level, ch in enumerate(self.block_out_channels):
            if ch % self.norm_num_groups != 0:
                raise ValueError(f"block_out_channels entries must divide by norm_num_groups={self.norm_num_groups}, "
                                 f"got {ch}")
            if ch % self.head_dim(level) != 0:
                raise ValueError(f"block_out_channels entries must divide by their attention_head_dim="
                                 f"{self.head_dim(level)}, got {ch} at level {level}")
        for name in ("use_linear_projection", "upcast_attention"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps must be a number in (0, 1), got {self.norm_eps!r}")

    def head_dim(self, level: int) -> int:
        """The width of one attention head at `level` (the mid block uses the last level's)."""
        dims = self.attention_head_dim
        return dims[level] if isinstance(dims, tuple) else dims

    def heads(self, level: int) -> int:
        """The number of attention heads at `level`: its channels / its head width."""
        return self.block_out_channels[level] // self.head_dim(level)

    @classmethod
    def tiny(cls, in_channels: int = 4, cross_attention_dim: int | None = 128) -> UNetConfig:
        """About 1.5M parameters: the latent UNet of the CPU demo (8x8x4 latents)."""
        return cls(in_channels=in_channels, out_channels=in_channels, block_out_channels=(64, 128),
                   attention_levels=(False, True), cross_attention_dim=cross_attention_dim)

    @classmethod
    def sd_shaped(cls, in_channels: int = 4, cross_attention_dim: int | None = 256) -> UNetConfig:
        """Stable Diffusion's layout (4 levels, 2 ResNets per level, attention at the first three) at reduced width."""
        return cls(in_channels=in_channels, out_channels=in_channels, block_out_channels=(64, 128, 256, 256),
                   attention_levels=(True, True, True, False), layers_per_block=2,
                   cross_attention_dim=cross_attention_dim, attention_head_dim=32)


SD_FIELD_DEFAULTS = {"use_linear_projection": True, "norm_eps": 1e-6, "upcast_attention": False}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding: [cos(t ω_k), sin(t ω_k)] with ω_k = max_period^(-k / (dim/2)), k = 0 .. dim/2 - 1.

    (Vaswani et al. 2017 sec. 3.5, cos first as in Stable Diffusion.) timesteps (B,) -> (B, dim). This is
    diffusers' get_timestep_embedding with SD's flip_sin_to_cos=True and freq_shift=0 (tests/test_unet.py).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * exponent.exp()[None, :]  # (B, 1) * (1, half) -> (B, half)
    embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, 2 * half)
    if dim % 2 == 1:  # an odd width gets a zero column, so the result is always (B, dim)
        embedding = F.pad(embedding, (0, 1))
    return embedding


def timestep_per_sample(timestep, sample: torch.Tensor) -> torch.Tensor:
    """`timestep` as one value per sample, (B,), on `sample`'s device.

    Takes a number (int or float), a one-element tensor (one t for the whole batch), or a (B,) or (B, 1)
    tensor; raises TypeError for anything else and ValueError for a wrong shape. A number, or a CPU
    scalar given to a model on a GPU, is filled in on the device rather than copied there: a copy would
    make the host wait for the GPU once per sampling step.
    """
    B = sample.shape[0]
    if isinstance(timestep, bool) or not isinstance(timestep, (int, float, torch.Tensor)) or (
            torch.is_tensor(timestep) and (timestep.is_complex() or timestep.dtype == torch.bool)):
        raise TypeError(f"timestep must be a number or a real tensor, got {timestep!r:.60}")
    on_cpu_for_a_gpu = torch.is_tensor(timestep) and timestep.device.type == "cpu" and sample.device.type != "cpu"
    if on_cpu_for_a_gpu and timestep.numel() == 1 and timestep.ndim <= 2:
        timestep = timestep.item()  # reading a CPU tensor costs nothing
    if not torch.is_tensor(timestep):
        if isinstance(timestep, int) and not -(2**63) <= timestep < 2**63:
            raise ValueError(f"timestep must fit in 64 bits, got {timestep}")
        return torch.full((B,), timestep, device=sample.device)  # a single t applies to the whole batch
    if timestep.ndim > 2 or timestep.numel() not in (1, B) or (timestep.ndim == 2 and timestep.shape[1] != 1):
        raise ValueError(f"timestep must be a single value, shape (B,) or (B, 1) with B={B}, "
                         f"got shape {tuple(timestep.shape)}")
    return timestep.to(sample.device).reshape(-1).expand(B)  # (), (1,), (B,) or (B, 1) -> (B,)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def spatial_transformer(config: UNetConfig, level: int) -> Transformer2DModel:
    """The spatial transformer of `level` (its channels, heads and head width; the config's projection and upcast)."""
    c = config
    return Transformer2DModel(c.block_out_channels[level], c.heads(level), c.head_dim(level), c.cross_attention_dim,
                              c.transformer_layers_per_block, c.norm_num_groups, c.use_linear_projection,
                              c.upcast_attention)


def resnet_block(in_ch: int, out_ch: int, temb_ch: int, config: UNetConfig) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, temb_ch, config.norm_num_groups, config.dropout, config.norm_eps)


class DownBlock(nn.Module):
    """`layers_per_block` ResNets (each followed by a spatial transformer at attention levels), then downsample."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, config: UNetConfig, level: int, downsample: bool):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList(
            [resnet_block(in_ch if i == 0 else out_ch, out_ch, temb_ch, c) for i in range(c.layers_per_block)]
        )
        self.attentions = nn.ModuleList(
            [spatial_transformer(c, level) for _ in range(c.layers_per_block if c.attention_levels[level] else 0)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if downsample else [])

    def forward(self, x, temb, encoder_hidden_states):
        """Returns the output and every intermediate feature map the up path will concatenate."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if len(self.attentions) > 0:
                x = self.attentions[i](x, encoder_hidden_states)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)  # (B, C, H, W) -> (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`layers_per_block + 1` ResNets, each fed the previous output concatenated with one skip, then upsample."""

    def __init__(self, in_ch: int, out_ch: int, skip_channels: list[int], temb_ch: int, config: UNetConfig,
                 level: int, upsample: bool):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList(
            [resnet_block((in_ch if i == 0 else out_ch) + skip_ch, out_ch, temb_ch, c)
             for i, skip_ch in enumerate(skip_channels)]
        )
        self.attentions = nn.ModuleList(
            [spatial_transformer(c, level) for _ in range(len(skip_channels) if c.attention_levels[level] else 0)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, x, skips, temb, encoder_hidden_states):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C, H, W) + (B, C_skip, H, W) -> (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if len(self.attentions) > 0:
                x = self.attentions[i](x, encoder_hidden_states)
        for upsampler in self.upsamplers:
            # To the size of the skip the next level concatenates: 2H, or 2H - 1 where the down path
            # halved an odd size (diffusers' UNet does the same, so any latent size works).
            x = upsampler(x, output_size=skips[-1].shape[2:])  # (B, C, H, W) -> (B, C, ~2H, ~2W)
        return x


class MidBlock(nn.Module):
    def __init__(self, ch: int, temb_ch: int, config: UNetConfig):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList([resnet_block(ch, ch, temb_ch, c) for _ in range(2)])
        self.attentions = nn.ModuleList([spatial_transformer(c, len(c.block_out_channels) - 1)])  # the last level's

    def forward(self, x, temb, encoder_hidden_states):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, encoder_hidden_states)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    """ε_θ(z_t, t, τ_θ(y)): sample (B, in_channels, h, w), timestep (B,) or one number, encoder_hidden_states
    (B, L, cross_attention_dim) -> (B, out_channels, h, w). Any h and w: where the down path halves an odd
    size, the up path returns to it. Fills the backbone slot (interfaces.Backbone)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else UNetConfig()
        channels = c.block_out_channels
        time_embed_dim = channels[0] * 4
        last = len(channels) - 1

        self.conv_in = nn.Conv2d(c.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim)

        # The down path: remember the channel count of every feature map handed to the up path.
        skip_channels = [channels[0]]  # conv_in's output is the first skip
        self.down_blocks = nn.ModuleList()
        in_ch = channels[0]
        for level, out_ch in enumerate(channels):
            self.down_blocks.append(DownBlock(in_ch, out_ch, time_embed_dim, c, level, downsample=level < last))
            skip_channels += [out_ch] * c.layers_per_block + ([out_ch] if level < last else [])
            in_ch = out_ch

        self.mid_block = MidBlock(channels[-1], time_embed_dim, c)

        # The up path mirrors it: each level takes layers_per_block + 1 skips, the newest first.
        self.up_blocks = nn.ModuleList()
        in_ch = channels[-1]
        for level, out_ch in reversed(list(enumerate(channels))):
            taken = [skip_channels.pop() for _ in range(c.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(in_ch, out_ch, taken, time_embed_dim, c, level, upsample=level > 0))
            in_ch = out_ch

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        self._check_inputs(sample, encoder_hidden_states)
        timestep = timestep_per_sample(timestep, sample)  # (B,)
        t_emb = timestep_embedding(timestep, c.block_out_channels[0]).to(sample.dtype)  # (B, C0)
        temb = self.time_embedding(t_emb)  # (B, 4 C0)

        x = self.conv_in(sample)  # (B, C_in, h, w) -> (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            x = block(x, skips, temb, encoder_hidden_states)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C0, h, w) -> (B, C_out, h, w)

    def _check_inputs(self, sample, encoder_hidden_states):
        c = self.config
        check_like_weights(sample, "sample", self.conv_in.weight)
        if sample.ndim != 4 or sample.shape[1] != c.in_channels or 0 in sample.shape:
            raise ValueError(f"sample must have shape (B, {c.in_channels}, H, W) with B, H, W >= 1, "
                             f"got {tuple(sample.shape)}")
        check_text_states(encoder_hidden_states, sample.shape[0], c.cross_attention_dim, self.conv_in.weight, "UNet")

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def cross_attention_dim(self) -> int | None:
        return self.config.cross_attention_dim

    def config_dict(self) -> dict:
        """The config as JSON-able values; the Stable Diffusion fields only when they differ from their defaults,
        so a model that does not use them saves the folder an earlier minildm wrote and can read."""
        return {name: value for name, value in asdict(self.config).items()
                if not (name in SD_FIELD_DEFAULTS and value == SD_FIELD_DEFAULTS[name])}

    @classmethod
    def from_config_dict(cls, config: dict) -> UNet2DConditionModel:
        return cls(UNetConfig(**config))

    def cross_attention_modules(self) -> dict[str, Attention]:
        """Every cross-attention layer by its module name, for attention maps."""
        return {name: m for name, m in self.named_modules() if name.endswith("attn2") and isinstance(m, Attention)}
