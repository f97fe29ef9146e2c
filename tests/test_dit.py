"""Tests for minildm/dit.py: patchify / unpatchify against a layout written out here, the 2-D sine-cosine position
embedding against MAE's formula in numpy, adaLN-Zero (zero output and identity blocks at initialisation, then
dependence on t and on the text), shapes, errors, gradients, and a DiT run through LatentDiffusion (train_ldm,
generate, save / load, cross-attention maps). Models are tiny (hidden size 16-32, 2 blocks)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import CAPTIONS

from minildm import DiTConfig, DiTTransformer2DModel, FlowMatchSchedule, LatentDiffusion
from minildm.attention import Attention
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.dit import FREQUENCY_EMBEDDING_SIZE, get_2d_sincos_pos_embed, unpatchify
from minildm.interfaces import Backbone
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder
from minildm.train import TrainingConfig, train_ldm
from minildm.unet import timestep_embedding


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_dit(seed=0, **kwargs):
    config = {"in_channels": 4, "out_channels": 4, "patch_size": 2, "hidden_size": 32, "num_layers": 2,
              "num_attention_heads": 2, "cross_attention_dim": 12, **kwargs}
    torch.manual_seed(seed)
    return DiTTransformer2DModel(DiTConfig(**config)).eval()


@torch.no_grad()
def perturb_zero_inits(model, seed=1):
    """Give every all-zero parameter (adaLN-Zero, the output layer, the biases) random values."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if not parameter.any():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def text_states(B=2, L=3, D=12, seed=2):
    return randn(B, L, D, seed=seed)


# --- patchify and unpatchify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 3])
def test_patchify_then_unpatchify_is_the_identity_on_the_token_layout(p):
    C, grid_h, grid_w = 4, 2, 3
    model = make_dit(patch_size=p, hidden_size=p * p * C, num_attention_heads=1, in_channels=C)
    with torch.no_grad():  # a patch embedding that copies patch pixel (i, j, c) to token channel (i p + j) C + c
        model.patch_embed.weight.zero_()
        model.patch_embed.bias.zero_()
        for i in range(p):
            for j in range(p):
                for c in range(C):
                    model.patch_embed.weight[(i * p + j) * C + c, c, i, j] = 1.0
    x = randn(2, C, grid_h * p, grid_w * p)
    tokens = model.patchify(x)
    assert tokens.shape == (2, grid_h * grid_w, p * p * C)
    for row in range(grid_h):  # token row * grid_w + column is the patch at (row, column), channels last
        for column in range(grid_w):
            patch = x[:, :, row * p:(row + 1) * p, column * p:(column + 1) * p]  # (B, C, p, p)
            assert torch.equal(tokens[:, row * grid_w + column], patch.permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(unpatchify(tokens, p, grid_h, grid_w), x)


def test_unpatchify_places_every_token_channel():
    p, C, grid_h, grid_w = 2, 3, 3, 2
    tokens = randn(2, grid_h * grid_w, p * p * C)
    out = unpatchify(tokens, p, grid_h, grid_w)
    assert out.shape == (2, C, grid_h * p, grid_w * p)
    for row in range(grid_h * p):
        for column in range(grid_w * p):
            n = (row // p) * grid_w + column // p
            first = ((row % p) * p + column % p) * C
            assert torch.equal(out[:, :, row, column], tokens[:, n, first:first + C])


# --- the position embedding ----------------------------------------------------------------------------------


def mae_2d_sincos_pos_embed(embed_dim, grid_h, grid_w):
    """MAE's get_2d_sincos_pos_embed (which DiT uses), written for a grid_h x grid_w grid, in float64."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64)), axis=0)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 7), (16, 16)])
@pytest.mark.parametrize("dim", [4, 32])
def test_position_embedding_matches_mae_formula(grid, dim):
    ours = get_2d_sincos_pos_embed(dim, *grid)
    expected = torch.from_numpy(mae_2d_sincos_pos_embed(dim, *grid))
    assert ours.shape == (grid[0] * grid[1], dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)
    # Token 1 is one column right of token 0: the first D/2 channels move, the last D/2 (the row) do not.
    if grid[1] > 1:
        torch.testing.assert_close(ours[1, dim // 2:], ours[0, dim // 2:])
        torch.testing.assert_close(ours[1, 0], torch.tensor(math.sin(1.0)))


def test_the_blocks_see_patches_plus_position_embedding():
    model = perturb_zero_inits(make_dit())
    seen = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = randn(2, 4, 6, 8)
    with torch.no_grad():
        model(x, 10, text_states())
        expected = model.patchify(x) + get_2d_sincos_pos_embed(32, 3, 4)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


# --- shapes, timesteps and errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("B,h,w", [(1, 8, 8), (3, 4, 6), (2, 2, 2), (2, 10, 6)])
def test_output_shape_for_several_grids_and_batches(B, h, w):
    model = perturb_zero_inits(make_dit())
    with torch.no_grad():
        out = model(randn(B, 4, h, w), torch.arange(B) * 300, text_states(B=B))
    assert out.shape == (B, 4, h, w) and torch.isfinite(out).all()


def test_other_out_channels_patch_sizes_and_no_text():
    model = perturb_zero_inits(make_dit(in_channels=3, out_channels=5, patch_size=4))
    with torch.no_grad():
        assert model(randn(2, 3, 8, 12), 7, text_states()).shape == (2, 5, 8, 12)
    plain = perturb_zero_inits(make_dit(cross_attention_dim=None))  # DiT without text: no attn2
    assert plain.cross_attention_modules() == {} and plain.transformer_blocks[0].attn2 is None
    with torch.no_grad():
        assert plain(randn(2, 4, 4, 4), 7).shape == (2, 4, 4, 4)


def test_every_form_of_timestep_gives_the_same_output():
    model = perturb_zero_inits(make_dit())
    x, ehs = randn(2, 4, 4, 4), text_states()
    with torch.no_grad():
        reference = model(x, torch.tensor([250, 250]), ehs)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250]), torch.tensor([[250], [250]]),
                  torch.tensor([250.0, 250.0])):
            torch.testing.assert_close(model(x, t, ehs), reference, rtol=0, atol=0)
        assert not torch.allclose(model(x, 250.5, ehs), reference)  # a flow sampler's float t is not rounded


def test_a_size_the_patch_does_not_divide_is_refused():
    model = make_dit()
    with pytest.raises(ValueError, match=r"h=7 and w=7 must be multiples of patch_size=2: use image sizes that "
                                         r"give latents .* a multiple of 2"):
        model(randn(1, 4, 7, 7), 1, text_states(B=1))
    with pytest.raises(ValueError, match="h=4 and w=6 must be multiples of patch_size=4"):
        make_dit(patch_size=4)(randn(1, 4, 4, 6), 1, text_states(B=1))


def test_bad_inputs_are_refused():
    model = make_dit()
    with pytest.raises(ValueError, match=r"sample must have shape \(B, 4, h, w\)"):
        model(randn(1, 3, 4, 4), 1, text_states(B=1))
    with pytest.raises(ValueError, match="text-conditioned: pass encoder_hidden_states"):
        model(randn(1, 4, 4, 4), 1)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must have shape \(2, L, 12\), got \(2, 3, 5\)"):
        model(randn(2, 4, 4, 4), 1, randn(2, 3, 5))
    with pytest.raises(ValueError, match="unconditional"):
        make_dit(cross_attention_dim=None)(randn(1, 4, 4, 4), 1, text_states(B=1))
    with pytest.raises(TypeError, match="sample must be a torch.float32 tensor"):
        model(randn(1, 4, 4, 4).double(), 1, text_states(B=1))
    with pytest.raises(ValueError, match="timestep must be a single value"):
        model(randn(2, 4, 4, 4), torch.tensor([1, 2, 3]), text_states())


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size=30 must be a multiple of num_attention_heads=4"),
    ({"hidden_size": 18, "num_attention_heads": 3}, "hidden_size must be a multiple of 4"),
    ({"patch_size": 0}, "patch_size must be an integer >= 1"),
    ({"num_layers": 1.5}, "num_layers must be an integer >= 1"),
    ({"cross_attention_dim": 0}, "cross_attention_dim must be an integer >= 1"),
    ({"in_channels": True}, "in_channels must be an integer >= 1"),
    ({"mlp_ratio": 0}, "mlp_ratio must be a number > 0"),
    ({"mlp_ratio": float("nan")}, "mlp_ratio must be a number > 0"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**kwargs)


def test_dtype_follows_the_weights():
    model = perturb_zero_inits(make_dit()).double()
    with torch.no_grad():
        out = model(randn(2, 4, 4, 4).double(), 3, text_states().double())
    assert out.dtype == torch.float64


# --- adaLN-Zero ----------------------------------------------------------------------------------------------


def test_adaln_zero_starts_at_zero_with_every_block_the_identity():
    model = make_dit()
    x, t, ehs = randn(2, 4, 6, 4), torch.tensor([3, 800]), text_states()
    with torch.no_grad():
        assert torch.equal(model(x, t, ehs), torch.zeros_like(x))
        temb = model.time_embedding(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE))
        tokens = randn(2, 6, 32, seed=5)
        for block in model.transformer_blocks:
            assert torch.equal(block(tokens, temb, ehs), tokens)
        perturb_zero_inits(model)
        assert not torch.allclose(model.transformer_blocks[0](tokens, temb, ehs), tokens)


def layer_norm_by_hand(x, eps=1e-6):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def test_a_block_matches_the_adaln_zero_equations():
    """The module docstring's block, with (β₁, γ₁, α₁, β₂, γ₂, α₂) = Linear(SiLU(c)) split in that order."""
    model = perturb_zero_inits(make_dit()).double()
    block = model.transformer_blocks[0]
    x, temb, ehs = randn(2, 6, 32).double(), randn(2, 32, seed=4).double(), text_states().double()
    with torch.no_grad():
        silu = temb * torch.sigmoid(temb)
        beta1, gamma1, alpha1, beta2, gamma2, alpha2 = [
            m[:, None] for m in (silu @ block.adaLN_modulation.weight.T + block.adaLN_modulation.bias).split(32, 1)]
        h = x + alpha1 * block.attn1((1 + gamma1) * layer_norm_by_hand(x) + beta1)
        norm2 = layer_norm_by_hand(h, eps=1e-5) * block.norm2.weight + block.norm2.bias
        h = h + block.attn2(norm2, ehs)
        mlp_in = (1 + gamma2) * layer_norm_by_hand(h) + beta2
        mlp = block.ff[2](torch.nn.functional.gelu(block.ff[0](mlp_in), approximate="tanh"))
        torch.testing.assert_close(block(x, temb, ehs), h + alpha2 * mlp, rtol=1e-10, atol=1e-10)


def test_the_final_layer_matches_its_equation():
    """output = unpatchify(Linear((1 + γ) LN(x) + β)), (β, γ) = Linear(SiLU(c)), c = MLP(sinusoid(t))."""
    model = perturb_zero_inits(make_dit()).double()
    sample, t, ehs = randn(2, 4, 4, 6).double(), torch.tensor([30, 700]), text_states().double()
    with torch.no_grad():
        temb = model.time_embedding(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE).double())
        x = model.patchify(sample) + get_2d_sincos_pos_embed(32, 2, 3).double()
        for block in model.transformer_blocks:
            x = block(x, temb, ehs)
        silu = temb * torch.sigmoid(temb)
        beta, gamma = (silu @ model.adaLN_modulation.weight.T + model.adaLN_modulation.bias)[:, None].split(32, -1)
        tokens = ((1 + gamma) * layer_norm_by_hand(x) + beta) @ model.proj_out.weight.T + model.proj_out.bias
        torch.testing.assert_close(model(sample, t, ehs), unpatchify(tokens, 2, 2, 3), rtol=1e-10, atol=1e-10)


def test_after_perturbing_the_zeros_the_output_depends_on_time_and_text_per_sample():
    model = perturb_zero_inits(make_dit())
    x, ehs = randn(2, 4, 4, 4), text_states()
    with torch.no_grad():
        out = model(x, torch.tensor([5, 5]), ehs)
        out_time = model(x, torch.tensor([5, 600]), ehs)  # only the second timestep changes
        other_text = ehs.clone()
        other_text[1] = randn(3, 12, seed=7)  # only the second prompt changes
        out_text = model(x, torch.tensor([5, 5]), other_text)
    for changed in (out_time, out_text):
        torch.testing.assert_close(changed[0], out[0], rtol=0, atol=0)  # nothing mixes across the batch
        assert (changed[1] - out[1]).abs().max() > 1e-3


def test_gradients_reach_every_parameter():
    model = perturb_zero_inits(make_dit()).train()
    out = model(randn(2, 4, 4, 6), torch.tensor([10, 900]), text_states())
    torch.nn.functional.mse_loss(out, randn(2, 4, 4, 6, seed=3)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        if name.endswith("to_k.bias"):
            # The key bias adds q·b to a whole row of scores, which the softmax ignores: its gradient is zero.
            torch.testing.assert_close(parameter.grad, torch.zeros_like(parameter), rtol=0, atol=1e-6)
        else:
            assert parameter.grad.abs().max() > 0, name


def test_seeded_construction_and_forward_are_reproducible():
    a, b = perturb_zero_inits(make_dit(seed=3)), perturb_zero_inits(make_dit(seed=3))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(make_dit(seed=4).patch_embed.weight, a.patch_embed.weight)
    x, ehs = randn(2, 4, 4, 4), text_states()
    with torch.no_grad():
        assert torch.equal(a(x, 5, ehs), b(x, 5, ehs))


def test_config_dict_round_trip_and_the_backbone_slot():
    model = make_dit()
    assert isinstance(model, Backbone)
    assert (model.in_channels, model.out_channels, model.cross_attention_dim) == (4, 4, 12)
    config = json.loads(json.dumps(model.config_dict()))
    rebuilt = DiTTransformer2DModel.from_config_dict(config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    modules = model.cross_attention_modules()
    assert list(modules) == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert all(isinstance(m, Attention) for m in modules.values())


# --- through LatentDiffusion ---------------------------------------------------------------------------------


def make_dit_ldm() -> LatentDiffusion:
    """f = 4 autoencoder (32x32 images -> 4x8x8 latents), a 2-block DiT on 2x2 patches (a 4x4 grid)."""
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16, 16), norm_num_groups=4))
    text_encoder = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1, num_heads=2)
    dit = DiTTransformer2DModel(DiTConfig(in_channels=4, out_channels=4, patch_size=2, hidden_size=32, num_layers=2,
                                          num_attention_heads=2, cross_attention_dim=16))
    return LatentDiffusion(autoencoder, dit, NoiseSchedule(), text_encoder, image_size=32).eval()


def test_a_dit_trains_generates_saves_and_maps_attention_through_latent_diffusion(tmp_path):
    ldm = make_dit_ldm()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [CAPTIONS[i % 3] for i in range(8)]
    history = train_ldm(ldm, images, captions, TrainingConfig(steps=3, batch_size=4, progress=False, device="cpu"))
    assert history["steps"] == [3] and len(history["loss"]) == 3 and all(math.isfinite(v) for v in history["loss"])
    assert ldm.backbone.proj_out.weight.abs().max() > 0  # trained away from the zero initialisation
    ldm.eval()

    generated = ldm.generate(CAPTIONS[:2], 3, generator=torch.Generator().manual_seed(1))
    assert generated.shape == (2, 3, 32, 32) and generated.min() >= 0 and generated.max() <= 1
    assert torch.equal(generated, ldm.generate(CAPTIONS[:2], 3, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(generated, ldm.generate(CAPTIONS[:2], 3, generator=torch.Generator().manual_seed(2)))

    ldm.save(tmp_path / "dit")
    assert json.loads((tmp_path / "dit" / "config.json").read_text())["backbone"]["class"] == "DiTTransformer2DModel"
    loaded = LatentDiffusion.load(tmp_path / "dit")
    assert isinstance(loaded.backbone, DiTTransformer2DModel) and loaded.backbone.config == ldm.backbone.config
    assert torch.equal(loaded.generate(CAPTIONS[:2], 3, generator=torch.Generator().manual_seed(1)), generated)

    # Attention maps: the 16 positions of the 4x4 patch grid are found and upsampled to the 8x8 latent.
    image, maps, tokens = ldm.cross_attention_maps("a red circle", num_inference_steps=3,
                                                   generator=torch.Generator().manual_seed(0))
    assert tokens == ["<bos>", "a", "red", "circle", "<eos>"]
    assert image.shape == (3, 32, 32) and maps.shape == (5, 8, 8) and torch.isfinite(maps).all()
    assert maps.min() >= 0 and (maps.sum(dim=0) <= 1 + 1e-5).all() and maps.sum() > 0
    for module in ldm.backbone.cross_attention_modules().values():
        assert module.attention_probs is None and not module.store_attention_probs


def test_the_recorded_attention_probabilities_are_rows_of_a_softmax():
    model = perturb_zero_inits(make_dit())
    attn2 = model.transformer_blocks[1].attn2
    attn2.store_attention_probs = True
    with torch.no_grad():
        model(randn(2, 4, 8, 6), 100, text_states(L=5))
    assert attn2.attention_probs.shape == (2, 2, 12, 5)  # (B, heads, N = 4 x 3 patches, L)
    torch.testing.assert_close(attn2.attention_probs.sum(-1), torch.ones(2, 2, 12))


def test_attention_maps_and_a_flow_with_a_patch_size_that_halving_misses():
    """Patch size 3 on 12x12 pixels gives a 4x4 grid, which no stride-2 level of a UNet has; a rectified flow
    trains and samples with the DiT through the same slots."""
    torch.manual_seed(0)
    text_encoder = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1, num_heads=2)
    dit = DiTTransformer2DModel(DiTConfig(in_channels=3, out_channels=3, patch_size=3, hidden_size=32, num_layers=1,
                                          num_attention_heads=2, cross_attention_dim=16))
    ldm = LatentDiffusion(None, dit, FlowMatchSchedule(), text_encoder, "flow_prediction", image_size=12)
    images = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    history = train_ldm(ldm, images, CAPTIONS[:2] * 2, TrainingConfig(steps=2, batch_size=2, progress=False))
    assert all(math.isfinite(v) for v in history["loss"])
    image, maps, tokens = ldm.cross_attention_maps("a red circle", num_inference_steps=2,
                                                   generator=torch.Generator().manual_seed(0))
    assert image.shape == (3, 12, 12) and maps.shape == (len(tokens), 12, 12) and torch.isfinite(maps).all()
    # every position's attention over the tokens shown sums to at most 1 (the rest is padding)
    assert maps.min() >= 0 and (maps.sum(dim=0) <= 1 + 1e-5).all() and maps.sum() > 0
