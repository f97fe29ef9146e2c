"""Tests for minildm/attention.py: attention, GEGLU, the transformer block and the spatial transformer,
each checked against the formula (LDM eq. 3, Shazeer 2020) written out here from the module's own weights."""

import math

import pytest
import torch
from torch import nn

from minildm.attention import GEGLU, Attention, BasicTransformerBlock, FeedForward, Transformer2DModel


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=seeded(seed), dtype=torch.float64)


def make_attention(query_dim=16, cross_attention_dim=None, heads=4, dim_head=8, seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim, cross_attention_dim, heads, dim_head).double().eval()


def reference_attention(attn, x, context, heads):
    """softmax(Q K^T / sqrt(d)) V per head, heads split with einsum, then to_out: (B, N, query_dim), probs."""
    B, N, _ = x.shape
    L = context.shape[1]
    q = x @ attn.to_q.weight.T  # (B, N, heads*d)
    k = context @ attn.to_k.weight.T  # (B, L, heads*d)
    v = context @ attn.to_v.weight.T
    d = q.shape[-1] // heads
    q, k, v = q.reshape(B, N, heads, d), k.reshape(B, L, heads, d), v.reshape(B, L, heads, d)
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) / math.sqrt(d)
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    out = torch.einsum("bhnl,blhd->bnhd", probs, v).reshape(B, N, heads * d)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias, probs


def reference_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


# --- Attention (LDM eq. 3) ---------------------------------------------------------------------


@pytest.mark.parametrize("heads,dim_head", [(1, 16), (4, 8), (2, 12)])
def test_self_attention_matches_written_out_formula(heads, dim_head):
    attn = make_attention(16, None, heads, dim_head)
    x = randn(2, 7, 16)
    expected, _ = reference_attention(attn, x, x, heads)
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_cross_attention_matches_written_out_formula():
    attn = make_attention(16, cross_attention_dim=12, heads=4, dim_head=8)
    assert attn.to_k.in_features == 12 and attn.to_v.in_features == 12 and attn.to_q.in_features == 16
    x, context = randn(3, 9, 16, seed=1), randn(3, 5, 12, seed=2)
    expected, _ = reference_attention(attn, x, context, heads=4)
    out = attn(x, context)
    assert out.shape == (3, 9, 16)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_head_split_matters():
    """The reference really checks the split: treating the same weights as one head gives another answer."""
    attn = make_attention(16, None, heads=4, dim_head=8)
    x = randn(2, 6, 16)
    one_head, _ = reference_attention(attn, x, x, heads=1)
    assert not torch.allclose(attn(x), one_head, atol=1e-6)


def test_stored_probabilities_path_equals_fused_path():
    attn = make_attention(16, cross_attention_dim=12, heads=4, dim_head=8)
    x, context = randn(2, 9, 16, seed=3), randn(2, 5, 12, seed=4)
    fused = attn(x, context)
    assert attn.attention_probs is None  # off by default: nothing kept
    attn.store_attention_probs = True
    stored = attn(x, context)
    torch.testing.assert_close(stored, fused, rtol=1e-10, atol=1e-10)
    probs = attn.attention_probs
    assert probs.shape == (2, 4, 9, 5)  # (B, heads, N, L)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 9, dtype=torch.float64))
    _, expected_probs = reference_attention(attn, x, context, heads=4)
    torch.testing.assert_close(probs, expected_probs, rtol=1e-10, atol=1e-12)


def test_self_attention_is_permutation_equivariant():
    attn = make_attention(16, None, heads=2, dim_head=8)
    x = randn(2, 10, 16)
    perm = torch.randperm(10, generator=seeded(5))
    torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], rtol=1e-10, atol=1e-10)


def test_cross_attention_ignores_order_of_key_value_tokens():
    attn = make_attention(16, cross_attention_dim=8, heads=2, dim_head=8)
    x, context = randn(2, 6, 16, seed=6), randn(2, 7, 8, seed=7)
    perm = torch.randperm(7, generator=seeded(8))
    torch.testing.assert_close(attn(x, context[:, perm]), attn(x, context), rtol=1e-10, atol=1e-10)
    # ... but it does depend on the context's values
    assert not torch.allclose(attn(x, context), attn(x, context + 1.0))


def test_attention_queries_are_independent():
    """Each query row only sees its own q: dropping the other queries leaves it unchanged."""
    attn = make_attention(16, cross_attention_dim=8, heads=2, dim_head=8)
    x, context = randn(1, 6, 16, seed=9), randn(1, 4, 8, seed=10)
    torch.testing.assert_close(attn(x[:, 2:3], context), attn(x, context)[:, 2:3], rtol=1e-10, atol=1e-10)


# --- GEGLU and FeedForward ---------------------------------------------------------------------


def test_geglu_matches_formula():
    torch.manual_seed(0)
    geglu = GEGLU(6, 5).double()
    x = randn(2, 3, 6)
    W, V = geglu.proj.weight[:5], geglu.proj.weight[5:]  # (x W + b) is the first half, the gate the second
    b, c = geglu.proj.bias[:5], geglu.proj.bias[5:]
    expected = (x @ W.T + b) * reference_gelu(x @ V.T + c)
    out = geglu(x)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_feed_forward_is_geglu_then_linear():
    torch.manual_seed(0)
    ff = FeedForward(8, mult=2).double()
    x = randn(2, 3, 8)
    geglu, linear = ff.net[0], ff.net[2]
    assert geglu.proj.out_features == 2 * 16 and linear.in_features == 16 and linear.out_features == 8
    torch.testing.assert_close(ff(x), linear(geglu(x)), rtol=1e-12, atol=1e-12)


# --- BasicTransformerBlock ---------------------------------------------------------------------


def test_transformer_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = BasicTransformerBlock(16, heads=2, dim_head=8, cross_attention_dim=12).double()
    for norm in (block.norm1, block.norm2, block.norm3):  # non-trivial affine parameters
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x, context = randn(2, 5, 16, seed=1), randn(2, 3, 12, seed=2)
    h = x + block.attn1(block.norm1(x))
    h = h + block.attn2(block.norm2(h), context)
    expected = h + block.ff(block.norm3(h))
    torch.testing.assert_close(block(x, context), expected, rtol=1e-10, atol=1e-10)


def test_unconditional_block_has_no_cross_attention():
    block = BasicTransformerBlock(16, heads=2, dim_head=8, cross_attention_dim=None)
    assert block.attn2 is None and block.norm2 is None
    assert not any("attn2" in name or "norm2" in name for name in block.state_dict())
    x = randn(2, 5, 16).float()
    expected = x + block.attn1(block.norm1(x))
    expected = expected + block.ff(block.norm3(expected))
    torch.testing.assert_close(block(x), expected)


# --- Transformer2DModel ------------------------------------------------------------------------


def make_spatial_transformer(cross_attention_dim=12, num_layers=1, seed=0):
    torch.manual_seed(seed)
    model = Transformer2DModel(16, heads=2, dim_head=8, cross_attention_dim=cross_attention_dim,
                               num_layers=num_layers, norm_num_groups=8)
    return model.double()


def test_spatial_transformer_matches_hand_computation():
    """norm -> (B, HW, C) tokens in row-major order -> proj_in -> blocks -> proj_out -> back, plus x."""
    model = make_spatial_transformer(num_layers=2)
    x, context = randn(2, 16, 3, 5, seed=1), randn(2, 4, 12, seed=2)
    h = model.norm(x).permute(0, 2, 3, 1).reshape(2, 15, 16)  # token i = position (i // W, i % W)
    h = model.proj_in(h)
    for block in model.transformer_blocks:
        h = block(h, context)
    h = model.proj_out(h).reshape(2, 3, 5, 16).permute(0, 3, 1, 2)
    out = model(x, context)
    assert out.shape == x.shape
    torch.testing.assert_close(out, h + x, rtol=1e-10, atol=1e-10)


def test_spatial_transformer_is_residual():
    model = make_spatial_transformer()
    x, context = randn(2, 16, 4, 4, seed=1), randn(2, 3, 12, seed=2)
    assert not torch.allclose(model(x, context), x)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    torch.testing.assert_close(model(x, context), x, rtol=0, atol=0)


def test_spatial_transformer_uses_the_text():
    model = make_spatial_transformer()
    x, context = randn(2, 16, 4, 4, seed=1), randn(2, 3, 12, seed=2)
    assert not torch.allclose(model(x, context), model(x, randn(2, 3, 12, seed=3)))
    assert len(model.cross_attention_modules()) == 1
    assert model.cross_attention_modules()[0] is model.transformer_blocks[0].attn2


def test_unconditional_spatial_transformer():
    model = make_spatial_transformer(cross_attention_dim=None, num_layers=2)
    assert model.cross_attention_modules() == []
    x = randn(2, 16, 4, 4)
    assert model(x).shape == x.shape
