"""Exercises of notebook 04, the UNet: the timestep embedding, the ResNet block that adds it to the feature
maps, and the transformer block that lets the text in.

Notation as in unet.py and resnet.py: B batch, C channels, H x W a feature map, t the timestep (0 .. 999),
temb the timestep embedding after the UNet's MLP. Each solution below is the code of the notebook's solution
cell (between # BEGIN SOLUTION and # END SOLUTION); each Mistake is a wrong answer students write, with the
hint it earns. The module exercises (run_module) run in float32, the dtype a module is built in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Attention, FeedForward
from ..attention import BasicTransformerBlock as MinildmBasicTransformerBlock
from ..resnet import ResnetBlock2D as MinildmResnetBlock2D
from ..unet import timestep_embedding as minildm_timestep_embedding
from .attention import build, random_weights
from .core import Exercise, Mistake, run_module

T = 1000
SOURCE_HO = "Ho et al. 2020 (arXiv:2006.11239)"


def _timesteps(seed: int, batch: int) -> torch.Tensor:
    """`batch` timesteps: 0 and T - 1 always, the rest drawn with the seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([0]), torch.randint(1, T - 1, (batch - 2,), generator=g), torch.tensor([T - 1])])


def _randn(generator, *shape):
    return torch.randn(shape, generator=generator)


# ---- the timestep embedding -------------------------------------------------------------------------------------


def timestep_embedding(timesteps, dim, max_period=10000):
    # BEGIN SOLUTION
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half) / half)  # ω_k = max_period^(-k / (dim/2))
    angles = timesteps[:, None] * omega[None, :]  # t ω_k: (B, 1) * (1, dim/2) -> (B, dim/2)
    embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [cos(t ω_k), sin(t ω_k)]: (B, 2 * (dim/2))
    return F.pad(embedding, (0, dim % 2))  # an odd dim gets a zero column at the end: (B, dim)
    # END SOLUTION


def _embedding_cases(seed):
    return [{"timesteps": _timesteps(seed, 5), "dim": 64},
            {"timesteps": _timesteps(seed + 10, 4), "dim": 6, "max_period": 100},
            {"timesteps": _timesteps(seed + 20, 3), "dim": 9}]  # odd: a zero column at the end


def _embedding_mistake(order="cos, sin", sign=-1, over_dim=False, pad=True):
    def wrong(timesteps, dim, max_period=10000):
        half = dim // 2
        omega = max_period ** (sign * torch.arange(half) / (dim if over_dim else half))
        angles = timesteps[:, None] * omega[None, :]
        if order == "cos, sin":
            embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)
        elif order == "sin, cos":
            embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)
        else:  # Vaswani's positional encoding: sin(t ω_0), cos(t ω_0), sin(t ω_1), ...
            embedding = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)
        return F.pad(embedding, (0, dim % 2)) if pad else embedding
    return wrong


TIMESTEP_EMBEDDING = Exercise(
    name="timestep_embedding", notebook="04_unet",
    task="timestep_embedding(timesteps, dim, max_period=10000) -> (B, dim): for integer timesteps (B,), the "
         "cosines cos(t ω_k) for k = 0 .. dim//2 - 1, then the sines sin(t ω_k), with ω_k = max_period^(-k / "
         "(dim//2)); an odd dim gets a column of zeros at the end.",
    source="Vaswani et al. 2017 (arXiv:1706.03762), section 3.5 (sinusoids at geometrically spaced frequencies; "
           f"here all cosines, then all sines, as Stable Diffusion), used for t by {SOURCE_HO}, appendix B",
    solution=timestep_embedding, cases=_embedding_cases,
    reference=minildm_timestep_embedding,
    # minildm computes in float32, where an angle t ω near 999 carries a rounding error of up to 6e-5: a float64
    # answer, or a float32 one in another order, must pass. Every mistake below is off by far more.
    atol=1e-4,
    mistakes=(
        Mistake("sines first: Stable Diffusion puts all the cosines first, then all the sines",
                _embedding_mistake(order="sin, cos")),
        Mistake("the frequencies increase: the exponent is -k / (dim/2), so ω_0 = 1 is the fastest wave and the "
                "later ones are ever slower, down to 1 / max_period", _embedding_mistake(sign=+1)),
        Mistake("the exponent is over dim: ω_k = max_period^(-k / (dim/2)), half the width, so the last "
                "frequency reaches about 1 / max_period", _embedding_mistake(over_dim=True)),
        Mistake("cos and sin interleaved, as in Vaswani's positional encoding: here the halves are concatenated, "
                "[cos(t ω_0) .. cos(t ω_(dim/2-1)), sin(t ω_0) .. sin(t ω_(dim/2-1))]",
                _embedding_mistake(order="interleaved")),
        Mistake("an odd dim needs a column of zeros at the end, so that the result is (B, dim): F.pad(embedding, "
                "(0, dim % 2))", _embedding_mistake(pad=False)),
    ),
)


# ---- the ResNet block -------------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, temb_channels, norm_num_groups):
        super().__init__()
        # EXERCISE ResnetBlock2D
        # BEGIN SOLUTION
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # the shortcut needs weights only when the channels change (None registers no parameter)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        # END SOLUTION

    def forward(self, x, temb):
        # EXERCISE ResnetBlock2D
        # BEGIN SOLUTION
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # t enters: (B, C_out) -> (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h  # the residual: the block learns a correction to x
        # END SOLUTION


class _TimeAfterConv2(ResnetBlock2D):
    def forward(self, x, temb):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class _NoSiLUBeforeTheProjection(ResnetBlock2D):
    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class _NoResidual(ResnetBlock2D):
    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h)))


class _SiLUBeforeTheNorm(ResnetBlock2D):
    def forward(self, x, temb):
        h = self.conv1(self.norm1(F.silu(x))) + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm2(F.silu(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class _DefaultEps(ResnetBlock2D):
    def __init__(self, in_channels, out_channels, temb_channels, norm_num_groups):
        super().__init__(in_channels, out_channels, temb_channels, norm_num_groups)
        self.norm1.eps = self.norm2.eps = 1e-5  # nn.GroupNorm's default


def _resnet_case(seed, B, in_channels, out_channels, H, W, temb_channels, norm_num_groups, x_scale=1.0):
    init = {"in_channels": in_channels, "out_channels": out_channels, "temb_channels": temb_channels,
            "norm_num_groups": norm_num_groups}
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": x_scale * _randn(g, B, in_channels, H, W), "temb": _randn(g, B, temb_channels)}
    return {"init": init, "weights": random_weights(build(MinildmResnetBlock2D, **init), seed), "inputs": inputs}


def _resnet_cases(seed):
    return [_resnet_case(seed, B=2, in_channels=4, out_channels=6, H=5, W=3, temb_channels=7, norm_num_groups=2),
            _resnet_case(seed + 10, B=3, in_channels=8, out_channels=8, H=5, W=6, temb_channels=7, norm_num_groups=4,
                         x_scale=0.05)]  # a quiet input, whose GroupNorm shows its eps


RESNET_BLOCK = Exercise(
    name="ResnetBlock2D", notebook="04_unet",
    task="class ResnetBlock2D(nn.Module) with __init__(in_channels, out_channels, temb_channels, norm_num_groups) "
         "and forward(x, temb) -> (B, out_channels, H, W) for x (B, in_channels, H, W) and temb (B, temb_channels): "
         "h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb)) (one value per channel, the same at every "
         "position), h = conv2(dropout(SiLU(norm2(h)))), output shortcut(x) + h. Use minildm's names: norm1, "
         "norm2 (GroupNorm, eps=1e-6), conv1, conv2 (3x3, padding 1), time_emb_proj (Linear), dropout, and "
         "conv_shortcut (a 1x1 conv when the channels change, else None and x itself is the shortcut).",
    source=f"{SOURCE_HO}, appendix B (a Wide ResNet block with GroupNorm, the timestep embedding added in each "
           "block), as Stable Diffusion and minildm.resnet.ResnetBlock2D write it",
    solution=ResnetBlock2D, cases=_resnet_cases, reference=MinildmResnetBlock2D, run=run_module,
    mistakes=(
        Mistake("the time embedding is added after conv2: add time_emb_proj(SiLU(temb)) to the output of conv1, "
                "so that the second half of the block can use t", _TimeAfterConv2),
        Mistake("no SiLU before the time projection: time_emb_proj(F.silu(temb)), as the UNet's time MLP ends "
                "on a linear layer", _NoSiLUBeforeTheProjection),
        Mistake("the residual is missing: return shortcut(x) + h (conv_shortcut(x) when the channels change, "
                "else x)", _NoResidual),
        Mistake("SiLU before the norm: the order is GroupNorm, then SiLU, then the convolution", _SiLUBeforeTheNorm),
        Mistake("GroupNorm's eps is 1e-6 here, as in Stable Diffusion (PyTorch's default is 1e-5): "
                "nn.GroupNorm(norm_num_groups, channels, eps=1e-6)", _DefaultEps),
    ),
)


# ---- the transformer block -----------------------------------------------------------------------------------------


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, cross_attention_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head)  # self-attention: the image positions among themselves
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head)  # cross-attention to the text
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)  # GEGLU to 4 dim, then a linear layer back to dim

    def forward(self, x, encoder_hidden_states):
        # EXERCISE BasicTransformerBlock
        # BEGIN SOLUTION
        x = x + self.attn1(self.norm1(x))  # pre-norm: normalise what goes into the branch, add its output to x
        x = x + self.attn2(self.norm2(x), encoder_hidden_states)  # queries from the image, keys and values from text
        return x + self.ff(self.norm3(x))  # (B, N, dim)
        # END SOLUTION


class _PostNorm(BasicTransformerBlock):
    def forward(self, x, encoder_hidden_states):
        x = self.norm1(x + self.attn1(x))
        x = self.norm2(x + self.attn2(x, encoder_hidden_states))
        return self.norm3(x + self.ff(x))


class _NoCrossAttentionResidual(BasicTransformerBlock):
    def forward(self, x, encoder_hidden_states):
        x = x + self.attn1(self.norm1(x))
        x = self.attn2(self.norm2(x), encoder_hidden_states)
        return x + self.ff(self.norm3(x))


class _TextIgnored(BasicTransformerBlock):
    def forward(self, x, encoder_hidden_states):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x))  # no context: the image attends to itself twice
        return x + self.ff(self.norm3(x))


class _NormAfterTheBranch(BasicTransformerBlock):
    def forward(self, x, encoder_hidden_states):
        x = x + self.norm1(self.attn1(x))
        x = x + self.norm2(self.attn2(x, encoder_hidden_states))
        return x + self.norm3(self.ff(x))


def _transformer_case(seed, B, N, L, dim, heads, dim_head, cross_attention_dim):
    init = {"dim": dim, "heads": heads, "dim_head": dim_head, "cross_attention_dim": cross_attention_dim}
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": _randn(g, B, N, dim), "encoder_hidden_states": _randn(g, B, L, cross_attention_dim)}
    weights = random_weights(build(MinildmBasicTransformerBlock, **init), seed)
    return {"init": init, "weights": weights, "inputs": inputs}


def _transformer_cases(seed):
    # The first case gives image and text the same width, so that an answer feeding attn2 the image tokens runs
    # (and gets its hint) instead of failing on a shape; the second has all sizes different.
    return [_transformer_case(seed, B=3, N=5, L=4, dim=8, heads=2, dim_head=6, cross_attention_dim=8),
            _transformer_case(seed + 10, B=2, N=5, L=7, dim=10, heads=3, dim_head=4, cross_attention_dim=6)]


TRANSFORMER_BLOCK = Exercise(
    name="BasicTransformerBlock", notebook="04_unet",
    task="the forward(x, encoder_hidden_states) -> (B, N, dim) of class BasicTransformerBlock, for image tokens "
         "x (B, N, dim) and text tokens encoder_hidden_states (B, L, cross_attention_dim): self-attention (attn1), "
         "cross-attention to the text (attn2), then the GEGLU feed-forward (ff), each applied to a LayerNorm of x "
         "(norm1, norm2, norm3) and its output added to x. The __init__ is given: its sub-modules are minildm's "
         "Attention and FeedForward.",
    source="Rombach et al. 2022 (arXiv:2112.10752), section 3.3 (the UNet's transformer blocks: self-attention, "
           "cross-attention to τ_θ(y), feed-forward); pre-norm residuals as in Xiong et al. 2020 (arXiv:2002.04745)",
    solution=BasicTransformerBlock, cases=_transformer_cases, reference=MinildmBasicTransformerBlock,
    run=run_module,
    mistakes=(
        Mistake("that is post-norm (x = norm(x + branch(x)), the original Transformer's): Stable Diffusion "
                "normalises each branch's input and adds the branch's output to the unnormalised x", _PostNorm),
        Mistake("the cross-attention's residual is missing: x = x + attn2(norm2(x), encoder_hidden_states), or the "
                "image content is replaced by what the words say", _NoCrossAttentionResidual),
        Mistake("the text is ignored: attn2 must get encoder_hidden_states as its context, else it is a second "
                "self-attention", _TextIgnored),
        Mistake("the norm is applied to the branch's output: pre-norm normalises its input, "
                "x + attn1(norm1(x))", _NormAfterTheBranch),
    ),
)


EXERCISES = [TIMESTEP_EMBEDDING, RESNET_BLOCK, TRANSFORMER_BLOCK]
