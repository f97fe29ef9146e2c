"""Tests for minildm/resnet.py and minildm/unet.py: the ResNet block against its docstring formula,
resampling shapes, the sinusoidal timestep embedding against its formula, and the UNet's shapes,
conditioning, diffusers key layout, errors and gradients. Models are tiny (16-32 channels, 8 px)."""

import math

import pytest
import torch
from torch import nn

from minildm.attention import Attention
from minildm.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from minildm.unet import UNet2DConditionModel, UNetConfig, timestep_embedding


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- ResnetBlock2D: written out with plain tensor ops ------------------------------------------


def group_norm_by_hand(x, groups, weight, bias, eps=1e-6):
    B, C, H, W = x.shape
    g = x.reshape(B, groups, -1)  # each group: C/groups channels x H x W values
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return g.reshape(B, C, H, W) * weight[None, :, None, None] + bias[None, :, None, None]


def silu_by_hand(x):
    return x * torch.sigmoid(x)


def resnet_by_hand(block, x, temb, groups):
    """The module docstring's formula, computed from the block's parameters."""
    conv = nn.functional.conv2d
    h = group_norm_by_hand(x, groups, block.norm1.weight, block.norm1.bias)
    h = conv(silu_by_hand(h), block.conv1.weight, block.conv1.bias, padding=1)
    if temb is not None:
        h = h + (silu_by_hand(temb) @ block.time_emb_proj.weight.T + block.time_emb_proj.bias)[:, :, None, None]
    h = group_norm_by_hand(h, groups, block.norm2.weight, block.norm2.bias)
    h = conv(silu_by_hand(h), block.conv2.weight, block.conv2.bias, padding=1)
    shortcut = x if block.conv_shortcut is None else conv(x, block.conv_shortcut.weight, block.conv_shortcut.bias)
    return shortcut + h


def make_resnet(in_ch, out_ch, temb_ch):
    torch.manual_seed(0)
    block = ResnetBlock2D(in_ch, out_ch, temb_ch, norm_num_groups=8).double()
    for norm in (block.norm1, block.norm2):  # non-trivial affine parameters
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    return block


@pytest.mark.parametrize("in_ch,out_ch", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("with_temb", [False, True])
def test_resnet_block_matches_docstring_formula(in_ch, out_ch, with_temb):
    block = make_resnet(in_ch, out_ch, 12 if with_temb else None)
    assert (block.conv_shortcut is None) == (in_ch == out_ch)
    assert (block.time_emb_proj is None) == (not with_temb)
    x = randn(2, in_ch, 6, 5, seed=1).double()
    temb = randn(2, 12, seed=2).double() if with_temb else None
    out = block(x, temb)
    assert out.shape == (2, out_ch, 6, 5)
    torch.testing.assert_close(out, resnet_by_hand(block, x, temb, groups=8), rtol=1e-10, atol=1e-10)


def test_resnet_block_time_embedding_is_used():
    block = make_resnet(16, 16, 12)
    x = randn(2, 16, 4, 4, seed=1).double()
    assert not torch.allclose(block(x, randn(2, 12, seed=2).double()), block(x, randn(2, 12, seed=3).double()))


def test_resnet_block_shortcut_is_identity_without_channel_change():
    block = make_resnet(16, 16, None)
    nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(block.conv2.bias)
    x = randn(2, 16, 4, 4, seed=1).double()
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_downsample_and_upsample_shapes_and_sampling():
    x = randn(2, 16, 8, 6)
    down, up = Downsample2D(16), Upsample2D(16)
    assert down(x).shape == (2, 16, 4, 3)
    assert down(randn(2, 16, 7, 5)).shape == (2, 16, 4, 3)  # odd sizes round up
    assert up(x).shape == (2, 16, 16, 12)
    # With a "pick the centre" kernel, the strided conv keeps every second pixel and the upsampler repeats pixels.
    for conv in (down.conv, up.conv):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        with torch.no_grad():
            conv.weight[range(16), range(16), 1, 1] = 1.0
    torch.testing.assert_close(down(x), x[:, :, ::2, ::2])
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


# --- timestep_embedding ------------------------------------------------------------------------


def timestep_embedding_by_hand(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = [max_period ** (-k / half) for k in range(half)]
    return [[math.cos(ti * w) for w in freqs] + [math.sin(ti * w) for w in freqs] for ti in t]


@pytest.mark.parametrize("dim", [2, 8, 32])
def test_timestep_embedding_matches_formula(dim):
    t = [0, 1, 7, 250, 999]
    emb = timestep_embedding(torch.tensor(t), dim)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    expected = torch.tensor(timestep_embedding_by_hand(t, dim))
    torch.testing.assert_close(emb, expected, rtol=0, atol=3e-4)  # float32 angles up to 999 rad
    t32 = torch.tensor(t, dtype=torch.float32)
    torch.testing.assert_close(emb[:, 0], torch.cos(t32))  # cos first, and ω_0 = 1
    torch.testing.assert_close(emb[:, dim // 2], torch.sin(t32))


def test_timestep_embedding_float_timesteps_and_max_period():
    t = [0.5, 12.25]
    emb = timestep_embedding(torch.tensor(t), 8, max_period=100.0)
    torch.testing.assert_close(emb, torch.tensor(timestep_embedding_by_hand(t, 8, 100.0)), rtol=0, atol=1e-5)


def test_timestep_embedding_odd_dim_has_dim_columns():
    assert timestep_embedding(torch.tensor([1, 2]), 5).shape == (2, 5)


# --- UNet2DConditionModel ----------------------------------------------------------------------

CONFIGS = {
    "1-level-attn": dict(block_out_channels=(16,), attention_levels=(True,), layers_per_block=1,
                         cross_attention_dim=12),
    "2-level-lpb2": dict(block_out_channels=(16, 32), attention_levels=(False, True), layers_per_block=2,
                         cross_attention_dim=12),
    "3-level-uncond": dict(block_out_channels=(16, 16, 32), attention_levels=(True, False, True), layers_per_block=1,
                           cross_attention_dim=None),
    "2-level-attn-first-uncond-lpb2": dict(block_out_channels=(16, 32), attention_levels=(True, False),
                                           layers_per_block=2, cross_attention_dim=None),
}


def make_unet(in_channels=4, out_channels=None, seed=0, **kwargs):
    kwargs = {"attention_head_dim": 8, "norm_num_groups": 8, **kwargs}
    config = UNetConfig(in_channels=in_channels, out_channels=out_channels or in_channels, **kwargs)
    torch.manual_seed(seed)
    return UNet2DConditionModel(config).eval()


def text_states(B=2, L=3, D=12, seed=1):
    return randn(B, L, D, seed=seed)


@pytest.mark.parametrize("name", CONFIGS)
def test_unet_output_shape_equals_input_shape(name):
    config = CONFIGS[name]
    unet = make_unet(**config)
    x = randn(2, 4, 8, 8)
    ehs = text_states() if config["cross_attention_dim"] is not None else None
    with torch.no_grad():
        out = unet(x, torch.tensor([3, 900]), ehs)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # Every level: layers_per_block ResNets down, one more up, a transformer after each at attention levels.
    lpb, levels = config["layers_per_block"], len(config["block_out_channels"])
    for level, has_attention in enumerate(config["attention_levels"]):
        down, up = unet.down_blocks[level], unet.up_blocks[levels - 1 - level]
        assert len(down.resnets) == lpb and len(up.resnets) == lpb + 1
        assert len(down.attentions) == (lpb if has_attention else 0)
        assert len(up.attentions) == (lpb + 1 if has_attention else 0)
        assert len(down.downsamplers) == (level < levels - 1) and len(up.upsamplers) == (level > 0)


def test_unet_out_channels_and_non_square_input():
    unet = make_unet(in_channels=3, out_channels=1, **CONFIGS["2-level-lpb2"])
    with torch.no_grad():
        out = unet(randn(2, 3, 8, 4), 10, text_states())
    assert out.shape == (2, 1, 8, 4)


def test_scalar_timestep_equals_repeated_timestep():
    unet = make_unet(**CONFIGS["2-level-lpb2"])
    x, ehs = randn(2, 4, 8, 8), text_states()
    with torch.no_grad():
        repeated = unet(x, torch.tensor([17, 17]), ehs)
        torch.testing.assert_close(unet(x, 17, ehs), repeated)
        torch.testing.assert_close(unet(x, torch.tensor(17), ehs), repeated)
        torch.testing.assert_close(unet(x, torch.tensor([17]), ehs), repeated)


def test_unet_output_depends_on_text_and_time_per_sample():
    unet = make_unet(**CONFIGS["2-level-lpb2"])
    x, ehs = randn(2, 4, 8, 8), text_states()
    with torch.no_grad():
        out = unet(x, torch.tensor([5, 5]), ehs)
        other_text = ehs.clone()
        other_text[1] = randn(3, 12, seed=7)  # change only the second prompt
        out_text = unet(x, torch.tensor([5, 5]), other_text)
        out_time = unet(x, torch.tensor([5, 600]), ehs)  # change only the second timestep
    # The second sample changes, the first does not: nothing mixes across the batch.
    assert not torch.allclose(out_text[1], out[1], atol=1e-5)
    torch.testing.assert_close(out_text[0], out[0])
    assert not torch.allclose(out_time[1], out[1], atol=1e-5)
    torch.testing.assert_close(out_time[0], out[0])


def test_state_dict_keys_follow_diffusers_layout():
    unet = make_unet(**CONFIGS["2-level-lpb2"])
    keys = set(unet.state_dict())
    for key in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "time_embedding.linear_2.bias",
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.0.resnets.1.norm2.weight",
        "down_blocks.0.resnets.0.time_emb_proj.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight",  # 16 -> 32 channels
        "down_blocks.1.attentions.0.norm.weight",
        "down_blocks.1.attentions.1.proj_in.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.norm3.weight",
        "down_blocks.1.attentions.0.proj_out.weight",
        "mid_block.resnets.0.conv1.weight",
        "mid_block.resnets.1.conv2.weight",
        "mid_block.attentions.0.proj_in.weight",
        "up_blocks.0.resnets.0.conv_shortcut.weight",
        "up_blocks.0.resnets.2.conv1.weight",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_v.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.1.resnets.2.conv_shortcut.weight",
        "conv_norm_out.weight",
        "conv_out.weight",
    ]:
        assert key in keys, key
    for absent_prefix in ["down_blocks.0.attentions", "down_blocks.1.downsamplers", "up_blocks.1.attentions",
                          "up_blocks.1.upsamplers", "down_blocks.0.resnets.0.conv_shortcut",
                          "down_blocks.0.resnets.2", "up_blocks.0.resnets.3"]:
        assert not any(k.startswith(absent_prefix) for k in keys), absent_prefix
    # Channel bookkeeping of the skips (diffusers' numbers for block_out_channels=(16, 32), 2 layers):
    sd = unet.state_dict()
    in_channels = [sd[f"up_blocks.{b}.resnets.{i}.conv1.weight"].shape[1] for b in range(2) for i in range(3)]
    assert in_channels == [32 + 32, 32 + 32, 32 + 16, 32 + 16, 16 + 16, 16 + 16]
    assert sd["time_embedding.linear_1.weight"].shape == (64, 16)  # C0 -> 4 C0


def test_unconditional_unet_has_no_cross_attention():
    unet = make_unet(**CONFIGS["3-level-uncond"])
    assert unet.cross_attention_modules() == {}
    assert not any("attn2" in key for key in unet.state_dict())
    assert any("attn1" in key for key in unet.state_dict())


def test_cross_attention_modules_finds_every_attn2():
    config = dict(CONFIGS["2-level-lpb2"], attention_levels=(True, True), transformer_layers_per_block=2)
    unet = make_unet(**config)
    modules = unet.cross_attention_modules()
    expected = {key.removesuffix(".to_q.weight") for key in unet.state_dict() if key.endswith("attn2.to_q.weight")}
    assert set(modules) == expected
    # 2 levels x (2 down + 3 up) + 1 mid transformers, 2 blocks each
    assert len(modules) == (2 * (2 + 3) + 1) * 2
    for name, module in modules.items():
        assert isinstance(module, Attention) and module is unet.get_submodule(name)
        assert module.to_k.in_features == 12


def test_attention_probs_can_be_stored_through_the_unet():
    unet = make_unet(**CONFIGS["1-level-attn"])
    for module in unet.cross_attention_modules().values():
        module.store_attention_probs = True
    with torch.no_grad():
        unet(randn(2, 4, 4, 4), 1, text_states(L=5))
    for module in unet.cross_attention_modules().values():
        assert module.attention_probs.shape == (2, 2, 16, 5)  # 16 channels / 8 head dim = 2 heads; 4x4 queries


@pytest.mark.parametrize(
    "sample,ehs,match",
    [
        (randn(2, 3, 8, 8), text_states(), "shape"),  # wrong channels
        (randn(4, 8, 8), text_states(), "shape"),  # no batch dimension
        (randn(2, 4, 8, 8), None, "encoder_hidden_states"),  # conditional UNet needs text
        (randn(2, 4, 8, 8), text_states(D=16), "encoder_hidden_states"),  # wrong width
        (randn(2, 4, 8, 8), text_states(B=3), "encoder_hidden_states"),  # wrong batch
        (randn(2, 4, 8, 8), randn(2, 12), "encoder_hidden_states"),  # missing L
    ],
)
def test_unet_input_errors(sample, ehs, match):
    unet = make_unet(block_out_channels=(16, 16, 16), attention_levels=(False, False, True), cross_attention_dim=12)
    with pytest.raises(ValueError, match=match):
        unet(sample, 1, ehs)


@pytest.mark.parametrize("h, w", [(7, 7), (5, 9), (6, 10), (1, 3), (8, 8)])
def test_any_latent_size_matches_diffusers(h, w):
    # diffusers' UNet takes sizes its downsampling does not divide: each upsampler goes to the size of the skip
    # it meets (7 -> 4 -> 2 -> 4 -> 7). The right value is diffusers' output with the same weights.
    diffusers = pytest.importorskip("diffusers")
    from benchmarks.vs_diffusers import diffusers_unet_kwargs

    ours = make_unet(block_out_channels=(16, 16, 32), attention_levels=(False, True, True), cross_attention_dim=12,
                     layers_per_block=2)
    theirs = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(ours.config, 8)).eval()
    theirs.load_state_dict(ours.state_dict())
    x, t = randn(2, 4, h, w), torch.tensor([3, 700])
    with torch.no_grad():
        out = ours(x, t, text_states())
        assert out.shape == (2, 4, h, w)
        torch.testing.assert_close(out, theirs(x, t, text_states()).sample, rtol=1e-4, atol=1e-5)


def test_odd_sizes_come_back_through_every_level():
    # Without diffusers: 7x5 goes down to 4x3 and 2x2 and comes back as 7x5; the output still depends on every
    # input position (a shape bug that cropped or padded would lose a border).
    unet = make_unet(block_out_channels=(16, 16, 16), attention_levels=(False, False, True), cross_attention_dim=12)
    x = randn(2, 4, 7, 5).requires_grad_(True)
    out = unet(x, 10, text_states())
    assert out.shape == (2, 4, 7, 5)
    out[:, :, -1, -1].sum().backward()
    assert x.grad[:, :, 0, 0].abs().sum() > 0 and x.grad[:, :, -1, -1].abs().sum() > 0


def test_unconditional_unet_refuses_text():
    unet = make_unet(**CONFIGS["3-level-uncond"])
    with pytest.raises(ValueError, match="unconditional"):
        unet(randn(2, 4, 8, 8), 1, text_states())


@pytest.mark.parametrize("timestep", [torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4, 5]), torch.zeros(0)])
def test_unet_timestep_of_wrong_size_is_a_value_error(timestep):
    unet = make_unet(block_out_channels=(16,), attention_levels=(False,), cross_attention_dim=None)
    with pytest.raises(ValueError, match="timestep"):
        unet(randn(4, 4, 8, 8), timestep)


def test_unet_timestep_column_is_accepted():
    unet = make_unet(block_out_channels=(16,), attention_levels=(False,), cross_attention_dim=None)
    x, t = randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t[:, None]), unet(x, t))  # (B, 1) as diffusers callers sometimes pass


def test_unet_timestep_matrix_is_a_value_error():
    unet = make_unet(block_out_channels=(16,), attention_levels=(False,), cross_attention_dim=None)
    with pytest.raises(ValueError, match="timestep"):
        unet(randn(4, 4, 8, 8), torch.tensor([[1, 2], [3, 4]]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_out_channels=(16, 24)), "norm_num_groups"),  # 24 % 16 != 0
        (dict(block_out_channels=(16, 32), attention_head_dim=12, norm_num_groups=4), "attention_head_dim"),
        (dict(block_out_channels=(16, 32), attention_levels=(True,)), "attention_levels"),
        (dict(block_out_channels=(16,), attention_levels=(True, False)), "attention_levels"),
        (dict(block_out_channels=(16, 32), layers_per_block=0), "layers_per_block"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    kwargs = {"attention_levels": (False,) * len(kwargs["block_out_channels"]), "norm_num_groups": 16,
              "attention_head_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_presets_are_valid_configs():
    tiny, sd = UNetConfig.tiny(), UNetConfig.sd_shaped()
    assert tiny.block_out_channels == (64, 128) and tiny.attention_levels == (False, True)
    assert len(sd.block_out_channels) == len(sd.attention_levels) == 4 and sd.layers_per_block == 2
    assert UNetConfig(block_out_channels=[32, 32], attention_levels=[True, False]).block_out_channels == (32, 32)


def test_backward_reaches_every_parameter():
    config = dict(CONFIGS["2-level-lpb2"], attention_levels=(True, True), layers_per_block=1)
    unet = make_unet(**config).train()
    out = unet(randn(2, 4, 8, 8), torch.tensor([10, 500]), text_states())
    out.square().mean().backward()
    no_grad = [name for name, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_unconditional_backward_reaches_every_parameter():
    unet = make_unet(**CONFIGS["3-level-uncond"]).train()
    unet(randn(2, 4, 8, 8), 3).square().mean().backward()
    assert [name for name, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


# --- Stable Diffusion's settings: heads per level, conv projections, norm eps ----------------------------------


def test_timestep_embedding_is_diffusers_with_sd_settings():
    diffusers = pytest.importorskip("diffusers")
    t = torch.tensor([0, 1, 17, 500, 999])
    theirs = diffusers.models.embeddings.get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 320), theirs, rtol=0, atol=0)


def test_heads_per_level_set_each_transformer():
    config = UNetConfig(block_out_channels=(16, 32, 32), attention_levels=(True, True, False), cross_attention_dim=8,
                        attention_head_dim=(2, 4, 4), norm_num_groups=8)  # 8 heads at every level, as SD 1.x
    assert [config.heads(level) for level in range(3)] == [8, 8, 8]
    unet = UNet2DConditionModel(config)
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            width = module.to_q.out_features
            assert module.heads == 8 and width in (16, 32), name
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 8  # the last level's heads
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig(block_out_channels=(16, 32), attention_levels=(True, True), attention_head_dim=(2, 4, 4),
                   norm_num_groups=8)
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig(block_out_channels=(16, 32), attention_levels=(True, True), attention_head_dim=(3, 4),
                   norm_num_groups=8)


def test_conv_projection_is_the_linear_one_with_other_weight_shapes():
    base = dict(block_out_channels=(16, 16), attention_levels=(False, True), cross_attention_dim=12,
                attention_head_dim=8, norm_num_groups=8)
    linear = UNet2DConditionModel(UNetConfig(**base))
    conv = UNet2DConditionModel(UNetConfig(**base, use_linear_projection=False))
    state = linear.state_dict()
    assert conv.state_dict()["mid_block.attentions.0.proj_in.weight"].shape == (16, 16, 1, 1)
    conv.load_state_dict({k: v[:, :, None, None] if k.endswith(("proj_in.weight", "proj_out.weight")) else v
                          for k, v in state.items()})
    x, text = randn(2, 4, 8, 8), randn(2, 3, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(conv.eval()(x, 5, text), linear.eval()(x, 5, text), rtol=1e-5, atol=1e-5)


def test_norm_eps_reaches_resnets_and_the_output_norm_only():
    unet = UNet2DConditionModel(UNetConfig(block_out_channels=(16, 16), attention_levels=(False, True),
                                           cross_attention_dim=12, attention_head_dim=8, norm_num_groups=8,
                                           norm_eps=1e-5))
    eps = {name: m.eps for name, m in unet.named_modules() if isinstance(m, nn.GroupNorm)}
    assert eps["conv_norm_out"] == 1e-5 and eps["down_blocks.0.resnets.0.norm1"] == 1e-5
    assert eps["mid_block.resnets.1.norm2"] == 1e-5
    assert eps["mid_block.attentions.0.norm"] == 1e-6  # the spatial transformer's, fixed in SD and diffusers


def test_sd_fields_are_saved_only_when_set():
    base = dict(block_out_channels=(16, 16), attention_levels=(False, True), cross_attention_dim=12,
                attention_head_dim=8, norm_num_groups=8)
    plain = UNet2DConditionModel(UNetConfig(**base)).config_dict()
    assert not {"use_linear_projection", "norm_eps", "upcast_attention"} & set(plain)
    sd = UNet2DConditionModel(UNetConfig(**{**base, "attention_head_dim": (2, 2)}, use_linear_projection=False,
                                         norm_eps=1e-5, upcast_attention=True))
    config = sd.config_dict()
    assert (config["use_linear_projection"], config["norm_eps"], config["upcast_attention"]) == (False, 1e-5, True)
    again = UNet2DConditionModel.from_config_dict({**config, "attention_head_dim": [2, 2]})  # as JSON reads it
    assert again.config == sd.config
