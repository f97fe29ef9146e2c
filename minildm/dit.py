"""DiT: a transformer on latent patches (Peebles & Xie 2023, arXiv:2212.09748), with cross-attention to the
text in every block as PixArt-α adds it (Chen et al. 2023, arXiv:2310.00426).

    sample (B, c, h, w) -> patchify: Conv2d, kernel = stride = p -> tokens (B, N, D), N = (h/p)(w/p)
      + 2-D sine-cosine position embedding of the (h/p, w/p) grid                      (DiT section 3.1)
    timestep t -> sinusoidal embedding -> MLP -> c (B, D)
    num_layers x DiT block, each conditioned on c by adaLN-Zero                        (DiT section 3.2):
        x = x + α₁ · SelfAttn((1 + γ₁) · LN(x) + β₁)
        x = x + CrossAttn(LN(x), encoder_hidden_states)                                 (PixArt-α)
        x = x + α₂ · MLP((1 + γ₂) · LN(x) + β₂),     (β₁, γ₁, α₁, β₂, γ₂, α₂) = Linear(SiLU(c))
    final layer: (1 + γ) · LN(x) + β, (β, γ) = Linear(SiLU(c)) -> Linear to p·p·c_out per token -> unpatchify

The Linear that regresses β, γ, α starts at zero, so α = 0 and every block starts as the identity ("adaLN-Zero");
DiT's code writes the scale as 1 + γ, so a zero γ leaves LN(x) as it is. PixArt-α's cross-attention is not
gated: it zeroes that layer's output projection instead, which keeps the block the identity at initialisation.
Unlike PixArt-α (whose cross-attention reads x un-normalised, and whose adaLN is one table shared by all blocks,
"adaLN-single"), the cross-attention here has a pre-norm as in the UNet's transformer block, and each block has
its own adaLN, as in DiT.

Notation: B batch, p patch_size, N tokens, D hidden_size, L text tokens. Module names follow DiT's code
(adaLN_modulation) and diffusers (attn1, attn2, ff, proj_out). Depends on attention.py and unet.py's timestep
embedding.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .checks import check_like_weights, check_text_states
from .unet import TimestepEmbedding, timestep_embedding, timestep_per_sample

FREQUENCY_EMBEDDING_SIZE = 256  # width of the sinusoidal timestep embedding before the MLP, as in DiT's code


@dataclass
class DiTConfig:
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2  # p: each token is a p x p patch of the latent (DiT-S/2, -B/2, ... use 2)
    hidden_size: int = 128  # D, the width of every token
    num_layers: int = 4  # DiT blocks
    num_attention_heads: int = 4  # hidden_size must divide by it
    cross_attention_dim: int | None = 128  # width of the text encoder's tokens; None = no cross-attention
    mlp_ratio: float = 4.0  # the MLP's hidden width is mlp_ratio * hidden_size

    def __post_init__(self):
        sizes = {"in_channels": self.in_channels, "out_channels": self.out_channels, "patch_size": self.patch_size,
                 "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                 "num_attention_heads": self.num_attention_heads,
                 "cross_attention_dim": 1 if self.cross_attention_dim is None else self.cross_attention_dim}
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads="
                             f"{self.num_attention_heads} (each head gets hidden_size / num_attention_heads channels)")
        if self.hidden_size % 4 != 0:
            raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sine-cosine position embedding "
                             f"(a sin and a cos for each of the two axes), got {self.hidden_size}")
        if (not isinstance(self.mlp_ratio, numbers.Real) or isinstance(self.mlp_ratio, bool)
                or not math.isfinite(self.mlp_ratio) or int(self.mlp_ratio * self.hidden_size) < 1):
            raise ValueError(f"mlp_ratio must be a number > 0 that leaves the MLP at least one channel, "
                             f"got {self.mlp_ratio!r}")

    @classmethod
    def tiny(cls, in_channels: int = 4, cross_attention_dim: int | None = 128) -> DiTConfig:
        """About 1.5M parameters, as UNetConfig.tiny: a DiT for the CPU demo's 8x8x4 latents (16 tokens of 2x2)."""
        return cls(in_channels=in_channels, out_channels=in_channels, patch_size=2, hidden_size=128, num_layers=4,
                   num_attention_heads=4, cross_attention_dim=cross_attention_dim)


def get_2d_sincos_pos_embed(embed_dim: int, grid_height: int, grid_width: int,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """The fixed position embedding of DiT section 3.1 (MAE's get_2d_sincos_pos_embed): (grid_height * grid_width, D).

    Token n = row * grid_width + column (the order patchify makes). Its first D/2 channels encode the column,
    the last D/2 the row, each as [sin(pos ω_k), cos(pos ω_k)], ω_k = 10000^(-k / (D/4)), k = 0 .. D/4 - 1.
    """
    rows, columns = torch.meshgrid(torch.arange(grid_height, device=device, dtype=torch.float32),
                                   torch.arange(grid_width, device=device, dtype=torch.float32), indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # (D/4,)

    def sincos(positions):  # (grid_height, grid_width) -> (N, D/2)
        angles = positions.reshape(-1, 1) * omega[None, :]  # (N, 1) * (1, D/4) -> (N, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([sincos(columns), sincos(rows)], dim=1)  # (N, D)


def unpatchify(tokens: torch.Tensor, patch_size: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """(B, N, p*p*C) tokens, each a p x p x C patch in (row, column, channel) order -> (B, C, h, w) images."""
    B, _, K = tokens.shape
    p, C = patch_size, K // (patch_size * patch_size)
    x = tokens.reshape(B, grid_height, grid_width, p, p, C)  # (B, N, p*p*C) -> (B, h/p, w/p, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # -> (B, C, h/p, p, w/p, p)
    return x.reshape(B, C, grid_height * p, grid_width * p)  # -> (B, C, h, w)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (1 + γ) · x + β with γ = scale, β = shift. x (B, N, D), shift and scale (B, 1, D)."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """One adaLN-Zero block with cross-attention: x (B, N, D), temb (B, D), text (B, L, D_text) -> (B, N, D)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        D, heads = config.hidden_size, config.num_attention_heads
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)  # γ and β come from the timestep
        self.attn1 = Attention(D, None, heads, D // heads, bias=True)
        has_text = config.cross_attention_dim is not None
        self.norm2 = nn.LayerNorm(D) if has_text else None
        self.attn2 = Attention(D, config.cross_attention_dim, heads, D // heads, bias=True) if has_text else None
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        mlp_dim = int(config.mlp_ratio * D)
        self.ff = nn.Sequential(nn.Linear(D, mlp_dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_dim, D))
        self.adaLN_modulation = nn.Linear(D, 6 * D)  # SiLU(temb) -> β₁, γ₁, α₁, β₂, γ₂, α₂

    def forward(self, x: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        modulation = self.adaLN_modulation(F.silu(temb))[:, None, :]  # (B, D) -> (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = x + gate_msa * self.attn1(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), encoder_hidden_states)  # queries: patches, keys/values: text
        return x + gate_mlp * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


class DiTTransformer2DModel(nn.Module):
    """ε_θ(z_t, t, τ_θ(y)) as a transformer: sample (B, in_channels, h, w), timestep (B,) or one number (int or
    float), encoder_hidden_states (B, L, cross_attention_dim) -> (B, out_channels, h, w). h and w must be
    multiples of patch_size; any such size works. Fills the backbone slot (interfaces.Backbone)."""

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else DiTConfig()
        D, p = c.hidden_size, c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, D, kernel_size=p, stride=p)  # one token per p x p patch
        self.time_embedding = TimestepEmbedding(FREQUENCY_EMBEDDING_SIZE, D)
        self.transformer_blocks = nn.ModuleList([DiTBlock(c) for _ in range(c.num_layers)])
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(D, 2 * D)  # SiLU(temb) -> β, γ of the final layer
        self.proj_out = nn.Linear(D, p * p * c.out_channels)
        self._init_weights()

    def _init_weights(self):
        """DiT's initialisation (its models.py): xavier-uniform Linear layers with zero biases, the patch embedding
        as a Linear, N(0, 0.02) for the timestep MLP; then the zeros of adaLN-Zero and of the output layer, and of
        the cross-attention's output projection (PixArt-α), so that the whole model starts at exactly zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.config.hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for linear in (self.time_embedding.linear_1, self.time_embedding.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        zeroed = [self.adaLN_modulation, self.proj_out]
        for block in self.transformer_blocks:
            zeroed += [block.adaLN_modulation] + ([block.attn2.to_out[0]] if block.attn2 is not None else [])
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def patchify(self, sample: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) -> (B, N, D) tokens, row by row, before the position embedding."""
        x = self.patch_embed(sample)  # (B, C_in, h, w) -> (B, D, h/p, w/p)
        return x.flatten(2).transpose(1, 2)  # (B, D, h/p, w/p) -> (B, N, D)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        self._check_inputs(sample, encoder_hidden_states)
        grid_height, grid_width = sample.shape[2] // c.patch_size, sample.shape[3] // c.patch_size
        timestep = timestep_per_sample(timestep, sample)  # (B,)
        t_emb = timestep_embedding(timestep, FREQUENCY_EMBEDDING_SIZE).to(sample.dtype)  # (B, 256)
        temb = self.time_embedding(t_emb)  # (B, D): the c that every adaLN reads

        pos_embed = get_2d_sincos_pos_embed(c.hidden_size, grid_height, grid_width, sample.device)  # (N, D)
        x = self.patchify(sample) + pos_embed.to(sample.dtype)  # (B, N, D)
        for block in self.transformer_blocks:
            x = block(x, temb, encoder_hidden_states)
        shift, scale = self.adaLN_modulation(F.silu(temb))[:, None, :].chunk(2, dim=-1)  # (B, 2D) -> 2 x (B, 1, D)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, N, D) -> (B, N, p*p*C_out)
        return unpatchify(x, c.patch_size, grid_height, grid_width)  # (B, C_out, h, w)

    def _check_inputs(self, sample, encoder_hidden_states):
        c = self.config
        check_like_weights(sample, "sample", self.patch_embed.weight)
        if sample.ndim != 4 or sample.shape[1] != c.in_channels or 0 in sample.shape:
            raise ValueError(f"sample must have shape (B, {c.in_channels}, h, w) with B, h, w >= 1, "
                             f"got {tuple(sample.shape)}")
        h, w = sample.shape[2:]
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(f"h={h} and w={w} must be multiples of patch_size={c.patch_size}: use image sizes that "
                             f"give latents (image size / the first stage's factor f) a multiple of {c.patch_size}")
        check_text_states(encoder_hidden_states, sample.shape[0], c.cross_attention_dim, self.patch_embed.weight, "DiT")

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
        return asdict(self.config)

    @classmethod
    def from_config_dict(cls, config: dict) -> DiTTransformer2DModel:
        return cls(DiTConfig(**config))

    def cross_attention_modules(self) -> dict[str, Attention]:
        """Every cross-attention layer by its module name (transformer_blocks.0.attn2, ...), for attention maps."""
        return {name: m for name, m in self.named_modules() if name.endswith("attn2") and isinstance(m, Attention)}
