"""ClassEmbedder (class_embedder.py): one learned token per class through cross-attention, the null class for
guidance; generate(class_labels=...) as an alternative to prompts; training on labels through train_ldm; files."""

import json

import pytest
import torch
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
from minildm.class_embedder import ClassEmbedder, ClassEmbedderConfig
from minildm.interfaces import Conditioner


def _embedder(num_classes=10, dim=16, names=()):
    torch.manual_seed(0)
    return ClassEmbedder(ClassEmbedderConfig(num_classes, dim, list(names)))


def _model(conditioner=None, backbone=None):
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(AutoencoderConfig(1, 4, (8, 8, 8), norm_num_groups=4)).eval()
    conditioner = conditioner if conditioner is not None else _embedder()
    torch.manual_seed(1)
    backbone = backbone if backbone is not None else UNet2DConditionModel(UNetConfig(
        in_channels=4, out_channels=4, block_out_channels=(16, 16), attention_levels=(False, True),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8))
    return LatentDiffusion(autoencoder, backbone, NoiseSchedule(), conditioner, image_size=16)


class RecordingBackbone(nn.Module):
    in_channels = out_channels = 4
    cross_attention_dim = 16

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.states = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.states.append(encoder_hidden_states.detach().clone())
        return sample * 0 + self.weight

    def cross_attention_modules(self):
        return {}

    def config_dict(self):
        return {}


def test_one_token_per_class_and_the_null_class_last():
    embedder = _embedder(names=[f"digit {k}" for k in range(10)])
    assert isinstance(embedder, Conditioner)
    states = embedder.encode(["digit 3", "digit 7", ""])
    weight = embedder.embedding.weight
    assert states.shape == (3, 1, 16)
    assert torch.equal(states[:, 0], torch.stack([weight[3], weight[7], weight[10]]))  # "" is row num_classes
    assert embedder.null_class == 10 and weight.shape == (11, 16)
    assert embedder.condition_names([0, 9]) == ["digit 0", "digit 9"]
    assert embedder.condition_names(torch.tensor([2])) == ["digit 2"]
    assert embedder.tokens("digit 3") == ["digit 3"] and embedder.tokens("") == ["<null>"]
    assert _embedder().class_names == [str(k) for k in range(10)]


def test_generate_by_class_labels_is_generate_by_class_names():
    ldm = _model()
    by_label = ldm.generate(class_labels=[3, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    by_name = ldm.generate(["3", "7"], 3, generator=torch.Generator().manual_seed(0))
    assert by_label.shape == (2, 1, 16, 16) and torch.equal(by_label, by_name)
    other = ldm.generate(class_labels=[4, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(other[0], by_label[0]) and torch.equal(other[1], by_label[1])


def test_guidance_pairs_each_class_with_the_null_class():
    backbone = RecordingBackbone()
    ldm = _model(backbone=backbone)
    ldm.generate(class_labels=[1, 2], num_inference_steps=2, guidance_scale=4.0)
    weight = ldm.conditioner.embedding.weight
    for states in backbone.states:
        assert states.shape == (4, 1, 16)
        torch.testing.assert_close(states[:2, 0], weight[[10, 10]])  # unconditional half: the null class
        torch.testing.assert_close(states[2:, 0], weight[[1, 2]])


def test_training_on_labels_learns_the_classes_and_the_null_class(tmp_path):
    ldm = _model()
    before = ldm.conditioner.embedding.weight.detach().clone()
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    history = train_ldm(ldm, images, class_labels=labels, config=TrainingConfig(steps=4, batch_size=8,
                                                                                progress=False),
                        caption_dropout=0.5)
    after = ldm.conditioner.embedding.weight.detach()
    changed = (after - before).abs().sum(dim=1) > 0  # (11,): which rows moved
    assert changed[:4].all() and changed[10] and not changed[4:10].any()  # seen classes and the null class only
    same = _model()
    by_names = train_ldm(same, images, [str(int(k)) for k in labels], TrainingConfig(steps=4, batch_size=8,
                                                                                      progress=False),
                         caption_dropout=0.5)
    assert by_names["loss"] == history["loss"]
    out = ldm.generate(class_labels=[0, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    ldm.save(tmp_path / "classes")
    config = json.loads((tmp_path / "classes" / "config.json").read_text())
    assert config["conditioner"]["class"] == "ClassEmbedder"
    assert config["conditioner"]["config"]["num_classes"] == 10
    loaded = LatentDiffusion.load(tmp_path / "classes")
    again = loaded.generate(class_labels=[0, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, out)


def test_clear_errors():
    ldm = _model(backbone=RecordingBackbone())
    with pytest.raises(ValueError, match="exactly one of prompts and class_labels.*both"):
        ldm.generate(["3"], 2, class_labels=[3])
    with pytest.raises(ValueError, match="exactly one of prompts and class_labels.*neither"):
        ldm.generate(num_inference_steps=2)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 10\).*got \[10\]"):
        ldm.generate(class_labels=[3, 10], num_inference_steps=2)
    with pytest.raises(TypeError, match="class_labels must be"):
        ldm.generate(class_labels=[1.5], num_inference_steps=2)
    with pytest.raises(TypeError, match="class_labels must be"):
        ldm.generate(class_labels=torch.tensor([1.0]), num_inference_steps=2)
    with pytest.raises(ValueError, match="'a handwritten digit three' is not a class"):
        ldm.generate("a handwritten digit three", 2)
    with pytest.raises(ValueError, match="exactly one of prompts and class_labels"):
        train_ldm(ldm, torch.zeros(2, 1, 16, 16), ["1", "2"], class_labels=[1, 2])
    text = TextEncoder.from_captions(["a digit"], hidden_size=16, num_layers=1)
    text_model = _model(conditioner=text, backbone=RecordingBackbone())
    with pytest.raises(TypeError, match="class_labels need a class-conditional model"):
        text_model.generate(class_labels=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="class_names must be 3 non-empty strings"):
        ClassEmbedderConfig(3, 16, ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        ClassEmbedderConfig(2, 16, ["a", "a"])
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        ClassEmbedderConfig(0, 16)
