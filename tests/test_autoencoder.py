"""Tests for minildm/autoencoder.py: shapes for every downsampling factor, the diagonal Gaussian
(reparameterisation, KL against torch.distributions), the training loss written out by hand,
the scaling factor of appendix G, a short training run, and the errors. Models are tiny (width 16)."""

import dataclasses

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussianDistribution
from minildm.unet import UNet2DConditionModel, UNetConfig


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=seeded(seed))


def make_autoencoder(f=2, latent_channels=4, seed=0):
    config = dataclasses.replace(AutoencoderConfig.for_factor(f, latent_channels=latent_channels, width=16),
                                 norm_num_groups=8)
    torch.manual_seed(seed)
    return AutoencoderKL(config)


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("f,levels", [(1, 1), (2, 2), (4, 3), (8, 4)])
def test_encode_decode_shapes_for_every_factor(f, levels):
    ae = make_autoencoder(f, latent_channels=3)
    assert ae.config.downsampling_factor == f
    assert ae.config.block_out_channels == (16, 32, 32, 32)[:levels]
    x = randn(2, 3, 16, 8)
    with torch.no_grad():
        posterior = ae.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == (2, 3, 16 // f, 8 // f)
        assert posterior.sample(seeded(0)).shape == (2, 3, 16 // f, 8 // f)
        assert ae.decode(posterior.mode()).shape == (2, 3, 16, 8)
        assert ae(x).shape == ae(x, sample_posterior=True, generator=seeded(0)).shape == (2, 3, 16, 8)


def test_forward_is_decode_of_mode_or_of_a_sample():
    ae = make_autoencoder(2)
    x = randn(2, 3, 8, 8)
    with torch.no_grad():
        posterior = ae.encode(x)
        torch.testing.assert_close(ae(x), ae.decode(posterior.mean))
        torch.testing.assert_close(ae(x, sample_posterior=True, generator=seeded(3)),
                                   ae.decode(posterior.sample(seeded(3))))


def test_grayscale_autoencoder():
    config = AutoencoderConfig(in_channels=1, latent_channels=2, block_out_channels=(16, 16), norm_num_groups=8)
    ae = AutoencoderKL(config)
    with torch.no_grad():
        assert ae.encode(randn(2, 1, 8, 8)).mean.shape == (2, 2, 4, 4)
        assert ae.decode(randn(2, 2, 4, 4)).shape == (2, 1, 8, 8)


# --- DiagonalGaussianDistribution --------------------------------------------------------------


def gaussian_parameters(B=2, c=3, h=4, w=5, seed=0):
    mean = randn(B, c, h, w, seed=seed)
    logvar = torch.rand(B, c, h, w, generator=seeded(seed + 1)) * 6 - 3  # in [-3, 3]
    return mean, logvar, torch.cat([mean, logvar], dim=1)  # (B, 2c, h, w): mean first


def test_distribution_splits_mean_then_logvar():
    mean, logvar, params = gaussian_parameters()
    dist = DiagonalGaussianDistribution(params)
    torch.testing.assert_close(dist.mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(dist.mode(), mean, rtol=0, atol=0)
    torch.testing.assert_close(dist.logvar, logvar, rtol=0, atol=0)
    torch.testing.assert_close(dist.var, logvar.exp())
    torch.testing.assert_close(dist.std, logvar.exp().sqrt())


def test_kl_matches_torch_distributions():
    mean, logvar, params = gaussian_parameters(seed=4)
    q = Normal(mean.double(), (0.5 * logvar.double()).exp())
    expected = kl_divergence(q, Normal(0.0, 1.0)).sum(dim=(1, 2, 3))  # (B,)
    kl = DiagonalGaussianDistribution(params).kl()
    assert kl.shape == (2,)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)


def test_kl_is_zero_for_the_standard_normal():
    params = torch.zeros(2, 8, 3, 3)  # mean 0, log σ² = 0
    torch.testing.assert_close(DiagonalGaussianDistribution(params).kl(), torch.zeros(2))


def test_sample_is_reparameterised_and_reproducible():
    mean, logvar, params = gaussian_parameters(seed=7)
    dist = DiagonalGaussianDistribution(params)
    z = dist.sample(seeded(11))
    torch.testing.assert_close(dist.sample(seeded(11)), z, rtol=0, atol=0)
    assert not torch.allclose(dist.sample(seeded(12)), z)
    eps = randn(*mean.shape, seed=11)
    torch.testing.assert_close(z, mean + (0.5 * logvar).exp() * eps)


def test_sample_statistics():
    mean = torch.full((1, 2, 64, 64), 2.0)
    logvar = torch.full((1, 2, 64, 64), 2 * torch.log(torch.tensor(0.5)).item())  # σ = 0.5
    z = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).sample(seeded(0))
    # 8192 draws: standard errors are 0.0055 (mean) and 0.004 (std)
    assert abs(z.mean().item() - 2.0) < 0.03
    assert abs(z.std().item() - 0.5) < 0.02


def test_logvar_is_clamped():
    params = torch.cat([torch.zeros(1, 2, 2, 2), torch.tensor([100.0, -100.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)],
                       dim=1)
    dist = DiagonalGaussianDistribution(params)
    assert (dist.logvar[:, 0] == 20.0).all() and (dist.logvar[:, 1] == -30.0).all()
    assert torch.isfinite(dist.std).all() and torch.isfinite(dist.var).all() and torch.isfinite(dist.kl()).all()
    torch.testing.assert_close(dist.var[:, 0], torch.full((1, 2, 2), 20.0).exp())


# --- training loss -----------------------------------------------------------------------------


def test_training_loss_parts_written_out():
    ae = make_autoencoder(2)
    x = randn(2, 3, 8, 8, seed=1).clamp(-1, 1)
    kl_weight = 0.01
    loss, reconstruction, parts = ae.training_loss(x, kl_weight=kl_weight, generator=seeded(5))
    with torch.no_grad():
        posterior = ae.encode(x)
        z = posterior.mean + posterior.std * randn(*posterior.mean.shape, seed=5)  # same noise
        expected_reconstruction = ae.decode(z)
        q = Normal(posterior.mean.double(), posterior.std.double())
        kl_per_image = kl_divergence(q, Normal(0.0, 1.0)).sum(dim=(1, 2, 3))  # (B,)
    expected_rec = (x - expected_reconstruction).abs().mean()
    expected_l2 = (x - expected_reconstruction).pow(2).mean()
    expected_kl = kl_per_image.mean() / (3 * 8 * 8)  # per pixel value
    torch.testing.assert_close(reconstruction.detach(), expected_reconstruction)
    torch.testing.assert_close(parts["reconstruction"], expected_rec)
    torch.testing.assert_close(parts["kl"].double(), expected_kl, rtol=1e-5, atol=1e-7)
    expected_loss = expected_rec.double() + expected_l2.double() + kl_weight * expected_kl
    torch.testing.assert_close(loss.detach().double(), expected_loss,
                               rtol=1e-5, atol=1e-7)
    assert loss.requires_grad and not parts["kl"].requires_grad


def test_training_loss_is_reproducible_with_a_generator():
    ae = make_autoencoder(2)
    x = randn(2, 3, 8, 8, seed=1)
    a = ae.training_loss(x, generator=seeded(3))[0]
    b = ae.training_loss(x, generator=seeded(3))[0]
    c = ae.training_loss(x, generator=seeded(4))[0]
    assert a.item() == b.item() and a.item() != c.item()


def test_short_training_lowers_the_loss():
    ae = make_autoencoder(2, seed=1)
    # four flat-coloured 8x8 images with a bright square: easy to reconstruct
    x = torch.tensor([-0.8, -0.2, 0.3, 0.7]).reshape(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    x[:, :, 2:5, 2:5] = 0.9
    with torch.no_grad():
        before = ae.training_loss(x, generator=seeded(0))[0].item()
    optimizer = torch.optim.Adam(ae.parameters(), lr=2e-3)
    for step in range(30):
        loss = ae.training_loss(x, generator=seeded(step + 1))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = ae.training_loss(x, generator=seeded(0))[0].item()
    assert after < 0.75 * before, (before, after)  # about 0.43 with these seeds


# --- scaling factor (appendix G) ---------------------------------------------------------------


def test_estimate_scaling_factor_is_one_over_latent_std():
    ae = make_autoencoder(2)
    images = randn(5, 3, 8, 8, seed=2)
    assert ae.scaling_factor == 1.0
    torch.manual_seed(123)  # estimate_scaling_factor draws from the global generator
    factor = ae.estimate_scaling_factor(images)
    with torch.no_grad():
        posterior = ae.encode(images)
    torch.manual_seed(123)
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape)
    expected = 1.0 / z.double().flatten().numpy().std(ddof=1)
    assert factor == pytest.approx(expected, rel=1e-5)
    assert ae.config.scaling_factor == factor and ae.scaling_factor == factor


def test_scaled_latents_have_unit_std_for_any_batch_size():
    ae = make_autoencoder(2)
    # Make latents clearly not unit-variance, so a factor of 1 would fail.
    with torch.no_grad():
        ae.quant_conv.weight.mul_(5.0)
    images = randn(7, 3, 8, 8, seed=2)
    torch.manual_seed(0)
    whole = ae.estimate_scaling_factor(images, batch_size=256)
    torch.manual_seed(1)
    batched = ae.estimate_scaling_factor(images, batch_size=3)  # batches of 3, 3, 1
    assert batched == pytest.approx(whole, rel=0.1)
    with torch.no_grad():
        fresh = ae.encode(images).sample(seeded(9))
    assert (fresh * ae.scaling_factor).std().item() == pytest.approx(1.0, rel=0.1)
    assert abs(whole - 1.0) > 0.2


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,match",
    [
        (randn(2, 1, 8, 8), "shape"),  # wrong channels
        (randn(3, 8, 8), "shape"),  # no batch dimension
        (randn(2, 3, 10, 8), "multiples of the downsampling factor f=4"),
        (randn(2, 3, 8, 6), "multiples of the downsampling factor f=4"),
    ],
)
def test_encode_errors(x, match):
    ae = make_autoencoder(4)
    with pytest.raises(ValueError, match=match):
        ae.encode(x)


def test_decode_errors():
    ae = make_autoencoder(2, latent_channels=4)
    for z in (randn(2, 3, 4, 4), randn(4, 4, 4)):
        with pytest.raises(ValueError, match="latents"):
            ae.decode(z)


@pytest.mark.parametrize("f", [0, 3, 16])
def test_for_factor_refuses_other_factors(f):
    with pytest.raises(ValueError, match="1, 2, 4, 8"):
        AutoencoderConfig.for_factor(f)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_out_channels=(16,) * 5), "1 to 4 levels"),
        (dict(block_out_channels=()), "1 to 4 levels"),
        (dict(block_out_channels=(16, 24), norm_num_groups=16), "norm_num_groups"),
        (dict(layers_per_block=0), "at least 1"),
        (dict(latent_channels=0), "at least 1"),
        (dict(scaling_factor=0.0), "positive"),
        (dict(scaling_factor=float("nan")), "positive"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderConfig(**kwargs)


def test_save_load_round_trip(tmp_path):
    ae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, scaling_factor=0.3))
    ae.save(tmp_path / "ae")
    loaded = AutoencoderKL.load(tmp_path / "ae")
    assert loaded.scaling_factor == 0.3
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ae.eval()(x), loaded(x))


def test_autocast_runs_the_whole_round_trip_and_outside_it_the_dtype_is_checked():
    """Under bf16 autocast the encoder's latents come out in bf16; the decoder (and the UNet) must take them.
    Outside autocast a bf16 input is still refused with a message naming the dtypes. (CPU autocast here; the
    CUDA one is the same code path, run by tests/test_cuda.py's training test on a GPU.)"""
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4)).eval()
    unet = UNet2DConditionModel(UNetConfig(in_channels=4, out_channels=4, block_out_channels=(16, 16),
                                           attention_levels=(False, True), cross_attention_dim=8,
                                           attention_head_dim=8, norm_num_groups=4)).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        full = ae(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = ae.encode(x).mode()
            assert z.dtype == torch.bfloat16
            half = ae(x)
            out = unet(z, torch.tensor([3, 500]), torch.randn(2, 5, 8))
    assert half.dtype == torch.bfloat16 and out.shape == z.shape
    assert (half.float() - full).abs().max() < 0.1  # bf16 keeps about 3 significant digits
    with pytest.raises(TypeError, match=r"torch.float32 tensor.*got a torch.bfloat16"):
        ae.decode(z)
    with pytest.raises(TypeError, match=r"torch.float32 tensor.*got a torch.bfloat16"):
        unet(z, torch.tensor([3, 500]), torch.randn(2, 5, 8))


def test_sd_encoder_padding_is_diffusers_downsample():
    # Stable Diffusion's encoder pads (0, 1, 0, 1) before its stride-2 convolutions (downsample_padding=0).
    pytest.importorskip("diffusers")
    from minildm.resnet import Downsample2D

    ours = Downsample2D(8, padding=0)
    from diffusers.models.downsampling import Downsample2D as DiffusersDownsample2D

    theirs = DiffusersDownsample2D(8, use_conv=True, padding=0, name="op")  # the name the VAE uses
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 7, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        assert ours(x).shape == (2, 8, 3, 3)
        symmetric = Downsample2D(8)
        symmetric.load_state_dict(ours.state_dict())
        assert not torch.allclose(symmetric(x[:, :, :6]), ours(x[:, :, :6]))  # same size, other windows


def test_downsample_padding_is_saved_only_when_set():
    config = AutoencoderConfig(block_out_channels=(8, 8), norm_num_groups=4)
    assert "downsample_padding" not in AutoencoderKL(config).config_dict()
    sd = AutoencoderKL(dataclasses.replace(config, downsample_padding=0))
    assert sd.config_dict()["downsample_padding"] == 0
    assert AutoencoderKL.from_config_dict(sd.config_dict()).encoder.down_blocks[0].downsamplers[0].padding == 0
    with pytest.raises(ValueError, match="downsample_padding"):
        AutoencoderConfig(downsample_padding=2)
