"""Training loops: EMA, learning-rate schedule, loss goes down, exact resume, guarded against NaN."""

import json

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.train import EMA, cosine_lr, pick_device, train_autoencoder, train_ldm


def test_ema_matches_its_formula():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    expected = torch.zeros(3)
    for n in range(1, 30):
        with torch.no_grad():
            p.add_(1.0)
        ema.update([p])
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * p.detach()
    assert torch.allclose(ema.shadow[0], expected)
    ema.copy_to([p])
    assert torch.allclose(p.detach(), expected)
    with pytest.raises(ValueError, match="decay"):
        EMA([p], decay=1.0)


def test_cosine_lr():
    assert cosine_lr(1.0, 0.0) == 0.0
    assert cosine_lr(1.0, 0.02) == pytest.approx(1.0)
    assert cosine_lr(1.0, 1.0) == pytest.approx(0.1)
    values = [cosine_lr(1.0, p / 100) for p in range(2, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type in {"cpu", "cuda", "mps"}


def tiny_images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = -torch.ones(n, 3, 16, 16)
    for i in range(n):  # a bright square at a random place: something with structure to learn
        x, y = torch.randint(0, 10, (2,), generator=g).tolist()
        images[i, :, y : y + 6, x : x + 6] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return images


def test_train_autoencoder_lowers_the_loss_and_sets_the_scaling_factor():
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4))
    images = tiny_images()
    history = train_autoencoder(ae, images, steps=60, batch_size=8, lr=3e-3, device="cpu", progress=False)
    assert len(history["loss"]) == 60 and history["steps"] == [60]
    assert sum(history["reconstruction"][-10:]) < 0.6 * sum(history["reconstruction"][:10])
    with torch.no_grad():
        z = ae.encode(images).sample(torch.Generator().manual_seed(0))
    assert ae.scaling_factor == pytest.approx(1 / z.std().item(), rel=0.1)
    with pytest.raises(ValueError, match="images"):
        train_autoencoder(ae, torch.zeros(4, 1, 16, 16), steps=1, progress=False)


def fixed_batch_loss(ldm, latents):
    with torch.no_grad():
        return ldm.latent_training_loss(latents, CAPTIONS * 3, 0.0, torch.Generator().manual_seed(123)).item()


def test_train_ldm_lowers_the_loss():
    ldm = make_tiny_ldm()
    images = tiny_images(9)
    captions = CAPTIONS * 3
    latents = ldm.encode_images(images, torch.Generator().manual_seed(0))
    before = fixed_batch_loss(ldm, latents)
    history = train_ldm(ldm, images, captions, steps=80, batch_size=9, lr=3e-3, ema_decay=0.0, device="cpu",
                        progress=False)
    assert history["steps"] == [80]
    assert fixed_batch_loss(ldm, latents) < 0.8 * before
    assert not ldm.autoencoder.encoder.conv_in.weight.requires_grad  # the first stage stays frozen


def test_max_minutes_stops_early():
    ldm = make_tiny_ldm()
    history = train_ldm(ldm, tiny_images(9), CAPTIONS * 3, steps=10**6, batch_size=4, max_minutes=0.02,
                        device="cpu", progress=False)
    assert 0 < history["steps"][0] < 10**6
    with pytest.raises(ValueError, match="max_minutes"):
        train_ldm(ldm, tiny_images(9), CAPTIONS * 3, steps=5, max_minutes=0, progress=False)


def test_resume_is_bit_identical(tmp_path):
    images, captions = tiny_images(9), CAPTIONS * 3
    straight = make_tiny_ldm()
    train_ldm(straight, images, captions, steps=6, batch_size=4, device="cpu", progress=False)

    class Crash(Exception):
        pass

    def crash(step):
        raise Crash(step)

    interrupted = make_tiny_ldm()
    with pytest.raises(Crash):  # dies right after the step-3 checkpoint
        train_ldm(interrupted, images, captions, steps=6, batch_size=4, device="cpu", progress=False,
                  checkpoint_dir=tmp_path, checkpoint_every=3, callback=crash, callback_every=3)
    resumed = make_tiny_ldm()  # a fresh process would start from new weights too
    history = train_ldm(resumed, images, captions, steps=6, batch_size=4, device="cpu", progress=False,
                        checkpoint_dir=tmp_path, resume=True)
    assert len(history["loss"]) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_with_the_step():
    ldm = make_tiny_ldm()
    images = tiny_images(9)
    images[:] = float("nan")
    with pytest.raises(FloatingPointError, match="step 0"):
        train_ldm(ldm, images, CAPTIONS * 3, steps=3, batch_size=4, device="cpu", progress=False)


def test_discriminator_hinge_losses():
    from minildm.discriminator import generator_loss, hinge_discriminator_loss

    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 3.0])
    # ½ mean(ReLU(1 - l_real)) + ½ mean(ReLU(1 + l_fake)), written out
    expected = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 4.0) / 3)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(expected)
    assert generator_loss(fake).item() == pytest.approx(-1 / 3)


def test_train_autoencoder_with_a_discriminator():
    from minildm.discriminator import PatchDiscriminator

    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4))
    discriminator = PatchDiscriminator(width=8, num_layers=2)
    assert discriminator(torch.zeros(2, 3, 16, 16)).shape == (2, 1, 4, 4)  # one logit per patch
    before = [p.detach().clone() for p in discriminator.parameters()]
    history = train_autoencoder(ae, tiny_images(), steps=6, batch_size=4, device="cpu", progress=False,
                                discriminator=discriminator, discriminator_start=2)
    assert len(history["discriminator"]) == 4 and len(history["adversarial"]) == 4  # from step 2 on
    assert any(not torch.equal(a, b) for a, b in zip(before, discriminator.parameters()))


def test_train_autoencoder_resume_is_bit_identical(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4))

    straight = fresh()
    train_autoencoder(straight, tiny_images(), steps=4, batch_size=4, device="cpu", progress=False)

    def crash(step):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train_autoencoder(fresh(), tiny_images(), steps=4, batch_size=4, device="cpu", progress=False,
                          checkpoint_dir=tmp_path, checkpoint_every=2, callback=crash, callback_every=2)
    resumed = fresh()
    train_autoencoder(resumed, tiny_images(), steps=4, batch_size=4, device="cpu", progress=False,
                      checkpoint_dir=tmp_path, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --- guarded training ----------------------------------------------------------------------------


def tiny_autoencoder():
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4))


def poison_gradient(parameter, at_calls):
    """Make `parameter`'s gradient NaN on the given backward passes (0-based), as a numerical blow-up would."""
    calls = []

    def hook(grad):
        calls.append(len(calls))
        return grad * float("nan") if calls[-1] in at_calls else grad

    parameter.register_hook(hook)


def test_nan_gradient_stops_naming_the_parameter_and_keeps_the_last_checkpoint(tmp_path):
    from minildm.atomic import read_json
    from minildm.checkpoint import load_weights

    ae = tiny_autoencoder()
    poison_gradient(ae.decoder.conv_out.weight, at_calls={2})
    with pytest.raises(FloatingPointError) as info:
        train_autoencoder(ae, tiny_images(), steps=5, batch_size=4, device="cpu", progress=False,
                          checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1)
    message = str(info.value)
    assert "the gradient of autoencoder.decoder.conv_out.weight is nan at step 2" in message
    assert "keeps the checkpoint of step 2" in message
    assert read_json(tmp_path / "ckpt" / "trainer.json")["step"] == 2  # the bad step wrote nothing
    saved = load_weights(tmp_path / "ckpt" / "autoencoder.safetensors")
    for name, value in ae.state_dict().items():  # nor did it change the weights in memory
        assert torch.equal(saved[name], value), name


def test_nan_data_names_the_loss(tmp_path):
    images = tiny_images()
    images[:] = float("inf")  # inf - inf in the loss: nan
    with pytest.raises(FloatingPointError, match="autoencoder: the loss is nan at step 0; no checkpoint was saved"):
        train_autoencoder(tiny_autoencoder(), images, steps=2, batch_size=4, device="cpu", progress=False,
                          checkpoint_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 0\. Lower the learning rate"):
        train_autoencoder(tiny_autoencoder(), images, steps=2, batch_size=4, device="cpu", progress=False)


def test_skip_policy_leaves_bad_steps_out_and_counts_them(capsys):
    ae = tiny_autoencoder()
    poison_gradient(ae.encoder.conv_in.bias, at_calls={1, 3})
    history = train_autoencoder(ae, tiny_images(), steps=6, batch_size=4, device="cpu", progress=True,
                                nan_policy="skip")
    assert history["skipped_steps"] == [1, 3] and history["steps"] == [6]
    assert len(history["loss"]) == len(history["reconstruction"]) == 4  # one entry per step taken
    assert all(torch.isfinite(p).all() for p in ae.parameters())
    assert "skipped=2" in capsys.readouterr().err  # the progress bar shows the count


def test_skipped_steps_change_nothing():
    ldm = make_tiny_ldm()
    before = {name: value.clone() for name, value in ldm.state_dict().items()}
    images = tiny_images(9)
    images[:] = float("nan")  # every batch is bad: every step is skipped
    history = train_ldm(ldm, images, CAPTIONS * 3, steps=3, batch_size=4, device="cpu", progress=False,
                        nan_policy="skip")
    assert history["skipped_steps"] == [0, 1, 2] and history["loss"] == []
    for name, value in ldm.state_dict().items():  # EMA copied back in too: still the initial weights
        assert torch.equal(value, before[name]), name


def test_training_arguments_are_checked():
    ae, images = tiny_autoencoder(), tiny_images(4)
    cases = [
        (dict(nan_policy="ignore"), "nan_policy"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(grad_clip=0), "grad_clip"),
        (dict(checkpoint_every=0), "checkpoint_every"),
        (dict(kl_weight=float("inf")), "kl_weight"),
        (dict(discriminator_start=-1), "discriminator_start"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            train_autoencoder(ae, images, progress=False, **{"steps": 1, **kwargs})
    with pytest.raises(TypeError, match="images"):
        train_autoencoder(ae, images.numpy(), steps=1, progress=False)
    with pytest.raises(TypeError, match="images"):
        train_autoencoder(ae, images.long(), steps=1, progress=False)
    with pytest.raises(TypeError, match="captions"):
        train_ldm(make_tiny_ldm(), tiny_images(3), "one caption", steps=1, progress=False)
    with pytest.raises(ValueError, match="ema_decay"):
        train_ldm(make_tiny_ldm(), tiny_images(3), CAPTIONS, steps=1, ema_decay=1.0, progress=False)


def test_train_autoencoder_with_a_discriminator_resumes_bit_identically(tmp_path):
    """The discriminator's weights and its optimizer's moments are in the checkpoint too."""
    from minildm.discriminator import PatchDiscriminator

    def fresh():
        ae = tiny_autoencoder()
        return ae, PatchDiscriminator(width=8, num_layers=2)

    settings = dict(steps=5, batch_size=4, device="cpu", progress=False, discriminator_start=1)
    straight_ae, straight_d = fresh()
    train_autoencoder(straight_ae, tiny_images(), discriminator=straight_d, **settings)

    def crash(step):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        ae, d = fresh()
        train_autoencoder(ae, tiny_images(), discriminator=d, checkpoint_dir=tmp_path, checkpoint_every=3,
                          callback=crash, callback_every=3, **settings)
    resumed_ae, resumed_d = fresh()
    history = train_autoencoder(resumed_ae, tiny_images(), discriminator=resumed_d, checkpoint_dir=tmp_path,
                                resume=True, **settings)
    assert len(history["discriminator"]) == 4  # steps 1 to 4, across the interruption
    for straight, resumed in ((straight_ae, resumed_ae), (straight_d, resumed_d)):
        for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name
    # A checkpoint saved without a discriminator (or before its optimizer was saved) says so.
    meta = json.loads((tmp_path / "trainer.json").read_text())
    del meta["extra_param_groups"]
    (tmp_path / "trainer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has no state for the discriminator optimizer"):
        train_autoencoder(*fresh()[:1], tiny_images(), discriminator=fresh()[1], checkpoint_dir=tmp_path, resume=True,
                          **settings)
    (tmp_path / "discriminator.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="discriminator.safetensors"):
        train_autoencoder(*fresh()[:1], tiny_images(), discriminator=fresh()[1], checkpoint_dir=tmp_path, resume=True,
                          **settings)


def test_callback_time_does_not_count_against_the_budget():
    import time

    ldm = make_tiny_ldm()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    calls = []

    def slow_preview(step):  # e.g. drawing samples: 0.3 s each, 1.5 s in all, against a budget of 0.9 s
        calls.append(step)
        time.sleep(0.3)

    history = train_ldm(ldm, images, CAPTIONS[:2] * 2, steps=5, batch_size=2, max_minutes=0.9 / 60,
                        callback=slow_preview, callback_every=1, progress=False, device="cpu")
    assert history["steps"] == [5] and calls == [1, 2, 3, 4, 5]
    assert history["seconds"][0] < 1.5  # training time only, the sleeps excluded
