"""The models the notebooks share, built and trained at the size of the current profile (profile.py).

Later notebooks reuse what earlier ones trained: each `*_or_train` function loads the model from the
notebooks' `artifacts/` folder when it is there and trains it (and saves it there) when it is not, so
any notebook can be opened alone. The settings are the notebooks' own, gathered here so that notebook 06
and notebook 09 train exactly the model notebook 05 did; read a notebook for what they mean.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .atomic import atomic_write_json
from .autoencoder import AutoencoderConfig, AutoencoderKL
from .class_embedder import ClassEmbedder, ClassEmbedderConfig
from .classifier import SmallClassifier
from .concat_conditioning import InpaintingCondition, LowResCondition
from .data import LabeledImages
from .demo import DemoConfig, build_autoencoder, build_model
from .dit import DiTConfig, DiTTransformer2DModel
from .fid import dataset_classifier
from .flow import FlowMatchSchedule
from .ldm import LatentDiffusion
from .profile import current_profile, pick
from .schedule import NoiseSchedule
from .text import TextEncoder
from .train import TrainingConfig, train_autoencoder, train_ldm
from .unet import UNet2DConditionModel, UNetConfig
from .vq import VQModel, VQModelConfig


def mnist_autoencoder(factor: int = 4) -> AutoencoderKL:
    """Notebook 02's autoencoder for 32x32 digits: f = `factor`, 4 latent channels, untrained."""
    return AutoencoderKL(AutoencoderConfig.for_factor(factor, in_channels=1, latent_channels=4, width=16,
                                                      norm_num_groups=8))


def mnist_autoencoder_or_train(train: LabeledImages, factor: int = 4, artifacts: str | os.PathLike = "artifacts",
                               minutes: float | None = None, device=None) -> AutoencoderKL:
    """Load artifacts/autoencoder_mnist_f{factor}_{profile}, or train it (3 minutes at the cpu profile) and save it."""
    path = Path(artifacts) / f"autoencoder_mnist_f{factor}_{current_profile()}"
    if (path / "autoencoder.json").exists():
        print(f"reused {path} (delete it to train again)")
        return AutoencoderKL.load(path).eval()
    autoencoder = mnist_autoencoder(factor)
    history = train_autoencoder(autoencoder, train.images, TrainingConfig.for_autoencoder(
        steps=pick(ci=30, cpu=20000), batch_size=16, lr=2e-3,
        max_minutes=minutes if minutes is not None else pick(ci=0.5, cpu=3.0), device=device, progress=False))
    print(f"trained the f={factor} autoencoder: {history['steps'][0]} steps in {history['seconds'][0]:.0f} s")
    autoencoder.save(path)
    return autoencoder.cpu().eval()


def mnist_vq_model(factor: int = 4) -> VQModel:
    """Notebook 12's VQ autoencoder: notebook 02's encoder and decoder (mnist_autoencoder) around a codebook of
    256 codes (64 at the ci profile) with EMA updates and dead-code restarts, untrained."""
    return VQModel(VQModelConfig.for_factor(factor, in_channels=1, latent_channels=4, width=16, norm_num_groups=8,
                                            num_vq_embeddings=pick(ci=64, cpu=256), codebook_ema_decay=0.99,
                                            restart_dead_codes=True, dead_code_steps=pick(ci=10, cpu=50)))


def mnist_vq_or_train(train: LabeledImages, factor: int = 4, artifacts: str | os.PathLike = "artifacts",
                      minutes: float | None = None, device=None) -> VQModel:
    """Load artifacts/vq_mnist_f{factor}_{profile}, or train it as mnist_autoencoder_or_train trains the KL
    autoencoder (batch 16, lr 2e-3, 3 minutes at the cpu profile) and save it. `.history` holds its training
    history (loss, perplexity, dead codes, restarted codes per step)."""
    path = Path(artifacts) / f"vq_mnist_f{factor}_{current_profile()}"
    history_path = path / "history.json"
    if (path / "vq_model.json").exists():
        history = json.loads(history_path.read_text()) if history_path.exists() else None
        took = f"; it trained {history['steps'][0]} steps in {history['seconds'][0]:.0f} s" if history else ""
        print(f"reused {path} (delete it to train again{took})")
        model = VQModel.load(path).eval()
        model.history = history
        return model
    torch.manual_seed(0)
    model = mnist_vq_model(factor)
    history = train_autoencoder(model, train.images, TrainingConfig.for_autoencoder(
        steps=pick(ci=30, cpu=20000), batch_size=16, lr=2e-3,
        max_minutes=minutes if minutes is not None else pick(ci=0.5, cpu=3.0), device=device, progress=False))
    print(f"trained the f={factor} VQ autoencoder: {history['steps'][0]} steps in {history['seconds'][0]:.0f} s")
    model.save(path)
    atomic_write_json(history_path, history)
    model = model.cpu().eval()
    model.history = history
    return model


def mnist_text_encoder(captions: list[str]) -> TextEncoder:
    return TextEncoder.from_captions(captions, hidden_size=pick(ci=32, cpu=128), num_layers=pick(ci=1, cpu=2))


def mnist_unet(in_channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """Notebook 04's UNet (channels 64, 64; cross-attention at the coarser level); tiny at the ci profile."""
    return UNet2DConditionModel(UNetConfig(
        in_channels=in_channels, out_channels=in_channels, block_out_channels=pick(ci=(16, 16), cpu=(64, 64)),
        attention_levels=(False, True), cross_attention_dim=cross_attention_dim,
        attention_head_dim=pick(ci=8, cpu=32), norm_num_groups=pick(ci=8, cpu=16)))


def mnist_pixel_model(captions: list[str]) -> LatentDiffusion:
    """Notebook 05's working pixel-space model: a UNet sized for 32x32 pixels, untrained.

    On pixels the first level runs at all 32x32 positions and costs most of a step, so it is narrow (16
    channels), the resolution is halved twice (32 -> 16 -> 8), and attention, whose cost grows with the square of
    the positions, runs only at 8x8. Its training step costs about a quarter of notebook 06's UNet's on pixels
    (notebook 05 prints both), so the same minutes buy about four times the steps.
    """
    text_encoder = TextEncoder.from_captions(captions, hidden_size=pick(ci=32, cpu=64), num_layers=1)
    unet = UNet2DConditionModel(UNetConfig(
        in_channels=1, out_channels=1, block_out_channels=pick(ci=(8, 16, 16), cpu=(16, 32, 64)),
        attention_levels=(False, False, True), cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=pick(ci=8, cpu=16), norm_num_groups=pick(ci=4, cpu=8)))
    return LatentDiffusion(None, unet, NoiseSchedule(), text_encoder, image_size=32)


def _train_or_reuse(path: Path, build, images: torch.Tensor, captions: list[str] | None, config: TrainingConfig,
                    what: str, class_labels=None) -> LatentDiffusion:
    """Load the model saved at `path`, or build() it, train it on (images, captions) and save it with its history.

    Either way, prints what happened: "reused PATH (...)" with the steps and seconds the saved run took, or
    "trained WHAT: N steps in S s". The loss history is kept in PATH/history.json for the notebooks' curves.
    """
    history_path = path / "history.json"
    if (path / "config.json").exists():
        history = json.loads(history_path.read_text()) if history_path.exists() else None
        took = f"; it trained {history['steps'][0]} steps in {history['seconds'][0]:.0f} s" if history else ""
        print(f"reused {path} (delete it to train again{took})")
        model = LatentDiffusion.load(path, device=config.device if config.device is not None else "cpu")
        model.history = history
        return model
    torch.manual_seed(0)
    model = build()
    history = train_ldm(model, images, captions, config, class_labels=class_labels)
    print(f"trained {what}: {history['steps'][0]} steps in {history['seconds'][0]:.0f} s")
    model.save(path)
    atomic_write_json(history_path, history)
    model.history = history
    return model


def mnist_pixel_ldm_or_train(train: LabeledImages, artifacts: str | os.PathLike = "artifacts",
                             device=None) -> LatentDiffusion:
    """Notebook 05's working pixel model (`mnist_pixel_model`), from artifacts/pixel_ddpm_mnist_{profile}, or
    trained for 15 minutes at the cpu profile (batch 64, lr 2e-3) and saved there. `.history` holds its losses."""
    config = TrainingConfig(steps=pick(ci=60, cpu=100000), batch_size=pick(ci=8, cpu=64), lr=2e-3,
                            max_minutes=pick(ci=2.0, cpu=15.0), device=device, progress=False)
    return _train_or_reuse(Path(artifacts) / f"pixel_ddpm_mnist_{current_profile()}",
                           lambda: mnist_pixel_model(train.captions), train.images, train.captions, config,
                           "the pixel model")


def mnist_pixel_equal_time_or_train(train: LabeledImages, artifacts: str | os.PathLike = "artifacts",
                                    device=None) -> LatentDiffusion:
    """Notebook 06's UNet design on pixels (`mnist_model(None, ...)`), trained with notebook 06's settings (batch
    64, lr 1e-3, 5 minutes at the cpu profile): the equal-time comparison of notebooks 05, 06 and 09. Saved at
    artifacts/pixel_mnist_{profile}; `.history` holds its losses."""
    config = TrainingConfig(steps=pick(ci=60, cpu=20000), batch_size=pick(ci=8, cpu=64), lr=1e-3,
                            max_minutes=pick(ci=2.0, cpu=5.0), device=device, progress=False)
    return _train_or_reuse(Path(artifacts) / f"pixel_mnist_{current_profile()}",
                           lambda: mnist_model(None, train.captions), train.images, train.captions, config,
                           "notebook 06's UNet on pixels, for the equal-time comparison")


def mnist_model(autoencoder: AutoencoderKL | None, captions: list[str]) -> LatentDiffusion:
    """A text-to-image model of 32x32 digits: in latent space, or on pixels when autoencoder is None."""
    text_encoder = mnist_text_encoder(captions)
    channels = autoencoder.config.latent_channels if autoencoder is not None else 1
    unet = mnist_unet(channels, text_encoder.config.hidden_size)
    return LatentDiffusion(autoencoder, unet, NoiseSchedule(), text_encoder, image_size=32)


def mnist_ldm_or_train(train: LabeledImages, artifacts: str | os.PathLike = "artifacts",
                       device=None) -> LatentDiffusion:
    """Load notebook 06's latent model from artifacts/ldm_mnist_{profile}, or train it (5 min at cpu) and save it
    with its history (notebook 02's f = 4 autoencoder is loaded, or trained, first). `.history` holds its losses."""
    n = pick(ci=2000, cpu=len(train.images))  # at the ci profile a subset: encoding 60,000 digits takes a while
    config = TrainingConfig(steps=pick(ci=60, cpu=20000), batch_size=pick(ci=8, cpu=64), lr=1e-3,
                            max_minutes=pick(ci=2.0, cpu=5.0), device=device, progress=False)
    return _train_or_reuse(Path(artifacts) / f"ldm_mnist_{current_profile()}",
                           lambda: mnist_model(mnist_autoencoder_or_train(train, 4, artifacts, device=device),
                                               train.captions), train.images[:n], train.captions[:n], config,
                           "notebook 06's latent model")


def mnist_flow_or_train(train: LabeledImages, artifacts: str | os.PathLike = "artifacts",
                        device=None) -> LatentDiffusion:
    """Notebook 10's latent rectified flow: notebook 06's model (`mnist_model`'s f = 4 autoencoder, text encoder and
    UNet) with a FlowMatchSchedule, predicting the velocity ε - z_0 ("flow_prediction"). Loaded from
    artifacts/flow_mnist_{profile}, or trained with notebook 06's settings for 4 minutes at the cpu profile and saved
    there with its history. `.history` holds its losses."""
    n = pick(ci=500, cpu=len(train.images))  # at the ci profile a subset: encoding 60,000 digits takes a while
    config = TrainingConfig(steps=pick(ci=60, cpu=20000), batch_size=pick(ci=8, cpu=64), lr=1e-3,
                            max_minutes=pick(ci=2.0, cpu=4.0), device=device, progress=False)

    def build() -> LatentDiffusion:
        autoencoder = mnist_autoencoder_or_train(train, 4, artifacts, device=device)
        text_encoder = mnist_text_encoder(train.captions)
        unet = mnist_unet(autoencoder.config.latent_channels, text_encoder.config.hidden_size)
        return LatentDiffusion(autoencoder, unet, FlowMatchSchedule(), text_encoder, prediction_type="flow_prediction",
                               image_size=32)

    return _train_or_reuse(Path(artifacts) / f"flow_mnist_{current_profile()}", build, train.images[:n],
                           train.captions[:n], config, "the latent flow (notebook 06's model, FlowMatchSchedule)")


def mnist_classifier() -> SmallClassifier:
    """The cached MNIST classifier behind prompt accuracy and domain FID (fid.dataset_classifier).

    At the ci profile, a throwaway 20-step classifier in a temporary folder, never the shared cache.
    """
    if current_profile() == "ci":
        return dataset_classifier("mnist", cache_dir=tempfile.mkdtemp(), steps=20, progress=False)
    return dataset_classifier("mnist", progress=False)


# ---- notebook 11: three models trained for one short budget each -------------------------------------------------


def mnist_dit(in_channels: int, cross_attention_dim: int) -> DiTTransformer2DModel:
    """Notebook 11's DiT for the f = 4 autoencoder's 8x8 latents: 2x2 patches (16 tokens), width 128, 4 blocks,
    the size of DiTConfig.tiny; tiny at the ci profile."""
    return DiTTransformer2DModel(DiTConfig(
        in_channels=in_channels, out_channels=in_channels, patch_size=2, hidden_size=pick(ci=32, cpu=128),
        num_layers=pick(ci=1, cpu=4), num_attention_heads=4, cross_attention_dim=cross_attention_dim))


def _short_budget(device) -> TrainingConfig:
    """Notebook 11's budget, the same for each of its models: notebook 06's settings (batch 64, lr 1e-3) for
    3 minutes at the cpu profile."""
    return TrainingConfig(steps=pick(ci=10, cpu=20000), batch_size=pick(ci=8, cpu=64), lr=1e-3,
                          max_minutes=pick(ci=0.05, cpu=3.0), device=device, progress=False)


def mnist_objective_ldm_or_train(train: LabeledImages, prediction_type: str = "epsilon",
                                 rescale_betas_zero_snr: bool = False, artifacts: str | os.PathLike = "artifacts",
                                 device=None) -> LatentDiffusion:
    """Notebook 06's latent model design (`mnist_model`) with another objective: the backbone predicts
    `prediction_type` on the scaled_linear schedule, rescaled to zero terminal SNR if asked. Loaded from
    artifacts/ldm_mnist_{prediction_type}_{scaled_linear|zero_snr}_{profile}, or trained for notebook 11's short
    budget (3 minutes at the cpu profile) and saved there with its history. `.history` holds its losses."""
    schedule = NoiseSchedule(rescale_betas_zero_snr=rescale_betas_zero_snr)
    n = pick(ci=2000, cpu=len(train.images))  # at the ci profile a subset: encoding 60,000 digits takes a while

    def build() -> LatentDiffusion:
        design = mnist_model(mnist_autoencoder_or_train(train, 4, artifacts, device=device), train.captions)
        return LatentDiffusion(design.first_stage, design.backbone, schedule, design.conditioner, prediction_type,
                               image_size=32)

    name = f"ldm_mnist_{prediction_type}_{'zero_snr' if rescale_betas_zero_snr else 'scaled_linear'}"
    return _train_or_reuse(Path(artifacts) / f"{name}_{current_profile()}", build, train.images[:n],
                           train.captions[:n], _short_budget(device),
                           f"the {prediction_type} model on the {schedule.beta_schedule} schedule"
                           f"{' rescaled to zero terminal SNR' if rescale_betas_zero_snr else ''}")


def mnist_dit_ldm_or_train(train: LabeledImages, artifacts: str | os.PathLike = "artifacts",
                           device=None) -> LatentDiffusion:
    """Notebook 06's latent ε-model with a DiT backbone (`mnist_dit`) in place of the UNet: the same autoencoder,
    text encoder and schedule. Loaded from artifacts/ldm_mnist_dit_{profile}, or trained for notebook 11's short
    budget (3 minutes at the cpu profile) and saved there with its history. `.history` holds its losses."""
    n = pick(ci=2000, cpu=len(train.images))

    def build() -> LatentDiffusion:
        autoencoder = mnist_autoencoder_or_train(train, 4, artifacts, device=device)
        text_encoder = mnist_text_encoder(train.captions)
        dit = mnist_dit(autoencoder.config.latent_channels, text_encoder.config.hidden_size)
        return LatentDiffusion(autoencoder, dit, NoiseSchedule(), text_encoder, image_size=32)

    return _train_or_reuse(Path(artifacts) / f"ldm_mnist_dit_{current_profile()}", build, train.images[:n],
                           train.captions[:n], _short_budget(device), "the DiT model")


# ---- notebook 13: conditioning by concatenation and by class -------------------------------------------------------


def _notebook_13_budget(device, minutes: float) -> TrainingConfig:
    """Notebook 13's budget: the demo's settings (batch 64, lr 1e-3, EMA 0.999) for `minutes` at the cpu profile."""
    return TrainingConfig(steps=pick(ci=30, cpu=20000), batch_size=pick(ci=8, cpu=64), lr=1e-3,
                          max_minutes=pick(ci=0.1, cpu=minutes), device=device, progress=False)


def shapes_autoencoder_or_train(train, artifacts: str | os.PathLike = "artifacts", device=None) -> AutoencoderKL:
    """The demo's f = 4 autoencoder for ShapesDataset (demo.build_autoencoder: 16-32-64 channels, 4 latent channels),
    from artifacts/autoencoder_shapes_{profile}, or trained with the demo's settings (1800 steps of batch 16, lr 2e-3,
    at most 3 minutes at the cpu profile) on `train` (a ShapesDataset) and saved there."""
    path = Path(artifacts) / f"autoencoder_shapes_{current_profile()}"
    if (path / "autoencoder.json").exists():
        print(f"reused {path} (delete it to train again)")
        return AutoencoderKL.load(path).eval()
    config = pick(ci=DemoConfig.smoke(), cpu=DemoConfig())
    torch.manual_seed(0)
    autoencoder = build_autoencoder(config)
    history = train_autoencoder(autoencoder, train.images, TrainingConfig.for_autoencoder(
        steps=pick(ci=30, cpu=config.ae_steps), batch_size=config.ae_batch_size, lr=config.ae_lr,
        max_minutes=pick(ci=0.2, cpu=3.0), device=device, progress=False))
    print(f"trained the shapes autoencoder: {history['steps'][0]} steps in {history['seconds'][0]:.0f} s")
    autoencoder.save(path)
    return autoencoder.cpu().eval()


def _concat_unet(latent_channels: int, extra_channels: int, cross_attention_dim: int, shapes: bool):
    """The demo's UNet (ShapesDataset) or notebook 06's (MNIST), taking `extra_channels` more input channels."""
    if shapes:
        config = pick(ci=DemoConfig.smoke(), cpu=DemoConfig())
        channels, groups, head = config.unet_channels, config.unet_norm_groups, pick(ci=8, cpu=32)
    else:
        channels, groups, head = pick(ci=(16, 16), cpu=(64, 64)), pick(ci=8, cpu=16), pick(ci=8, cpu=32)
    return UNet2DConditionModel(UNetConfig(
        in_channels=latent_channels + extra_channels, out_channels=latent_channels, block_out_channels=channels,
        attention_levels=(False, True), cross_attention_dim=cross_attention_dim, attention_head_dim=head,
        norm_num_groups=groups))


def shapes_inpainting_or_train(train, artifacts: str | os.PathLike = "artifacts", device=None) -> LatentDiffusion:
    """Notebook 13's inpainting model of ShapesDataset, as Stable Diffusion's: the demo's UNet taking [z_t, mask,
    masked-image latents] (InpaintingCondition, 4 + 1 + 4 channels), a text encoder of the captions, a rectified flow
    (FlowMatchSchedule), on the demo's autoencoder (shapes_autoencoder_or_train). Trained on `train` (a
    ShapesDataset) with random rectangle and brush-stroke masks for 4 minutes at the cpu profile, or loaded from
    artifacts/inpainting_shapes_{profile}. Notebook 14 compares training-free inpainting against it."""
    config = pick(ci=DemoConfig.smoke(), cpu=DemoConfig())

    def build() -> LatentDiffusion:
        autoencoder = shapes_autoencoder_or_train(train, artifacts, device)
        text_encoder = TextEncoder.from_captions(train.captions, hidden_size=config.text_hidden_size,
                                                 num_layers=config.text_layers)
        condition = InpaintingCondition()
        unet = _concat_unet(autoencoder.config.latent_channels, condition.extra_channels(autoencoder),
                            config.text_hidden_size, shapes=True)
        return LatentDiffusion(autoencoder, unet, FlowMatchSchedule(), text_encoder, "flow_prediction",
                               image_size=config.image_size, concat_conditioning=condition)

    return _train_or_reuse(Path(artifacts) / f"inpainting_shapes_{current_profile()}", build, train.images,
                           train.captions, _notebook_13_budget(device, 4.0),
                           "the inpainting model ([z_t, mask, masked-image latents])")


def mnist_super_resolution_or_train(train: LabeledImages, scale: int = 4, artifacts: str | os.PathLike = "artifacts",
                                    device=None) -> LatentDiffusion:
    """Notebook 13's super-resolution model of MNIST: notebook 06's UNet and text encoder taking [z_t, x↓] with x↓ the
    digit at 1/`scale` of its size (LowResCondition; 8x8 for scale 4 is the f = 4 latents' size), a rectified flow,
    on notebook 02's f = 4 autoencoder. Trained for 3 minutes at the cpu profile, or loaded from
    artifacts/super_resolution_mnist_x{scale}_{profile}."""
    n = pick(ci=500, cpu=len(train.images))

    def build() -> LatentDiffusion:
        autoencoder = mnist_autoencoder_or_train(train, 4, artifacts, device=device)
        text_encoder = mnist_text_encoder(train.captions)
        condition = LowResCondition(scale)
        unet = _concat_unet(autoencoder.config.latent_channels, condition.extra_channels(autoencoder),
                            text_encoder.config.hidden_size, shapes=False)
        return LatentDiffusion(autoencoder, unet, FlowMatchSchedule(), text_encoder, "flow_prediction",
                               image_size=32, concat_conditioning=condition)

    return _train_or_reuse(Path(artifacts) / f"super_resolution_mnist_x{scale}_{current_profile()}", build,
                           train.images[:n], train.captions[:n], _notebook_13_budget(device, 3.0),
                           f"the x{scale} super-resolution model")


def mnist_class_ldm_or_train(train: LabeledImages, artifacts: str | os.PathLike = "artifacts",
                             device=None) -> LatentDiffusion:
    """Notebook 13's class-conditional MNIST model: notebook 06's UNet cross-attending to one learned token per digit
    (ClassEmbedder, 10 classes named "0" to "9", a null class for guidance), a rectified flow on notebook 02's f = 4
    autoencoder, trained on the labels for 3 minutes at the cpu profile, or loaded from
    artifacts/class_ldm_mnist_{profile}."""
    n = pick(ci=500, cpu=len(train.images))

    def build() -> LatentDiffusion:
        autoencoder = mnist_autoencoder_or_train(train, 4, artifacts, device=device)
        embedder = ClassEmbedder(ClassEmbedderConfig(len(train.class_names), pick(ci=32, cpu=128),
                                                     list(train.class_names)))
        unet = _concat_unet(autoencoder.config.latent_channels, 0, embedder.hidden_size, shapes=False)
        return LatentDiffusion(autoencoder, unet, FlowMatchSchedule(), embedder, "flow_prediction", image_size=32)

    return _train_or_reuse(Path(artifacts) / f"class_ldm_mnist_{current_profile()}", build, train.images[:n], None,
                           _notebook_13_budget(device, 3.0), "the class-conditional model (ClassEmbedder)",
                           class_labels=train.labels[:n])


# ---- notebook 14: editing with a trained model ---------------------------------------------------------------------


def shapes_flow_or_train(train, artifacts: str | os.PathLike = "artifacts", device=None) -> LatentDiffusion:
    """Notebook 14's text-to-image model of ShapesDataset: the demo's model (demo.build_model: its UNet, a text encoder
    of the captions, a rectified flow) on the demo's autoencoder (shapes_autoencoder_or_train, notebook 13's), trained
    on `train` (a ShapesDataset) with the demo's settings (batch 64, lr 1e-3, EMA 0.999) for 5 minutes at the cpu
    profile, or loaded from artifacts/flow_shapes_{profile}. `.history` holds its losses."""
    config = pick(ci=DemoConfig.smoke(), cpu=DemoConfig())
    training = TrainingConfig(steps=pick(ci=30, cpu=20000), batch_size=pick(ci=8, cpu=config.ldm_batch_size),
                              lr=config.ldm_lr, ema_decay=config.ema_decay, max_minutes=pick(ci=0.1, cpu=5.0),
                              device=device, progress=False)
    return _train_or_reuse(Path(artifacts) / f"flow_shapes_{current_profile()}",
                           lambda: build_model(config, shapes_autoencoder_or_train(train, artifacts, device),
                                               train.captions),
                           train.images, train.captions, training, "the shapes flow (the demo's model)")
