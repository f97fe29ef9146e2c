"""Training loops: EMA, learning-rate schedule, TrainingConfig, loss goes down, exact resume, guarded against NaN,
clipping as clip_grad_norm_ does it, half precision."""

import json

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.distributed import pick_device
from minildm.ema import EMAModel
from minildm.train import TrainingConfig, cosine_lr, train_autoencoder, train_ldm


def cfg(**changes) -> TrainingConfig:
    """The LDM's loop settings for a test: on the CPU, no progress bar."""
    return TrainingConfig(**{"device": "cpu", "progress": False, **changes})


def ae_cfg(**changes) -> TrainingConfig:
    return TrainingConfig.for_autoencoder(**{"device": "cpu", "progress": False, **changes})


def test_ema_matches_its_formula():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMAModel([p], decay=0.9)
    expected = torch.zeros(3)
    for n in range(1, 30):
        with torch.no_grad():
            p.add_(1.0)
        ema.step([p])
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * p.detach()
    assert torch.allclose(ema.shadow_params[0], expected)
    ema.copy_to([p])
    assert torch.allclose(p.detach(), expected)
    with pytest.raises(ValueError, match="decay"):
        EMAModel([p], decay=1.0)


def test_ema_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(4))
    ema = EMAModel([p], decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            p.mul_(0.5)
        ema.step([p])
    state = ema.state_dict()
    assert state["optimization_step"] == 3 and state["decay"] == 0.99
    other = EMAModel([torch.nn.Parameter(torch.zeros(4))], decay=0.5)
    other.load_state_dict(state)
    assert other.optimization_step == 3 and other.decay == 0.99
    assert torch.equal(other.shadow_params[0], ema.shadow_params[0])
    state["shadow_params"][0].add_(1.0)  # a copy: changing it does not change the EMA
    assert not torch.equal(other.shadow_params[0], state["shadow_params"][0])
    with pytest.raises(ValueError, match="other shapes"):
        other.load_state_dict({**state, "shadow_params": [torch.zeros(5)]})


def test_training_config_checks_its_fields():
    assert TrainingConfig().batch_size == 64 and TrainingConfig().ema_decay == 0.999
    assert TrainingConfig.for_autoencoder(lr=2e-3) == TrainingConfig(steps=2000, batch_size=32, ema_decay=0.0, lr=2e-3)
    for changes, name in [({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"batch_size": 0}, "batch_size"),
                          ({"lr": float("nan")}, "lr"), ({"lr": -1.0}, "lr"), ({"grad_clip": 0}, "grad_clip"),
                          ({"checkpoint_every": 0}, "checkpoint_every"), ({"callback_every": -1}, "callback_every"),
                          ({"ema_decay": 1.0}, "ema_decay"), ({"max_minutes": 0}, "max_minutes"),
                          ({"nan_policy": "ignore"}, "nan_policy"), ({"seed": "0"}, "seed")]:
        with pytest.raises(ValueError, match=name):
            TrainingConfig(**changes)


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
    history = train_autoencoder(ae, images, ae_cfg(steps=60, batch_size=8, lr=3e-3))
    assert len(history["loss"]) == 60 and history["steps"] == [60]
    assert sum(history["reconstruction"][-10:]) < 0.6 * sum(history["reconstruction"][:10])
    with torch.no_grad():
        z = ae.encode(images).sample(torch.Generator().manual_seed(0))
    assert ae.scaling_factor == pytest.approx(1 / z.std().item(), rel=0.1)
    with pytest.raises(ValueError, match="images"):
        train_autoencoder(ae, torch.zeros(4, 1, 16, 16), ae_cfg(steps=1))


def fixed_batch_loss(ldm, latents):
    with torch.no_grad():
        return ldm.latent_training_loss(latents, CAPTIONS * 3, 0.0, torch.Generator().manual_seed(123)).item()


def test_train_ldm_lowers_the_loss():
    ldm = make_tiny_ldm()
    images = tiny_images(9)
    captions = CAPTIONS * 3
    latents = ldm.encode_images(images, torch.Generator().manual_seed(0))
    before = fixed_batch_loss(ldm, latents)
    history = train_ldm(ldm, images, captions, cfg(steps=80, batch_size=9, lr=3e-3, ema_decay=0.0))
    assert history["steps"] == [80]
    assert fixed_batch_loss(ldm, latents) < 0.8 * before
    assert not ldm.first_stage.encoder.conv_in.weight.requires_grad  # the first stage stays frozen


def test_max_minutes_stops_early():
    ldm = make_tiny_ldm()
    history = train_ldm(ldm, tiny_images(9), CAPTIONS * 3, cfg(steps=10**6, batch_size=4, max_minutes=0.02))
    assert 0 < history["steps"][0] < 10**6


def test_resume_is_bit_identical(tmp_path):
    images, captions = tiny_images(9), CAPTIONS * 3
    straight = make_tiny_ldm()
    train_ldm(straight, images, captions, cfg(steps=6, batch_size=4))

    class Crash(Exception):
        pass

    def crash(step):
        raise Crash(step)

    interrupted = make_tiny_ldm()
    with pytest.raises(Crash):  # dies right after the step-3 checkpoint
        train_ldm(interrupted, images, captions, cfg(steps=6, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=3,
                                                     callback_every=3), callback=crash)
    resumed = make_tiny_ldm()  # a fresh process would start from new weights too
    history = train_ldm(resumed, images, captions, cfg(steps=6, batch_size=4, checkpoint_dir=tmp_path, resume=True))
    assert len(history["loss"]) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_with_the_step():
    ldm = make_tiny_ldm()
    images = tiny_images(9)
    images[:] = float("nan")
    with pytest.raises(FloatingPointError, match="step 0"):
        train_ldm(ldm, images, CAPTIONS * 3, cfg(steps=3, batch_size=4))


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
    history = train_autoencoder(ae, tiny_images(), ae_cfg(steps=6, batch_size=4), discriminator=discriminator,
                                discriminator_start=2)
    assert len(history["discriminator"]) == 4 and len(history["adversarial"]) == 4  # from step 2 on
    assert any(not torch.equal(a, b) for a, b in zip(before, discriminator.parameters()))


def test_train_autoencoder_resume_is_bit_identical(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4))

    straight = fresh()
    train_autoencoder(straight, tiny_images(), ae_cfg(steps=4, batch_size=4))

    def crash(step):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train_autoencoder(fresh(), tiny_images(), ae_cfg(steps=4, batch_size=4, checkpoint_dir=tmp_path,
                                                         checkpoint_every=2, callback_every=2), callback=crash)
    resumed = fresh()
    train_autoencoder(resumed, tiny_images(), ae_cfg(steps=4, batch_size=4, checkpoint_dir=tmp_path, resume=True))
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
        train_autoencoder(ae, tiny_images(), ae_cfg(steps=5, batch_size=4, checkpoint_dir=tmp_path / "ckpt",
                                                    checkpoint_every=1))
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
        train_autoencoder(tiny_autoencoder(), images, ae_cfg(steps=2, batch_size=4, checkpoint_dir=tmp_path))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 0\. Lower the learning rate"):
        train_autoencoder(tiny_autoencoder(), images, ae_cfg(steps=2, batch_size=4))


def test_skip_policy_leaves_bad_steps_out_and_counts_them(capsys):
    ae = tiny_autoencoder()
    poison_gradient(ae.encoder.conv_in.bias, at_calls={1, 3})
    with pytest.warns(UserWarning, match="2 of 6 steps were skipped"):
        history = train_autoencoder(ae, tiny_images(), ae_cfg(steps=6, batch_size=4, progress=True, nan_policy="skip"))
    assert history["skipped_steps"] == [1, 3] and history["steps"] == [6]
    assert len(history["loss"]) == len(history["reconstruction"]) == 4  # one entry per step taken
    assert all(torch.isfinite(p).all() for p in ae.parameters())
    assert "skipped=2" in capsys.readouterr().err  # the progress bar shows the count


def test_skipped_steps_change_nothing():
    ldm = make_tiny_ldm()
    before = {name: value.clone() for name, value in ldm.state_dict().items()}
    images = tiny_images(9)
    images[:] = float("nan")  # every batch is bad: every step is skipped
    with pytest.warns(UserWarning, match="3 of 3 steps were skipped"):
        history = train_ldm(ldm, images, CAPTIONS * 3, cfg(steps=3, batch_size=4, nan_policy="skip"))
    assert history["skipped_steps"] == [0, 1, 2] and history["loss"] == []
    for name, value in ldm.state_dict().items():  # EMA copied back in too: still the initial weights
        assert torch.equal(value, before[name]), name


def test_training_arguments_are_checked():
    ae, images = tiny_autoencoder(), tiny_images(4)
    for kwargs, name in [(dict(kl_weight=float("inf")), "kl_weight"), (dict(discriminator_start=-1),
                                                                        "discriminator_start"),
                         (dict(discriminator_weight=-1.0), "discriminator_weight")]:
        with pytest.raises(ValueError, match=name):
            train_autoencoder(ae, images, ae_cfg(steps=1), **kwargs)
    with pytest.raises(TypeError, match="images"):
        train_autoencoder(ae, images.numpy(), ae_cfg(steps=1))
    with pytest.raises(TypeError, match="images"):
        train_autoencoder(ae, images.long(), ae_cfg(steps=1))
    with pytest.raises(TypeError, match="config must be a TrainingConfig"):
        train_autoencoder(ae, images, {"steps": 1})
    with pytest.raises(TypeError, match="positional"):  # the loss settings are keyword-only
        train_autoencoder(ae, images, ae_cfg(steps=1), 1e-6)
    with pytest.raises(TypeError, match="captions"):
        train_ldm(make_tiny_ldm(), tiny_images(3), "one caption", cfg(steps=1))
    with pytest.raises(ValueError, match="caption_dropout"):
        train_ldm(make_tiny_ldm(), tiny_images(3), CAPTIONS, cfg(steps=1), caption_dropout=1.5)


def test_train_autoencoder_with_a_discriminator_resumes_bit_identically(tmp_path):
    """The discriminator's weights and its optimizer's moments are in the checkpoint too."""
    from minildm.discriminator import PatchDiscriminator

    def fresh():
        ae = tiny_autoencoder()
        return ae, PatchDiscriminator(width=8, num_layers=2)

    settings = dict(steps=5, batch_size=4)
    straight_ae, straight_d = fresh()
    train_autoencoder(straight_ae, tiny_images(), ae_cfg(**settings), discriminator=straight_d, discriminator_start=1)

    def crash(step):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        ae, d = fresh()
        train_autoencoder(ae, tiny_images(), ae_cfg(**settings, checkpoint_dir=tmp_path, checkpoint_every=3,
                                                    callback_every=3), discriminator=d, discriminator_start=1,
                          callback=crash)
    resumed_ae, resumed_d = fresh()
    resume = ae_cfg(**settings, checkpoint_dir=tmp_path, resume=True)
    history = train_autoencoder(resumed_ae, tiny_images(), resume, discriminator=resumed_d, discriminator_start=1)
    assert len(history["discriminator"]) == 4  # steps 1 to 4, across the interruption
    for straight, resumed in ((straight_ae, resumed_ae), (straight_d, resumed_d)):
        for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name
    # A checkpoint saved without a discriminator (or before its optimizer was saved) says so.
    meta = json.loads((tmp_path / "trainer.json").read_text())
    del meta["extra_param_groups"]
    (tmp_path / "trainer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has no state for the discriminator optimizer"):
        train_autoencoder(*fresh()[:1], tiny_images(), resume, discriminator=fresh()[1], discriminator_start=1)
    (tmp_path / "discriminator.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="discriminator.safetensors"):
        train_autoencoder(*fresh()[:1], tiny_images(), resume, discriminator=fresh()[1], discriminator_start=1)


def test_callback_time_does_not_count_against_the_budget():
    import time

    ldm = make_tiny_ldm()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    calls = []

    def slow_preview(step):  # e.g. drawing samples: 0.3 s each, 1.5 s in all, against a budget of 0.9 s
        calls.append(step)
        time.sleep(0.3)

    config = cfg(steps=5, batch_size=2, max_minutes=0.9 / 60, callback_every=1)
    history = train_ldm(ldm, images, CAPTIONS[:2] * 2, config, callback=slow_preview)
    assert history["steps"] == [5] and calls == [1, 2, 3, 4, 5]
    assert history["seconds"][0] < 1.5  # training time only, the sleeps excluded


def test_train_ldm_is_the_loop_written_out():
    # Three steps of train_ldm against the same steps by hand: the batch's draws in their order (examples, the
    # posterior's ε, caption dropout, t, the noise), eq. (3), AdamW at the warm-up's learning rate, clipping by
    # torch's own clip_grad_norm_ (set low so it acts), and the EMA copied in at the end.
    images, captions = tiny_images(8), [CAPTIONS[i % 3] for i in range(8)]
    config = cfg(steps=3, batch_size=4, lr=1e-2, grad_clip=0.05, ema_decay=0.9)
    trained = make_tiny_ldm()
    train_ldm(trained, images, captions, config, caption_dropout=0.3)

    by_hand = make_tiny_ldm().train()
    with torch.no_grad():
        posterior = by_hand.first_stage.encode(images)
    parameters = [*by_hand.backbone.parameters(), *by_hand.conditioner.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.0)
    shadow = [p.detach().clone() for p in parameters]
    alphas_cumprod = by_hand.schedule.alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    norms = []
    for step in range(3):
        optimizer.param_groups[0]["lr"] = cosine_lr(1e-2, step / 3)  # 0 at step 0: the warm-up starts at 0
        idx = torch.randint(0, 8, (4,), generator=generator)
        z0 = posterior.mean[idx] + posterior.std[idx] * torch.randn(4, 4, 4, 4, generator=generator)
        z0 = z0 * by_hand.first_stage.scaling_factor
        dropped = torch.rand(4, generator=generator) < 0.3
        t = torch.randint(0, 1000, (4,), generator=generator)
        eps = torch.randn(4, 4, 4, 4, generator=generator)
        a = alphas_cumprod[t].float().view(4, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), dropped.tolist())]
        loss = ((by_hand.backbone(z_t, t, by_hand.conditioner.encode(prompts)) - eps) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(parameters, 0.05).item())
        optimizer.step()
        d = min(0.9, (2 + step) / (11 + step))  # (1 + n) / (10 + n) at the n-th update
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, parameters)]
    assert min(norms) > 0.05  # clipping acted at every step
    with torch.no_grad():
        for s, p in zip(shadow, parameters):
            p.copy_(s)
    for (name, a), b in zip(trained.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_config_mistakes_are_caught_before_training():
    for changes, match in [({"resume": True}, "need a checkpoint_dir"),
                           ({"checkpoint_every": 5}, "need a checkpoint_dir"),
                           ({"resume": "yes", "checkpoint_dir": "x"}, "resume must be True or False"),
                           ({"progress": "no"}, "progress must be True or False"),
                           ({"device": "gpu"}, "device must be a torch device")]:
        with pytest.raises(ValueError, match=match):
            TrainingConfig(**changes)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
    ldm, images = make_tiny_ldm(), tiny_images(4)
    with pytest.raises(TypeError, match=r"takes the loop's settings in a TrainingConfig: "
                                        r"train_ldm\(\.\.\., TrainingConfig\(steps=5, lr=0\.01\)\)"):
        train_ldm(ldm, images, CAPTIONS[:2] * 2, steps=5, lr=0.01)  # minildm 0.1's keywords
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        train_autoencoder(tiny_autoencoder(), images, stepz=5)


def test_a_model_folder_is_not_taken_for_a_checkpoint(tmp_path):
    ldm = make_tiny_ldm()
    ldm.save(tmp_path / "model")
    before = (tmp_path / "model" / "backbone.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds a saved model \\(config.json\\).*a folder of its own"):
        train_ldm(ldm, tiny_images(4), CAPTIONS[:2] * 2, cfg(steps=2, batch_size=2, checkpoint_dir=tmp_path / "model",
                                                            resume=True))
    assert (tmp_path / "model" / "backbone.safetensors").read_bytes() == before


def test_resuming_with_another_dtype_or_ema_says_so_and_changes_nothing(tmp_path, capsys):
    images, captions = tiny_images(4), CAPTIONS[:2] * 2
    train_ldm(make_tiny_ldm().to(torch.bfloat16), images, captions, cfg(steps=2, batch_size=2,
                                                                        checkpoint_dir=tmp_path / "ckpt"))
    ldm = make_tiny_ldm()
    before = {k: v.clone() for k, v in ldm.state_dict().items()}
    with pytest.raises(ValueError, match="saved by a run whose backbone was torch.bfloat16, but this backbone is "
                                         "torch.float32: cast the model with .to\\(torch.bfloat16\\)"):
        train_ldm(ldm, images, captions, cfg(steps=4, batch_size=2, checkpoint_dir=tmp_path / "ckpt", resume=True))
    assert all(torch.equal(v, before[k]) for k, v in ldm.state_dict().items())  # nothing loaded, nothing cast
    with pytest.raises(ValueError, match="saved by a run with an EMA.*resume with the ema_decay it was saved with"):
        train_ldm(make_tiny_ldm().to(torch.bfloat16), images, captions,
                  cfg(steps=4, batch_size=2, checkpoint_dir=tmp_path / "ckpt", resume=True, ema_decay=0.0))
    train_ldm(make_tiny_ldm(), images, captions, cfg(steps=1, batch_size=2, checkpoint_dir=tmp_path / "new",
                                                     resume=True, progress=True))
    assert "no checkpoint in" in capsys.readouterr().out  # a new run, said so


def test_a_run_that_skipped_every_step_warns():
    images = tiny_images(4)
    images[:] = float("nan")
    with pytest.warns(UserWarning, match="3 of 3 steps were skipped"):
        train_ldm(make_tiny_ldm(), images, CAPTIONS[:2] * 2, cfg(steps=3, batch_size=2, nan_policy="skip"))


def test_training_the_first_stage_of_a_model_leaves_it_frozen():
    ldm = make_tiny_ldm()
    train_autoencoder(ldm.first_stage, tiny_images(4), ae_cfg(steps=1, batch_size=2))
    assert not any(p.requires_grad for p in ldm.first_stage.parameters())
