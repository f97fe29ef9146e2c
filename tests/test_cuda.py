"""The GPU path: the same models on CUDA agree with the CPU, train in bf16 autocast, save and load across
devices, and sample reproducibly. Skipped on machines without CUDA (CI has none); run on a GPU with
`python -m pytest tests/test_cuda.py`."""

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm
from test_train import tiny_images

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.discriminator import PatchDiscriminator
from minildm.ldm import LatentDiffusion
from minildm.train import TrainingConfig, train_autoencoder, train_ldm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """TF32 off, so that CUDA's fp32 results can be held to float32 tolerances against the CPU's."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_forward_on_cuda_matches_the_cpu():
    ldm = make_tiny_ldm()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    latents = torch.randn(4, *ldm.latent_shape(), generator=g)
    t = torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        states = ldm.conditioner.encode(CAPTIONS[:2] * 2)  # (4, L, D)
        cpu = (ldm.first_stage.encode(images).mean, ldm.first_stage.decode(latents), ldm.backbone(latents, t, states))
        ldm.to(CUDA)
        states = ldm.conditioner.encode(CAPTIONS[:2] * 2)
        assert states.device.type == "cuda"
        gpu = (ldm.first_stage.encode(images.to(CUDA)).mean, ldm.first_stage.decode(latents.to(CUDA)),
               ldm.backbone(latents.to(CUDA), t.to(CUDA), states))
    for name, a, b in zip(("encoder", "decoder", "unet"), cpu, gpu):
        assert b.device.type == "cuda" and b.dtype == torch.float32
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4, msg=f"{name} differs between CPU and CUDA")


def test_bf16_autocast_forward_is_close_to_fp32():
    ldm = make_tiny_ldm().to(CUDA)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(8, *ldm.latent_shape(), generator=g).to(CUDA)
    t = torch.randint(0, 1000, (8,), generator=g).to(CUDA)
    with torch.no_grad():
        states = ldm.conditioner.encode(CAPTIONS[:2] * 4)
        full = ldm.backbone(latents, t, states)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = ldm.backbone(latents, t, states)
    assert half.dtype == torch.bfloat16  # autocast ran the network in bf16
    relative = (half.float() - full).norm() / full.norm()
    assert relative < 0.05, f"bf16 output is {relative:.3f} away from fp32 (relative L2)"


def test_train_ldm_on_cuda_in_bf16_lowers_the_loss_and_keeps_fp32_weights():
    ldm = make_tiny_ldm()
    images = tiny_images(64)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(64)]
    before = {k: v.clone() for k, v in ldm.backbone.state_dict().items()}
    history = train_ldm(ldm, images, captions, TrainingConfig(steps=150, batch_size=32, lr=3e-3, ema_decay=0.0,
                                                              device="cuda", progress=False))
    assert len(history["loss"]) == 150 and history["skipped_steps"] == []
    assert sum(history["loss"][-20:]) < 0.8 * sum(history["loss"][:20])
    state = ldm.backbone.state_dict()
    assert all(v.device.type == "cuda" and v.dtype == before[k].dtype for k, v in state.items())
    assert any(not torch.equal(v.cpu(), before[k]) for k, v in state.items())


def test_train_autoencoder_with_a_discriminator_on_cuda():
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4))
    disc = PatchDiscriminator(width=8)
    config = TrainingConfig.for_autoencoder(steps=60, batch_size=8, lr=3e-3, device="cuda", progress=False)
    history = train_autoencoder(ae, tiny_images(), config, discriminator=disc, discriminator_start=20)
    assert len(history["loss"]) == 60
    assert sum(history["reconstruction"][-10:]) < 0.7 * sum(history["reconstruction"][:10])
    assert 0 < ae.scaling_factor < 100
    assert next(disc.parameters()).device.type == "cuda"


def test_generate_on_cuda_is_seeded_and_agrees_with_the_cpu():
    ldm = make_tiny_ldm()
    prompts = CAPTIONS[:2]
    cpu = ldm.generate(prompts, 10, sampler=ldm.make_sampler("ddim"), guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(0))
    ldm.to(CUDA)
    first = ldm.generate(prompts, 10, sampler=ldm.make_sampler("ddim"), guidance_scale=3.0,
                         generator=torch.Generator().manual_seed(0))
    again = ldm.generate(prompts, 10, sampler=ldm.make_sampler("ddim"), guidance_scale=3.0,
                         generator=torch.Generator().manual_seed(0))
    assert first.device.type == "cuda" and first.shape == (2, 3, 16, 16)
    assert 0 <= first.min() and first.max() <= 1
    torch.testing.assert_close(again, first, rtol=0, atol=1e-5)  # same seed, same images (to the last bits)
    torch.testing.assert_close(first.cpu(), cpu, rtol=0, atol=1e-3)  # the CPU's images, to float rounding
    # DDPM draws fresh noise every step from the same CPU generator: seeded on CUDA too
    a = ldm.generate(prompts, 20, sampler=ldm.make_sampler("ddpm"), guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(5))
    b = ldm.generate(prompts, 20, sampler=ldm.make_sampler("ddpm"), guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_model_saved_on_cuda_loads_on_the_cpu_and_back(tmp_path):
    ldm = make_tiny_ldm().to(CUDA)
    ldm.save(tmp_path / "model")
    on_cpu = LatentDiffusion.load(tmp_path / "model")
    assert on_cpu.device.type == "cpu"
    for (name, a), (_, b) in zip(ldm.state_dict().items(), on_cpu.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
    back = LatentDiffusion.load(tmp_path / "model", device="cuda")
    assert back.device.type == "cuda"
    assert all(torch.equal(a, b) for a, b in zip(ldm.state_dict().values(), back.state_dict().values()))


def test_resume_on_cuda_continues_the_run(tmp_path):
    """On a GPU, resume is exact up to the kernels' own nondeterminism (atomics in some backward passes): the
    resumed run ends where the straight one does, to a small tolerance."""
    images = tiny_images(32)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(32)]
    straight = make_tiny_ldm()
    train_ldm(straight, images, captions, TrainingConfig(steps=20, batch_size=8, device="cuda", progress=False))

    class Crash(Exception):
        pass

    def crash(step):
        raise Crash(step)

    with pytest.raises(Crash):  # dies right after the step-10 checkpoint
        train_ldm(make_tiny_ldm(), images, captions, TrainingConfig(
            steps=20, batch_size=8, device="cuda", progress=False, checkpoint_dir=tmp_path / "run",
            checkpoint_every=10, callback_every=10), callback=crash)
    resumed = make_tiny_ldm()
    history = train_ldm(resumed, images, captions, TrainingConfig(
        steps=20, batch_size=8, device="cuda", progress=False, checkpoint_dir=tmp_path / "run", resume=True))
    assert history["steps"] == [20] and len(history["loss"]) == 20
    for (name, a), (_, b) in zip(straight.backbone.state_dict().items(), resumed.backbone.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=f"{name} after resume")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_on_cuda_generates_trains_and_saves_in_its_dtype(dtype, tmp_path):
    ldm = make_tiny_ldm().to(CUDA, dtype)
    reference = make_tiny_ldm().to(CUDA).generate(CAPTIONS, 8, generator=torch.Generator().manual_seed(0))
    images = ldm.generate(CAPTIONS, 8, generator=torch.Generator().manual_seed(0), height=16, width=24)
    assert images.dtype == torch.float32 and images.device.type == "cuda" and images.shape == (3, 3, 16, 24)
    square = ldm.generate(CAPTIONS, 8, generator=torch.Generator().manual_seed(0))
    assert (square - reference).abs().mean() < 0.05  # the same noise, drawn in float32 on the CPU
    history = train_ldm(ldm, tiny_images(6), CAPTIONS * 2, TrainingConfig(steps=5, batch_size=6, progress=False))
    assert len(history["loss"]) == 5 and all(torch.isfinite(torch.tensor(history["loss"])))
    assert {p.dtype for p in ldm.parameters()} == {dtype} and ldm.device.type == "cuda"
    ldm.save(tmp_path / "model")
    loaded = LatentDiffusion.load(tmp_path / "model", device=CUDA)
    assert {p.dtype for p in loaded.parameters()} == {dtype}


def test_generate_with_every_sampler_kind_on_cuda():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from doubles import HeunLikeSampler

    ldm = make_tiny_ldm().to(CUDA)
    for sampler in (ldm.make_sampler("ddim", eta=0.5), ldm.make_sampler("ddpm"), HeunLikeSampler(ldm.schedule)):
        a = ldm.generate(CAPTIONS, 6, sampler=sampler, generator=torch.Generator().manual_seed(3))
        b = ldm.generate(CAPTIONS, 6, sampler=sampler, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and torch.isfinite(a).all()
