"""The models the notebooks share, built and trained at the size of the current profile (profile.py).

Later notebooks reuse what earlier ones trained: each `*_or_train` function loads the model from the
notebooks' `artifacts/` folder when it is there and trains it (and saves it there) when it is not, so
any notebook can be opened alone. The settings are the notebooks' own, gathered here so that notebook 06
and notebook 09 train exactly the model notebook 05 did; read a notebook for what they mean.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .autoencoder import AutoencoderConfig, AutoencoderKL
from .classifier import SmallClassifier
from .data import LabeledImages
from .fid import dataset_classifier
from .ldm import LatentDiffusion
from .profile import current_profile, pick
from .schedule import NoiseSchedule
from .text import TextEncoder
from .train import TrainingConfig, train_autoencoder, train_ldm
from .unet import UNet2DConditionModel, UNetConfig


def mnist_autoencoder(factor: int = 4) -> AutoencoderKL:
    """Notebook 02's autoencoder for 32x32 digits: f = `factor`, 4 latent channels, untrained."""
    return AutoencoderKL(AutoencoderConfig.for_factor(factor, in_channels=1, latent_channels=4, width=16,
                                                      norm_num_groups=8))


def mnist_autoencoder_or_train(train: LabeledImages, factor: int = 4, artifacts: str | os.PathLike = "artifacts",
                               minutes: float | None = None, device=None) -> AutoencoderKL:
    """Load artifacts/autoencoder_mnist_f{factor}_{profile}, or train it (3 minutes at the cpu profile) and save it."""
    path = Path(artifacts) / f"autoencoder_mnist_f{factor}_{current_profile()}"
    if (path / "autoencoder.json").exists():
        return AutoencoderKL.load(path).eval()
    autoencoder = mnist_autoencoder(factor)
    train_autoencoder(autoencoder, train.images, TrainingConfig.for_autoencoder(
        steps=pick(ci=30, cpu=20000), batch_size=16, lr=2e-3,
        max_minutes=minutes if minutes is not None else pick(ci=0.5, cpu=3.0), device=device))
    autoencoder.save(path)
    return autoencoder.cpu().eval()


def mnist_text_encoder(captions: list[str]) -> TextEncoder:
    return TextEncoder.from_captions(captions, hidden_size=pick(ci=32, cpu=128), num_layers=pick(ci=1, cpu=2))


def mnist_unet(in_channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """Notebook 04's UNet (channels 64, 64; cross-attention at the coarser level); tiny at the ci profile."""
    return UNet2DConditionModel(UNetConfig(
        in_channels=in_channels, out_channels=in_channels, block_out_channels=pick(ci=(16, 16), cpu=(64, 64)),
        attention_levels=(False, True), cross_attention_dim=cross_attention_dim,
        attention_head_dim=pick(ci=8, cpu=32), norm_num_groups=pick(ci=8, cpu=16)))


def mnist_model(autoencoder: AutoencoderKL | None, captions: list[str]) -> LatentDiffusion:
    """A text-to-image model of 32x32 digits: in latent space, or on pixels when autoencoder is None."""
    text_encoder = mnist_text_encoder(captions)
    channels = autoencoder.config.latent_channels if autoencoder is not None else 1
    unet = mnist_unet(channels, text_encoder.config.hidden_size)
    return LatentDiffusion(autoencoder, unet, NoiseSchedule(), text_encoder, image_size=32)


def mnist_ldm_or_train(train: LabeledImages, artifacts: str | os.PathLike = "artifacts",
                       device=None) -> LatentDiffusion:
    """Load notebook 06's latent model from artifacts/ldm_mnist_{profile}, or train it (5 min at cpu) and save it."""
    path = Path(artifacts) / f"ldm_mnist_{current_profile()}"
    if (path / "config.json").exists():
        return LatentDiffusion.load(path, device=device if device is not None else "cpu")
    autoencoder = mnist_autoencoder_or_train(train, 4, artifacts, device=device)
    torch.manual_seed(0)
    ldm = mnist_model(autoencoder, train.captions)
    n = pick(ci=2000, cpu=len(train.images))  # at the ci profile a subset: encoding 60,000 digits takes a while
    train_ldm(ldm, train.images[:n], train.captions[:n], TrainingConfig(
        steps=pick(ci=60, cpu=20000), batch_size=pick(ci=8, cpu=64), lr=1e-3, max_minutes=pick(ci=0.3, cpu=5.0),
        device=device))
    ldm.save(path)
    return ldm


def mnist_classifier() -> SmallClassifier:
    """The cached MNIST classifier behind prompt accuracy and domain FID (fid.dataset_classifier).

    At the ci profile, a throwaway 20-step classifier in a temporary folder, never the shared cache.
    """
    if current_profile() == "ci":
        return dataset_classifier("mnist", cache_dir=tempfile.mkdtemp(), steps=20, progress=False)
    return dataset_classifier("mnist", progress=False)
