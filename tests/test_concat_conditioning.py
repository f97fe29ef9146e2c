"""Conditioning by concatenation (concat_conditioning.py and LatentDiffusion(concat_conditioning=...)): the inpainting
input's layout against a computation by hand (mask first, nearest downsampling, masked-image latents), masks
respected, the super-resolution input, the backbone's input in training and sampling (both halves of guidance keep
the image condition), a training / generate / save / load round trip, seeded reproducibility, and the errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minildm import (
    AutoencoderConfig,
    AutoencoderKL,
    LatentDiffusion,
    NoiseSchedule,
    TextEncoder,
    TrainingConfig,
    UNet2DConditionModel,
    UNetConfig,
    train_ldm,
)
from minildm.concat_conditioning import InpaintingCondition, LowResCondition, random_masks

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def _autoencoder(channels=3, latent_channels=4, levels=3, seed=0):
    torch.manual_seed(seed)
    autoencoder = AutoencoderKL(AutoencoderConfig(channels, latent_channels, (8,) * levels, norm_num_groups=4,
                                                  scaling_factor=0.7))
    return autoencoder.eval()


def _unet(in_channels, out_channels=4, dim=16):
    torch.manual_seed(1)
    return UNet2DConditionModel(UNetConfig(in_channels=in_channels, out_channels=out_channels,
                                           block_out_channels=(16, 16), attention_levels=(False, True),
                                           cross_attention_dim=dim, attention_head_dim=8, norm_num_groups=8))


def _model(condition, autoencoder=None, backbone=None):
    autoencoder = autoencoder if autoencoder is not None else _autoencoder()
    text = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1)
    extra = condition.extra_channels(autoencoder) if condition is not None else 0
    backbone = backbone if backbone is not None else _unet(4 + extra)
    return LatentDiffusion(autoencoder, backbone, NoiseSchedule(), text, image_size=16, concat_conditioning=condition)


def _images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # in [0, 1]


def _square_mask(n=1, size=16, top=4, left=5, side=7):
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, top:top + side, left:left + side] = 1
    return mask


class RecordingBackbone(nn.Module):
    """Returns zeros of c channels and records every input (sample, encoder_hidden_states) it was called with."""

    def __init__(self, in_channels, out_channels=4, cross_attention_dim=16):
        super().__init__()
        self.in_channels, self.out_channels, self.cross_attention_dim = in_channels, out_channels, cross_attention_dim
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.calls.append((sample.detach().clone(), encoder_hidden_states.detach().clone()))
        return sample[:, : self.out_channels] * 0 + self.weight

    def cross_attention_modules(self):
        return {}

    def config_dict(self):
        return {}


# ---- the inpainting input --------------------------------------------------------------------------------------


def test_the_inpainting_input_is_the_mask_then_the_masked_images_latents():
    autoencoder = _autoencoder()
    image, mask = _images(2), torch.cat([_square_mask(), _square_mask(top=0, left=0, side=9)])
    got = InpaintingCondition().model_input(autoencoder, (4, 4), image=image, mask_image=mask)
    # by hand: diffusers' order [mask, masked_image_latents]; nearest downsampling keeps every f-th pixel
    small_mask = mask[:, :, ::4, ::4]  # (2, 1, 4, 4)
    masked = (image * 2 - 1) * (mask < 0.5)  # diffusers: init_image * (mask_condition < 0.5), in [-1, 1]
    with torch.no_grad():
        latents = autoencoder.encode(masked).mode() * autoencoder.config.scaling_factor
    assert got.shape == (2, 5, 4, 4)
    assert torch.equal(got[:, :1], small_mask)
    torch.testing.assert_close(got[:, 1:], latents)
    assert InpaintingCondition().extra_channels(autoencoder) == 5


def test_the_masked_region_does_not_reach_the_condition_and_the_known_region_does():
    autoencoder = _autoencoder()
    image, mask = _images(1), _square_mask()
    inside_changed = torch.where(mask.bool(), torch.rand(1, 3, 16, 16), image)
    outside_changed = torch.where(mask.bool(), image, 1 - image)
    condition = InpaintingCondition()
    base = condition.model_input(autoencoder, (4, 4), image=image, mask_image=mask)
    assert torch.equal(condition.model_input(autoencoder, (4, 4), image=inside_changed, mask_image=mask), base)
    assert not torch.allclose(condition.model_input(autoencoder, (4, 4), image=outside_changed, mask_image=mask), base)


def test_random_masks_are_seeded_binary_and_of_both_kinds():
    masks = random_masks(64, 32, 32, 0.5, torch.Generator().manual_seed(0))
    again = random_masks(64, 32, 32, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 1, 32, 32) and torch.equal(masks, again)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    covered = masks.mean(dim=(1, 2, 3))
    assert (covered > 0).all() and (covered < 1).all()
    rectangles = random_masks(16, 32, 32, 1.0, torch.Generator().manual_seed(1))
    for m in rectangles[:, 0]:
        rows, cols = m.any(dim=1).nonzero(), m.any(dim=0).nonzero()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert m.sum() == height * width  # a filled rectangle ...
        assert 0.25 * 32 - 1 <= height <= 0.75 * 32 + 1 and 0.25 * 32 - 1 <= width <= 0.75 * 32 + 1  # ... of its sides
    strokes = random_masks(16, 32, 32, 0.0, torch.Generator().manual_seed(1))
    assert not torch.equal(strokes, rectangles)
    filled = [m.sum() == (m.any(dim=1).sum() * m.any(dim=0).sum()) for m in strokes[:, 0]]
    assert not all(filled)  # strokes are not rectangles


# ---- the super-resolution input --------------------------------------------------------------------------------


def test_low_res_input_at_latent_size_as_it_is_and_larger_ones_space_to_depth():
    autoencoder = _autoencoder()  # f = 4
    low = _images(2, size=4)
    same = LowResCondition(4).model_input(autoencoder, (4, 4), image=low)
    assert torch.equal(same, low * 2 - 1) and LowResCondition(4).extra_channels(autoencoder) == 3
    larger = _images(2, size=8)
    got = LowResCondition(2).model_input(autoencoder, (4, 4), image=larger)
    assert got.shape == (2, 12, 4, 4) and LowResCondition(2).extra_channels(autoencoder) == 12
    x = larger * 2 - 1  # by hand: channel c·4 + 2i + j of latent pixel (y, x) is low-res pixel (2y + i, 2x + j)
    assert torch.equal(got[:, 1 * 4 + 2 * 1 + 0], x[:, 1, 1::2, 0::2])
    smaller = _images(2, size=2)
    got = LowResCondition(8).model_input(autoencoder, (4, 4), image=smaller)
    torch.testing.assert_close(got, F.interpolate(smaller * 2 - 1, size=(4, 4), mode="bicubic"))


def test_low_res_training_input_is_the_box_filtered_batch():
    images = _images(2) * 2 - 1
    got = LowResCondition(4).draw_training_input(images)["image"]
    by_hand = images.reshape(2, 3, 4, 4, 4, 4).mean(dim=(3, 5))  # (B, C, 4, 4, 4, 4): 4x4 blocks averaged
    torch.testing.assert_close(got, (by_hand + 1) / 2)
    assert LowResCondition(4).output_size(got) == (16, 16)


# ---- the model: channels, training, sampling, files ------------------------------------------------------------


def test_the_backbone_must_take_the_extra_channels_and_return_c():
    with pytest.raises(ValueError, match=r"4 latent channels \+ 5 of its InpaintingCondition = 9"):
        _model(InpaintingCondition(), backbone=_unet(4))
    with pytest.raises(ValueError, match="and return 4"):
        _model(InpaintingCondition(), backbone=_unet(9, out_channels=9))
    with pytest.raises(TypeError, match="concat_conditioning must be"):
        _model(None, backbone=_unet(4)).__class__(_autoencoder(), _unet(4), NoiseSchedule(),
                                                  TextEncoder.from_captions(CAPTIONS, hidden_size=16),
                                                  concat_conditioning="inpainting")


def test_training_puts_the_condition_beside_z_t_and_dropout_keeps_it():
    autoencoder = _autoencoder()
    backbone = RecordingBackbone(9)
    ldm = _model(InpaintingCondition(), autoencoder, backbone)
    images = _images(3) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    ldm.training_loss(images, CAPTIONS, caption_dropout=1.0, generator=generator)  # every caption dropped
    (sample, states), = backbone.calls
    assert sample.shape == (3, 9, 4, 4)
    # the same draws by hand: the encoder's sample, then t, ε and the dropout, then the masks
    generator = torch.Generator().manual_seed(0)
    ldm.encode_images(images, generator)
    ldm.draw_training_noise((3, 4, 4, 4), 1.0, generator)
    masks = random_masks(3, 16, 16, 0.5, generator)
    expected = InpaintingCondition().model_input(autoencoder, (4, 4), image=(images + 1) / 2, mask_image=masks)
    torch.testing.assert_close(sample[:, 4:], expected)
    torch.testing.assert_close(states, ldm.conditioner.encode([""] * 3))  # the caption is dropped, the image is not


def test_guidance_keeps_the_image_condition_in_both_halves():
    backbone = RecordingBackbone(9)
    ldm = _model(InpaintingCondition(), backbone=backbone)
    image, mask = _images(2), _square_mask(2)
    ldm.generate(["a red circle", "a blue square"], 3, image=image, mask_image=mask, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0))
    condition = InpaintingCondition().model_input(ldm.first_stage, (4, 4), image=image, mask_image=mask)
    assert len(backbone.calls) == 3
    for sample, states in backbone.calls:
        assert sample.shape == (4, 9, 4, 4)  # (2B, c + 1 + c, h, w)
        torch.testing.assert_close(sample[:2, 4:], condition)  # the unconditional half ...
        torch.testing.assert_close(sample[2:, 4:], condition)  # ... and the conditional half
        torch.testing.assert_close(states[:2], ldm.conditioner.encode(["", ""]))  # only the prompt is dropped
        torch.testing.assert_close(states[2:], ldm.conditioner.encode(["a red circle", "a blue square"]))


def test_train_generate_save_load_round_trip_and_seeds(tmp_path):
    for condition, image, mask in ((InpaintingCondition(), _images(1), _square_mask()),
                                   (LowResCondition(4), _images(1, size=4), None)):
        ldm = _model(condition)
        images = _images(6) * 2 - 1
        history = train_ldm(ldm, images, CAPTIONS * 2, TrainingConfig(steps=3, batch_size=4, progress=False))
        again = _model(condition)
        assert train_ldm(again, images, CAPTIONS * 2, TrainingConfig(steps=3, batch_size=4,
                                                                     progress=False))["loss"] == history["loss"]
        kwargs = {"image": image, "mask_image": mask, "generator": torch.Generator().manual_seed(3)}
        out = ldm.generate(["a red circle", "a blue square"], 4, **kwargs)
        assert out.shape == (2, 3, 16, 16)
        kwargs["generator"] = torch.Generator().manual_seed(3)
        assert torch.equal(ldm.generate(["a red circle", "a blue square"], 4, **kwargs), out)
        ldm.save(tmp_path / condition.kind)
        config = json.loads((tmp_path / condition.kind / "config.json").read_text())
        assert config["concat_conditioning"] == {"class": type(condition).__name__, "config": condition.config_dict()}
        loaded = LatentDiffusion.load(tmp_path / condition.kind)
        assert type(loaded.concat_conditioning) is type(condition)
        kwargs["generator"] = torch.Generator().manual_seed(3)
        assert torch.equal(loaded.generate(["a red circle", "a blue square"], 4, **kwargs), out)


def test_a_plain_model_writes_no_concat_key_and_old_folders_load(tmp_path):
    ldm = _model(None)
    ldm.save(tmp_path / "plain")
    assert "concat_conditioning" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert LatentDiffusion.load(tmp_path / "plain").concat_conditioning is None
    from pathlib import Path
    assert LatentDiffusion.load(Path(__file__).parent / "fixtures" / "ldm_v1").concat_conditioning is None


def test_generate_takes_its_size_from_the_image():
    ldm = _model(LowResCondition(2), backbone=RecordingBackbone(4 + 12))
    assert ldm.generate("a red circle", 2, image=_images(1, size=12)).shape == (1, 3, 24, 24)
    inpainting = _model(InpaintingCondition(), backbone=RecordingBackbone(9))
    assert inpainting.generate("a red circle", 2, image=_images(1, size=24),
                               mask_image=_square_mask(size=24)).shape == (1, 3, 24, 24)


# ---- errors ----------------------------------------------------------------------------------------------------


def test_clear_errors_for_missing_or_wrong_inputs():
    ldm = _model(InpaintingCondition(), backbone=RecordingBackbone(9))
    image, mask = _images(1), _square_mask()
    with pytest.raises(ValueError, match="needs image= .* and mask_image="):
        ldm.generate("a red circle", 2)
    with pytest.raises(ValueError, match="mask_image=None"):
        ldm.generate("a red circle", 2, image=image)
    with pytest.raises(ValueError, match="mask_image must have shape"):
        ldm.generate("a red circle", 2, image=image, mask_image=mask[:, :, :8])
    with pytest.raises(ValueError, match="mask_image must have shape"):
        ldm.generate("a red circle", 2, image=image, mask_image=mask.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        ldm.generate("a red circle", 2, image=image, mask_image=mask * 0.5)
    with pytest.raises(TypeError, match="mask_image must be a float tensor"):
        ldm.generate("a red circle", 2, image=image, mask_image=mask.bool())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ldm.generate("a red circle", 2, image=image * 2 - 1, mask_image=mask)
    with pytest.raises(ValueError, match="1 or 2 images"):
        ldm.generate(["a red circle"] * 2, 2, image=_images(3), mask_image=mask)
    with pytest.raises(ValueError, match="pass images="):
        ldm.latent_training_loss(torch.zeros(1, 4, 4, 4), ["a red circle"])
    with pytest.raises(ValueError, match="pass concat_input"):
        ldm.diffusion_loss(torch.zeros(1, 4, 4, 4), ["a"], torch.tensor([3]), torch.zeros(1, 4, 4, 4),
                           torch.tensor([False]))
    plain = _model(None, backbone=RecordingBackbone(4))
    with pytest.raises(ValueError, match="this model has none"):
        plain.generate("a red circle", 2, image=image, mask_image=mask)
    with pytest.raises(ValueError, match="this model has none"):
        plain.latent_training_loss(torch.zeros(1, 4, 4, 4), ["a red circle"], images=torch.zeros(1, 3, 16, 16))
    sr = _model(LowResCondition(4), backbone=RecordingBackbone(7))
    with pytest.raises(ValueError, match="needs image="):
        sr.generate("a red circle", 2)
    with pytest.raises(ValueError, match="mask_image= is for an inpainting model"):
        sr.generate("a red circle", 2, image=_images(1, size=4), mask_image=mask)
    with pytest.raises(ValueError, match="low-resolution input of a 16x16 output"):
        sr.generate("a red circle", 2, image=_images(1, size=5), height=16, width=16)
    with pytest.raises(ValueError, match="scale must be an integer >= 2"):
        LowResCondition(1)
    with pytest.raises(ValueError, match="rectangle_probability"):
        InpaintingCondition(1.5)
