"""The four slots (interfaces.py): minildm's own classes fill them, and test doubles written without minildm's
code (doubles.py) run through LatentDiffusion: a training step, train_ldm, generate, attention maps' errors."""

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm
from doubles import CountConditioner, HalvingFirstStage, HeunLikeSampler, TrueNoiseBackbone

from minildm.autoencoder import AutoencoderKL
from minildm.interfaces import Backbone, Conditioner, FirstStage, LatentDistribution, Sampler, check_slot
from minildm.ldm import LatentDiffusion
from minildm.pixel_space import PixelSpace
from minildm.schedule import NoiseSchedule
from minildm.train import TrainingConfig, train_ldm


def test_minildms_classes_fill_their_slots():
    ldm = make_tiny_ldm()
    assert isinstance(ldm.first_stage, FirstStage) and isinstance(PixelSpace(1), FirstStage)
    assert isinstance(ldm.backbone, Backbone)
    assert isinstance(ldm.conditioner, Conditioner)
    assert isinstance(ldm.make_sampler("ddim"), Sampler) and isinstance(ldm.make_sampler("ddpm"), Sampler)
    assert isinstance(ldm.first_stage.encode(torch.zeros(1, 3, 16, 16)), LatentDistribution)
    assert isinstance(PixelSpace(3).encode(torch.zeros(1, 3, 8, 8)), LatentDistribution)


def test_the_doubles_fill_their_slots():
    schedule = NoiseSchedule()
    assert isinstance(HalvingFirstStage(), FirstStage)
    assert isinstance(TrueNoiseBackbone(torch.zeros(1, 3, 4, 4), schedule.alphas_cumprod), Backbone)
    assert isinstance(CountConditioner(), Conditioner)
    assert isinstance(HeunLikeSampler(schedule), Sampler)


def test_check_slot_names_what_is_missing():
    class HalfDone:
        in_channels = 3

        def encode(self, images):
            return images

    with pytest.raises(TypeError, match="first_stage must fill the FirstStage slot .*HalfDone has no latent_channels, "
                                        "downsampling_factor, scaling_factor, decode, config_dict"):
        check_slot(HalfDone(), FirstStage, "first_stage")


def double_model(x0=None) -> LatentDiffusion:
    """Every model slot filled by a double: f = 2 first stage, a perfect-noise backbone on 3x4x4 latents."""
    schedule = NoiseSchedule()
    x0 = x0 if x0 is not None else torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    return LatentDiffusion(HalvingFirstStage(), TrueNoiseBackbone(x0, schedule.alphas_cumprod), schedule,
                           CountConditioner(), image_size=8)


def test_doubles_run_through_the_training_loss_and_train_ldm():
    ldm = double_model()
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    latents = ldm.encode_images(images)
    torch.testing.assert_close(latents, torch.nn.functional.avg_pool2d(images, 2) * 0.5)  # s · E(x)
    loss = ldm.training_loss(images, ["a b", "c", "d e f", ""], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert ldm.backbone.weight.grad is not None and ldm.conditioner.direction.grad is None  # the double ignores text
    with pytest.warns(UserWarning, match="words of the training captions \\(past the limit of 2 words: 'f'\\)"):
        history = train_ldm(ldm, images, ["a b", "c", "d e f", ""], TrainingConfig(steps=2, batch_size=2,
                                                                                   device="cpu", progress=False))
    assert history["steps"] == [2]


def test_doubles_generate_through_the_interface_only():
    x0 = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) - 0.5  # latents of the clean image
    ldm = double_model(x0)
    images = ldm.generate(["a b", "c"], 10, sampler=HeunLikeSampler(ldm.schedule), guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(2))
    expected = ((torch.nn.functional.interpolate(x0 / 0.5, scale_factor=2.0) + 1) / 2).clamp(0, 1)  # D(z_0 / s)
    torch.testing.assert_close(images, expected.expand(2, -1, -1, -1), rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="past the limit of 2 words: 'c', 'd'"):
        ldm.generate(["a b c d"], 2)
    with pytest.raises(ValueError, match="no cross-attention layers"):
        ldm.cross_attention_maps("a b", num_inference_steps=2)


def test_slots_that_do_not_fit_together_are_refused():
    schedule = NoiseSchedule()
    backbone = TrueNoiseBackbone(torch.zeros(1, 4, 4, 4), schedule.alphas_cumprod)  # 4 channels
    with pytest.raises(ValueError, match="first stage's 3 latent channels, got in_channels=4"):
        LatentDiffusion(HalvingFirstStage(3), backbone, schedule, CountConditioner(), image_size=8)
    with pytest.raises(ValueError, match="cross_attention_dim=8 must equal the conditioner's hidden_size=5"):
        LatentDiffusion(HalvingFirstStage(4), backbone, schedule, CountConditioner(5), image_size=8)
    with pytest.raises(ValueError, match="image_size must be a multiple of the first stage's factor f=2"):
        LatentDiffusion(HalvingFirstStage(4), backbone, schedule, CountConditioner(), image_size=7)
    with pytest.raises(TypeError, match="conditioner must fill the Conditioner slot"):
        LatentDiffusion(HalvingFirstStage(4), backbone, schedule, make_tiny_ldm().backbone, image_size=8)


def test_the_pixel_space_first_stage_is_the_identity():
    stage = PixelSpace(2)
    x = torch.randn(3, 2, 5, 7)
    posterior = stage.encode(x)
    assert posterior.sample(torch.Generator()) is x and posterior.mode() is x and torch.equal(posterior.std, 0 * x)
    assert stage.decode(x) is x and stage.downsampling_factor == 1 and stage.scaling_factor == 1.0
    assert PixelSpace.from_config_dict(stage.config_dict()).in_channels == 2
    with pytest.raises(ValueError, match="channels"):
        PixelSpace(0)


def test_config_dicts_rebuild_each_slot():
    ldm = make_tiny_ldm()
    for module in (ldm.first_stage, ldm.backbone, ldm.conditioner):
        rebuilt = type(module).from_config_dict(module.config_dict())
        assert rebuilt.config_dict() == module.config_dict()
        shapes = {k: v.shape for k, v in module.state_dict().items()}
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert isinstance(ldm.first_stage, AutoencoderKL)
    assert ldm.conditioner.tokens(CAPTIONS[2])[:3] == ["<bos>", "top", "left"]
