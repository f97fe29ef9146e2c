"""Self- and cross-attention, the transformer block, and the spatial transformer.

The LDM paper conditions the UNet on text through cross-attention (Rombach et al. 2022, section 3.3; the
formula has no number there):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,
    Q = W_Q φ(z_t),  K = W_K τ_θ(y),  V = W_V τ_θ(y)

where φ(z_t) are the UNet's flattened feature-map positions and τ_θ(y) the text encoder's tokens.
With no text (encoder_hidden_states=None) the same module is self-attention: K and V come from the
image positions too.

Notation: B batch, N query tokens (H*W positions), L key tokens (prompt length), D channels,
heads × dim_head = inner_dim.

Module names follow diffusers (to_q, to_k, to_v, to_out, attn1 / attn2 / ff, proj_in / proj_out) so
diffusers-format weights load by renaming keys. Depends on torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention. Self-attention when `cross_attention_dim` is None, else cross-attention."""

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 4, dim_head: int = 32,
                 bias: bool = False, upcast_attention: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        # SD 2.x's upcast_attention (diffusers' name): in float16 / bfloat16 the scores QK^T of its 64-wide heads
        # can overflow, so the attention itself runs in float32 and only its output is cast back.
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(0.0)])
        # When True, forward() also keeps softmax(QK^T/sqrt(d)) in `self.attention_probs`, (B, heads, N, L),
        # for pictures of where each word looks. Off by default: the fused kernel never forms that matrix.
        self.store_attention_probs = False
        self.attention_probs: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        context = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        B, N, _ = hidden_states.shape
        L = context.shape[1]
        q = self.to_q(hidden_states)  # (B, N, inner)
        k = self.to_k(context)  # (B, L, inner)
        v = self.to_v(context)  # (B, L, inner)
        q = q.view(B, N, self.heads, -1).transpose(1, 2)  # (B, N, inner) -> (B, heads, N, dim_head)
        k = k.view(B, L, self.heads, -1).transpose(1, 2)  # (B, L, inner) -> (B, heads, L, dim_head)
        v = v.view(B, L, self.heads, -1).transpose(1, 2)  # (B, L, inner) -> (B, heads, L, dim_head)
        dtype = q.dtype
        if self.upcast_attention:
            q, k, v = q.float(), k.float(), v.float()
        if self.store_attention_probs:
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # QK^T / sqrt(d): (B, heads, N, L)
            self.attention_probs = scores.softmax(dim=-1)
            out = self.attention_probs @ v  # (B, heads, N, dim_head)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # the same softmax(QK^T/sqrt(d))V, fused
        out = out.to(dtype).transpose(1, 2).reshape(B, N, -1)  # (B, heads, N, dim_head) -> (B, N, inner)
        return self.to_out[1](self.to_out[0](out))  # (B, N, query_dim)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): x -> (x W + b) * GELU(x V + c)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, 2*dim_out) -> 2 x (B, N, dim_out)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int | None,
                 upcast_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head, upcast_attention=upcast_attention)
        # An unconditional model has no text to attend to, hence no attn2.
        self.norm2 = nn.LayerNorm(dim) if cross_attention_dim is not None else None
        self.attn2 = (Attention(dim, cross_attention_dim, heads, dim_head, upcast_attention=upcast_attention)
                      if cross_attention_dim is not None else None)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        if (self.attn2 is None) != (encoder_hidden_states is None):
            raise ValueError("a block built with cross_attention_dim needs encoder_hidden_states, and one built "
                             "without it takes none")
        x = x + self.attn1(self.norm1(x))  # (B, N, D)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), encoder_hidden_states)  # queries: image, keys/values: text
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """The spatial transformer: feature map -> tokens -> transformer blocks -> feature map, plus residual.

    use_linear_projection: proj_in / proj_out are Linear layers on the tokens (SD 2.x, minildm's default), or
    1x1 convolutions on the feature map (False: SD 1.x). The two compute the same map, with weights of shape
    (out, in) or (out, in, 1, 1); the flag says which shape a checkpoint holds. The GroupNorm's eps is 1e-6
    in every Stable Diffusion (diffusers hard-codes it too), whatever the UNet's norm_eps."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = True,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner_dim) if use_linear_projection else nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, heads, dim_head, cross_attention_dim, upcast_attention)
             for _ in range(num_layers)]
        )
        self.proj_out = nn.Linear(inner_dim, channels) if use_linear_projection else nn.Conv2d(inner_dim, channels, 1)

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        residual = x
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)  # (B, C, H, W) -> (B, inner, H, W), a 1x1 convolution
        h = h.flatten(2).transpose(1, 2)  # (B, C or inner, H, W) -> (B, HW, C or inner)
        if self.use_linear_projection:
            h = self.proj_in(h)  # (B, HW, C) -> (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, encoder_hidden_states)
        if self.use_linear_projection:
            h = self.proj_out(h)  # (B, HW, inner) -> (B, HW, C)
        h = h.transpose(1, 2).reshape(B, -1, H, W)  # (B, HW, C') -> (B, C', H, W), a view with channels-last strides
        if not self.use_linear_projection:
            h = self.proj_out(h)  # (B, inner, H, W) -> (B, C, H, W)
        # Residual first: a sum takes the memory layout of its first operand, so the output keeps the input's
        # layout. (`h + residual` came out channels-last, and each convolution after it reordered its weights
        # on every call: 14% of the SD-shaped UNet's forward time on CPU, found by benchmarks/vs_diffusers.py.)
        return residual + h

    def cross_attention_modules(self) -> list[Attention]:
        return [block.attn2 for block in self.transformer_blocks if block.attn2 is not None]
