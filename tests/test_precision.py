"""Half precision: a bf16 or fp16 model runs in its dtype through every public entry point (generate,
encode/decode, the training losses, attention maps, training, save/load), and images come back as float32
in [0, 1]. On the CPU torch has every op these models use in both dtypes (torch 2.13)."""

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.train import TrainingConfig, train_autoencoder, train_ldm

HALF = [torch.bfloat16, torch.float16]


def record_backbone_inputs(ldm):
    seen = []
    ldm.backbone.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, args[2].dtype)))
    return seen


@pytest.mark.parametrize("dtype", HALF)
def test_generate_runs_in_the_models_dtype(dtype):
    ldm = make_tiny_ldm().to(dtype)
    seen = record_backbone_inputs(ldm)
    out = ldm.generate(CAPTIONS, 4, generator=torch.Generator().manual_seed(0), return_intermediates=True)
    assert out.images.dtype == torch.float32 and 0 <= out.images.min() and out.images.max() <= 1
    assert seen and set(seen) == {(dtype, dtype)}  # the backbone's sample and text states stay in its dtype
    assert out.latents.dtype == dtype
    assert {p.dtype for p in ldm.parameters()} == {dtype}  # nothing was cast back
    # Close to the float32 model's images from the same noise (drawn in float32, then cast).
    reference = make_tiny_ldm().generate(CAPTIONS, 4, generator=torch.Generator().manual_seed(0))
    assert (out.images - reference).abs().mean() < 0.05


@pytest.mark.parametrize("dtype", HALF)
def test_every_sampler_and_given_latents_in_half_precision(dtype):
    ldm = make_tiny_ldm().to(dtype)
    for name in ("ddim", "ddpm"):
        sampler = ldm.make_sampler(name, **({"eta": 1.0} if name == "ddim" else {}))
        images = ldm.generate(CAPTIONS[:1], 3, sampler=sampler, latents=torch.randn(1, 4, 4, 4),
                              generator=torch.Generator().manual_seed(0))
        assert images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.parametrize("dtype", HALF)
def test_encode_decode_and_losses_in_half_precision(dtype):
    ldm = make_tiny_ldm().to(dtype)
    images = torch.rand(3, 3, 16, 16) * 2 - 1  # float32 images are cast to the first stage's dtype
    latents = ldm.encode_images(images, torch.Generator().manual_seed(0))
    assert latents.dtype == dtype and latents.shape == (3, 4, 4, 4)
    decoded = ldm.decode_latents(latents)
    assert decoded.dtype == torch.float32 and decoded.shape == (3, 3, 16, 16)
    loss = ldm.training_loss(images, CAPTIONS, generator=torch.Generator().manual_seed(1))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in ldm.backbone.parameters() if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {dtype}


@pytest.mark.parametrize("dtype", HALF)
def test_attention_maps_in_half_precision(dtype):
    ldm = make_tiny_ldm().to(dtype)
    image, maps, tokens = ldm.cross_attention_maps("a red circle", num_inference_steps=2,
                                                   generator=torch.Generator().manual_seed(0))
    assert image.dtype == maps.dtype == torch.float32 and maps.shape == (len(tokens), 4, 4)


@pytest.mark.parametrize("dtype", HALF)
def test_training_in_half_precision_keeps_the_dtype_and_learns(dtype):
    # The model computes in its dtype; the optimizer steps float32 copies of the weights (in pure fp16, AdamW's
    # eps of 1e-8 is 0, and its first step turned every weight to NaN).
    ldm = make_tiny_ldm().to(dtype)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    latents = ldm.encode_images(images, torch.Generator().manual_seed(0))

    def fixed_loss():
        with torch.no_grad():
            return ldm.latent_training_loss(latents, CAPTIONS * 2, 0.0, torch.Generator().manual_seed(5)).item()

    before = fixed_loss()
    history = train_ldm(ldm, images, CAPTIONS * 2, TrainingConfig(steps=40, batch_size=6, lr=3e-3, ema_decay=0.0,
                                                                  device="cpu", progress=False))
    assert len(history["loss"]) == 40 and history["skipped_steps"] == []
    assert {p.dtype for p in ldm.parameters()} == {dtype}
    assert fixed_loss() < 0.8 * before


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_training_resumes_bit_for_bit(dtype, tmp_path):
    from minildm.discriminator import PatchDiscriminator

    def fresh():
        torch.manual_seed(0)
        autoencoder = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4)).to(dtype)
        return autoencoder, PatchDiscriminator(width=8, num_layers=2)  # a float32 discriminator beside it

    images = torch.rand(8, 3, 16, 16) * 2 - 1
    settings = dict(steps=4, batch_size=2, device="cpu", progress=False)
    straight, d = fresh()
    train_autoencoder(straight, images, TrainingConfig.for_autoencoder(**settings), discriminator=d)

    def crash(step):
        raise RuntimeError("crash")

    interrupted, d = fresh()
    with pytest.raises(RuntimeError):
        train_autoencoder(interrupted, images, TrainingConfig.for_autoencoder(
            **settings, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, callback_every=2), discriminator=d,
            callback=crash)
    resumed, d = fresh()
    train_autoencoder(resumed, images, TrainingConfig.for_autoencoder(**settings, checkpoint_dir=tmp_path / "ckpt",
                                                                      resume=True), discriminator=d)
    assert {p.dtype for p in resumed.parameters()} == {dtype}
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    resumed.save(tmp_path / "autoencoder")
    assert {p.dtype for p in AutoencoderKL.load(tmp_path / "autoencoder").parameters()} == {dtype}


def test_an_operation_missing_in_half_precision_is_said_plainly(monkeypatch):
    ldm = make_tiny_ldm().to(torch.float16)

    def missing(*args, **kwargs):  # what torch raises where a device lacks an fp16 kernel
        raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")

    monkeypatch.setattr(ldm.backbone.conv_in, "forward", missing)
    with pytest.raises(NotImplementedError, match="torch has no torch.float16 kernel on cpu.*run it in float32"):
        ldm.generate(CAPTIONS[:1], 2)
    with pytest.raises(NotImplementedError, match="no torch.float16 kernel"):
        train_ldm(ldm, torch.rand(2, 3, 16, 16), CAPTIONS[:2], TrainingConfig(steps=1, batch_size=2, device="cpu",
                                                                              progress=False))
