"""LatentDiffusion: the training objective (eq. 3), guidance, generation, attention maps, save/load."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CAPTIONS, make_tiny_ldm

from minildm.ldm import LatentDiffusion
from minildm.pixel_space import PixelSpace
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder
from minildm.unet import UNet2DConditionModel, UNetConfig


def test_generate_shapes_range_and_seed(tiny_ldm):
    images = tiny_ldm.generate(CAPTIONS, num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    assert images.shape == (3, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    again = tiny_ldm.generate(CAPTIONS, num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    other = tiny_ldm.generate(CAPTIONS, num_inference_steps=4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(images, again)
    assert not torch.allclose(images, other)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generate_is_reproducible_for_each_sampler(tiny_ldm, sampler):
    a = tiny_ldm.generate("a red circle", 3, sampler=tiny_ldm.make_sampler(sampler),
                          generator=torch.Generator().manual_seed(0))
    b = tiny_ldm.generate("a red circle", 3, sampler=tiny_ldm.make_sampler(sampler),
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_guidance_scale_one_is_the_conditional_prediction(tiny_ldm):
    z = torch.randn(2, 4, 4, 4)
    t = torch.tensor(500)
    cond = tiny_ldm.conditioner.encode(CAPTIONS[:2])
    uncond = tiny_ldm.conditioner.encode(["", ""])
    with torch.no_grad():
        conditional = tiny_ldm.backbone(z, t, cond)
        unconditional = tiny_ldm.backbone(z, t, uncond)
        assert torch.allclose(tiny_ldm.guided_model_output(z, t, cond, uncond, 1.0), conditional, atol=1e-6)
        # eq. (6) of Ho & Salimans in the ε form: ε_u + s (ε_c - ε_u), computed from two separate calls.
        expected = unconditional + 4.0 * (conditional - unconditional)
        assert torch.allclose(tiny_ldm.guided_model_output(z, t, cond, uncond, 4.0), expected, atol=1e-5)
        assert torch.allclose(tiny_ldm.guided_model_output(z, t, cond, uncond, 0.0), unconditional, atol=1e-5)


def test_return_intermediates(tiny_ldm):
    out = tiny_ldm.generate(CAPTIONS[:2], num_inference_steps=5, return_intermediates=True,
                            generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 16, 16)
    assert out.latents.shape == (6, 2, 4, 4, 4)  # z_T .. z_0
    assert out.pred_original_latents.shape == (5, 2, 4, 4, 4)
    assert out.timesteps == sorted(out.timesteps, reverse=True) and len(out.timesteps) == 5
    assert torch.allclose(tiny_ldm.decode_latents(out.latents[-1]), out.images)


def test_max_batch_size_splits_requests(tiny_ldm):
    calls = []
    original = tiny_ldm.backbone.forward
    tiny_ldm.backbone.forward = lambda sample, *a, **k: calls.append(sample.shape[0]) or original(sample, *a, **k)
    images = tiny_ldm.generate(["a red circle"] * 5, num_inference_steps=2, guidance_scale=1.0, max_batch_size=2)
    assert images.shape == (5, 3, 16, 16)
    assert max(calls) == 2 and sum(calls) == 5 * 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1001}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_generate_rejects_bad_arguments(tiny_ldm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_ldm.generate(["a red circle"], **kwargs)


def test_generate_rejects_bad_prompts(tiny_ldm):
    with pytest.raises(ValueError, match="prompts"):
        tiny_ldm.generate([])
    with pytest.raises(ValueError, match="prompts"):
        tiny_ldm.generate([3])


def test_latent_training_loss_is_equation_3():
    """Recompute the loss by hand with the same random draws, for each prediction type."""
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        ldm = make_tiny_ldm(prediction_type)
        z0 = torch.randn(3, 4, 4, 4)
        loss = ldm.latent_training_loss(z0, CAPTIONS, caption_dropout=0.5, generator=torch.Generator().manual_seed(7))

        g = torch.Generator().manual_seed(7)  # the same draws, in the same order
        dropped = (torch.rand(3, generator=g) < 0.5).tolist()
        t = torch.randint(0, 1000, (3,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = ldm.schedule.alphas_cumprod[t].float().view(3, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps  # q(z_t | z_0)
        target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * z0, "sample": z0}[prediction_type]
        captions = ["" if d else c for c, d in zip(CAPTIONS, dropped)]
        with torch.no_grad():
            expected = F.mse_loss(ldm.backbone(z_t, t, ldm.conditioner.encode(captions)), target)
        assert torch.allclose(loss, expected, atol=1e-5), prediction_type


def test_caption_dropout_one_trains_the_unconditional_model(tiny_ldm):
    z0 = torch.randn(3, 4, 4, 4)
    dropped = tiny_ldm.latent_training_loss(z0, CAPTIONS, 1.0, torch.Generator().manual_seed(0))
    empty = tiny_ldm.latent_training_loss(z0, ["", "", ""], 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(dropped, empty)


def test_training_loss_encodes_with_the_scaling_factor(tiny_ldm):
    tiny_ldm.first_stage.config.scaling_factor = 0.5
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    latents = tiny_ldm.encode_images(images, torch.Generator().manual_seed(0))
    posterior = tiny_ldm.first_stage.encode(images)
    assert torch.allclose(latents, posterior.sample(torch.Generator().manual_seed(0)) * 0.5)
    assert torch.isfinite(tiny_ldm.training_loss(images, CAPTIONS, generator=g))


def test_constructor_checks_the_pieces_fit():
    ldm = make_tiny_ldm()
    with pytest.raises(ValueError, match="prediction_type"):
        LatentDiffusion(ldm.first_stage, ldm.backbone, ldm.schedule, ldm.conditioner, "x0")
    with pytest.raises(ValueError, match="image_size must be a multiple of the first stage's factor f=4"):
        LatentDiffusion(ldm.first_stage, ldm.backbone, ldm.schedule, ldm.conditioner, image_size=10)
    LatentDiffusion(ldm.first_stage, ldm.backbone, ldm.schedule, ldm.conditioner, image_size=12)  # 3x3 latents: fine
    with pytest.raises(TypeError, match="first_stage must fill the FirstStage slot.*has no in_channels"):
        LatentDiffusion(torch.nn.Identity(), ldm.backbone, ldm.schedule, ldm.conditioner)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        LatentDiffusion(ldm.first_stage, ldm.backbone, "scaled_linear", ldm.conditioner)
    with pytest.raises(ValueError, match="cross_attention_dim=16 must equal the conditioner's hidden_size=32"):
        LatentDiffusion(ldm.first_stage, ldm.backbone, ldm.schedule,
                        TextEncoder.from_captions(CAPTIONS, hidden_size=32, num_layers=1))


def test_cross_attention_maps(tiny_ldm):
    image, maps, tokens = tiny_ldm.cross_attention_maps("a red circle", num_inference_steps=3,
                                                        generator=torch.Generator().manual_seed(0))
    assert tokens == ["<bos>", "a", "red", "circle", "<eos>"]
    assert image.shape == (3, 16, 16)
    assert maps.shape == (5, 4, 4)
    assert maps.min() >= 0
    # Softmax over all 16 key tokens: the prompt's 5 tokens hold at most all of the probability.
    assert (maps.sum(dim=0) <= 1 + 1e-5).all()
    for module in tiny_ldm.backbone.cross_attention_modules().values():
        assert module.attention_probs is None and not module.store_attention_probs


def test_save_load_round_trip(tiny_ldm, tmp_path):
    tiny_ldm.first_stage.config.scaling_factor = 0.7
    tiny_ldm.save(tmp_path / "model")
    loaded = LatentDiffusion.load(tmp_path / "model")
    assert loaded.first_stage.scaling_factor == 0.7
    assert loaded.conditioner.tokenizer.vocab == tiny_ldm.conditioner.tokenizer.vocab
    a = tiny_ldm.generate(CAPTIONS, 3, generator=torch.Generator().manual_seed(0))
    b = loaded.generate(CAPTIONS, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_load_reports_missing_files(tiny_ldm, tmp_path):
    tiny_ldm.save(tmp_path)
    (tmp_path / "backbone.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="backbone.safetensors"):
        LatentDiffusion.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        LatentDiffusion.load(tmp_path / "nowhere")


def test_load_reports_mismatched_shapes(tiny_ldm, tmp_path):
    tiny_ldm.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["backbone"]["config"]["block_out_channels"] = [32, 32]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expected shape"):
        LatentDiffusion.load(tmp_path)


def test_load_refuses_pickles(tiny_ldm, tmp_path):
    tiny_ldm.save(tmp_path)
    torch.save(tiny_ldm.backbone.state_dict(), tmp_path / "backbone.safetensors")  # a pickle under the expected name
    with pytest.raises(ValueError, match="pickle"):
        LatentDiffusion.load(tmp_path)


def make_pixel_ldm() -> LatentDiffusion:
    """No autoencoder: diffusion directly on 3x16x16 pixels (the paper's LDM-1)."""
    torch.manual_seed(0)
    text_encoder = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1, num_heads=2)
    unet = UNet2DConditionModel(UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 16),
                                           attention_levels=(False, True), cross_attention_dim=16,
                                           attention_head_dim=8, norm_num_groups=4))
    return LatentDiffusion(None, unet, NoiseSchedule(), text_encoder, image_size=16).eval()


def test_pixel_space_model_diffuses_the_images_themselves(tmp_path):
    ldm = make_pixel_ldm()
    assert ldm.latent_shape() == (3, 16, 16)
    assert isinstance(ldm.first_stage, PixelSpace)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(ldm.encode_images(images), images)  # z_0 = x
    assert torch.allclose(ldm.decode_latents(images), (images + 1) / 2)
    loss_from_images = ldm.training_loss(images, CAPTIONS[:2], generator=torch.Generator().manual_seed(1))
    loss_from_latents = ldm.latent_training_loss(images, CAPTIONS[:2], generator=torch.Generator().manual_seed(1))
    assert torch.equal(loss_from_images, loss_from_latents)
    out = ldm.generate(CAPTIONS[:2], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16)

    ldm.save(tmp_path / "pixel")
    loaded = LatentDiffusion.load(tmp_path / "pixel")
    assert isinstance(loaded.first_stage, PixelSpace) and loaded.first_stage.in_channels == 3
    again = loaded.generate(CAPTIONS[:2], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_pixel_space_model_needs_matching_channels():
    text_encoder = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1, num_heads=2)
    unet = UNet2DConditionModel(UNetConfig(in_channels=3, out_channels=4, block_out_channels=(16, 16),
                                           cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4))
    with pytest.raises(ValueError, match="take and return the first stage's 3 latent channels"):
        LatentDiffusion(None, unet, NoiseSchedule(), text_encoder, image_size=16)


def test_generate_samples_without_dropout_and_restores_training_mode():
    torch.manual_seed(0)
    ldm = make_tiny_ldm()
    ldm.backbone = UNet2DConditionModel(dataclasses.replace(ldm.backbone.config, dropout=0.5))  # dropout would show
    ldm.eval()

    def sample():
        return ldm.generate(CAPTIONS[:2], 4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))

    reference = sample()
    ldm.train()
    assert torch.equal(sample(), reference)  # sampled in eval mode
    assert ldm.training and ldm.backbone.training and ldm.conditioner.training  # and put back
    ldm.eval()
    ldm.backbone.train()  # only a part training (as a training loop leaves it): still no dropout
    assert torch.equal(sample(), reference)
    assert not ldm.backbone.training


def test_the_old_names_point_to_the_new_ones(tiny_ldm):
    for old, new in (("unet", "backbone"), ("autoencoder", "first_stage"), ("text_encoder", "conditioner")):
        with pytest.raises(AttributeError, match=f"LatentDiffusion.{old} is now .{new}"):
            getattr(tiny_ldm, old)
    with pytest.raises(AttributeError, match="nothing_like_it"):
        tiny_ldm.nothing_like_it  # noqa: B018
    with pytest.raises(TypeError, match=r"ldm.generate\(prompts\) makes images"):
        tiny_ldm("a red circle")
    with pytest.raises(ValueError, match="make_sampler builds the sampler for this model's schedule and prediction"):
        tiny_ldm.make_sampler("ddim", prediction_type="v_prediction")


def test_diffusers_schedulers_are_told_apart():
    diffusers = pytest.importorskip("diffusers")
    ldm = make_tiny_ldm()
    with pytest.raises(TypeError, match="diffusers' DDIMScheduler does not fill minildm's sampler slot"):
        ldm.generate(CAPTIONS[:1], 2, sampler=diffusers.DDIMScheduler())
