"""LatentDiffusion: a first stage, a conditioner, a backbone and a noise schedule, tied together.

Training (Rombach et al. 2022, eq. 2; with a condition y, eq. 3):

    L_LDM = E_{E(x), y, ε ~ N(0, I), t} [ || ε - ε_θ(z_t, t, τ_θ(y)) ||² ],
    z_0 = scaling_factor · E(x),   z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε

with the first stage frozen. A caption is replaced by the null condition "" with probability
`caption_dropout`, so the same network also learns the unconditional prediction ε_θ(z_t, t, τ_θ("")).
The network may predict ε, x_0 ("sample") or v (schedule.py); the loss compares it with that target.

Sampling with classifier-free guidance (Ho & Salimans 2022, eq. 6, which they write with w = s - 1):

    ε̂ = ε_θ(z_t, t, τ("")) + s · (ε_θ(z_t, t, τ(y)) - ε_θ(z_t, t, τ("")))

s = 1 is the plain conditional model; s > 1 trades diversity for prompt adherence. Guidance works on
whatever the network predicts (ε, x_0 or v): each is an affine function of the others given z_t.

The four slots (interfaces.py): first stage (AutoencoderKL, or PixelSpace: diffusion on pixels, the
paper's LDM-1), conditioner (TextEncoder), backbone (UNet2DConditionModel) and the sampler, which
`generate()` takes per call. Its loop, in `denoise()`, is short on purpose: copy it and change it.
This module and train.py are the only ones that see models and samplers together (with the command line).

Notation: B batch, c latent channels, h x w latent size, H x W image size = f·h x f·w, L tokens, D width.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import editing, model_folder
from .attention_maps import cross_attention_maps
from .checks import check_device, check_generator, check_images, explain_missing_kernels
from .flow import FlowMatchSchedule
from .interfaces import Backbone, Conditioner, FirstStage, Sampler, check_slot
from .loss_weighting import min_snr_weights
from .pixel_space import PixelSpace
from .samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    FlowMatchEulerSampler,
    FlowMatchHeunSampler,
    randn_tensor,
)
from .schedule import PREDICTION_TYPES, NoiseSchedule

# What a backbone may predict: ε, v or x_0 on a diffusion schedule, or a flow's velocity ε - x_0 on its path.
MODEL_PREDICTION_TYPES = (*PREDICTION_TYPES, "flow_prediction")

# The samplers make_sampler() builds by name, per family, with the settings it gives them unless told
# otherwise; the first of each family is generate()'s default. "trailing" spacing starts every run at
# t = T - 1 and works for any number of steps from 1 to T.
SAMPLERS = {
    "diffusion": {
        "ddim": (DDIMSampler, {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
        "ddpm": (DDPMSampler, {"timestep_spacing": "trailing"}),
        "dpm_solver": (DPMSolverMultistepSampler, {"timestep_spacing": "trailing"}),
    },
    "flow": {
        "euler": (FlowMatchEulerSampler, {}),
        "heun": (FlowMatchHeunSampler, {}),
    },
}


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Rescaled classifier-free guidance (Lin et al. 2023, arXiv:2305.08891, sec. 3.4; diffusers' rescale_noise_cfg):

        x_rescaled = x_cfg · σ_pos / σ_cfg,    x_final = φ x_rescaled + (1 - φ) x_cfg

    with σ the standard deviation of each sample over all its other dimensions: large guidance scales inflate
    the guided output's spread, and this pulls it back to the conditional output's. guided (x_cfg), conditional
    (x_pos): (B, ...); φ = guidance_rescale in [0, 1]. Returns (B, ...)."""
    dims = list(range(1, guided.ndim))
    std_conditional = conditional.std(dim=dims, keepdim=True)  # σ_pos, (B, 1, ..., 1)
    std_guided = guided.std(dim=dims, keepdim=True)  # σ_cfg
    rescaled = guided * (std_conditional / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


@dataclass
class GenerationOutput:
    images: torch.Tensor  # (B, C, H, W) float32 in [0, 1]
    timesteps: list  # the timesteps visited, in order (ints, or floats for continuous-time samplers)
    latents: torch.Tensor  # (n + 1, B, c, h, w): z_T, then the sample after each step (scaled latents)
    pred_original_latents: torch.Tensor  # (n, B, c, h, w): the predicted z_0 at each step


class LatentDiffusion(nn.Module):
    """A text-to-image latent diffusion model: `generate(prompts)` -> images, `training_loss(images, captions)`.

    first_stage: a FirstStage (AutoencoderKL), or None to diffuse pixels (PixelSpace). It is frozen here.
    backbone: a Backbone (UNet2DConditionModel or DiTTransformer2DModel) taking the first stage's latent channels.
    schedule: the process the backbone is trained on, and the one switch between the two families: a
        NoiseSchedule (diffusion: DDPM/DDIM/DPM-Solver sampling) or a FlowMatchSchedule (rectified flow:
        x_σ = (1 - σ) z_0 + σ ε, Euler/Heun sampling; flow.py).
    conditioner: a Conditioner (TextEncoder) whose width is the backbone's cross_attention_dim.
    prediction_type: what the backbone predicts: "epsilon", "v_prediction" or "sample" (x_0) on a
        NoiseSchedule; "flow_prediction" (the velocity ε - z_0, the only choice) on a FlowMatchSchedule.
    image_size: the default height and width of generated images, a multiple of the first stage's factor f.
    concat_conditioning: None, or a spatially aligned condition concatenated with z_t as extra backbone input
        channels (concat_conditioning.py: InpaintingCondition, LowResCondition; LDM sections 3.3, 4.4-4.5). The
        backbone then takes c + concat_conditioning.extra_channels(first_stage) channels and returns c;
        generate() takes its input as image= (and mask_image=), and training draws it from the training images.

    Raises TypeError for an argument that does not fill its slot, ValueError for slots that do not fit
    together (channels, widths), an unknown prediction_type or an image_size that f does not divide.
    """

    def __init__(
        self,
        first_stage: FirstStage | None,
        backbone: Backbone,
        schedule: NoiseSchedule,
        conditioner: Conditioner,
        prediction_type: str = "epsilon",
        image_size: int = 32,
        concat_conditioning=None,
    ):
        super().__init__()
        first_stage = first_stage if first_stage is not None else PixelSpace(getattr(backbone, "in_channels", 3))
        check_slot(first_stage, FirstStage, "first_stage")
        check_slot(backbone, Backbone, "backbone")
        check_slot(conditioner, Conditioner, "conditioner")
        if not isinstance(schedule, (NoiseSchedule, FlowMatchSchedule)):
            raise TypeError(f"schedule must be a NoiseSchedule (diffusion) or a FlowMatchSchedule (rectified flow), "
                            f"got {type(schedule).__name__}")
        c = first_stage.latent_channels
        if concat_conditioning is not None and not all(callable(getattr(concat_conditioning, name, None)) for name in
                                                       ("extra_channels", "model_input", "draw_training_input",
                                                        "config_dict", "output_size", "check_inputs")):
            raise TypeError(f"concat_conditioning must be a concatenation condition (concat_conditioning.py: "
                            f"InpaintingCondition, LowResCondition) or None, got {type(concat_conditioning).__name__}")
        extra = concat_conditioning.extra_channels(first_stage) if concat_conditioning is not None else 0
        if backbone.in_channels != c + extra or backbone.out_channels != c:
            takes = f"take and return the first stage's {c} latent channels" if not extra else \
                (f"take the first stage's {c} latent channels + {extra} of its {type(concat_conditioning).__name__} "
                 f"= {c + extra} channels and return {c}")
            raise ValueError(f"the backbone must {takes}, got in_channels={backbone.in_channels}, "
                             f"out_channels={backbone.out_channels}")
        if backbone.cross_attention_dim != conditioner.hidden_size:
            raise ValueError(f"the backbone's cross_attention_dim={backbone.cross_attention_dim} must equal the "
                             f"conditioner's hidden_size={conditioner.hidden_size}")
        if prediction_type not in MODEL_PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {MODEL_PREDICTION_TYPES}, got {prediction_type!r}")
        if isinstance(schedule, FlowMatchSchedule) != (prediction_type == "flow_prediction"):
            raise ValueError(f"prediction_type={prediction_type!r} does not fit a {type(schedule).__name__}: a "
                             f"FlowMatchSchedule trains prediction_type='flow_prediction', a NoiseSchedule one of "
                             f"{PREDICTION_TYPES}")
        if prediction_type == "epsilon" and schedule.rescale_betas_zero_snr:
            warnings.warn("an ε-prediction model on a zero-terminal-SNR schedule cannot predict x_0 at the last "
                          "timestep, where SNR = 0 (Lin et al. 2023, sec. 3.2): use prediction_type='v_prediction'",
                          UserWarning, stacklevel=2)
        f = first_stage.downsampling_factor
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < f or image_size % f:
            raise ValueError(f"image_size must be a multiple of the first stage's factor f={f}, got {image_size!r}")
        self.first_stage = first_stage.requires_grad_(False)  # trained separately, then frozen
        self.backbone = backbone
        self.conditioner = conditioner
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.image_size = image_size
        self.concat_conditioning = concat_conditioning

    RENAMED = {"unet": "backbone", "autoencoder": "first_stage", "text_encoder": "conditioner"}  # minildm 0.1 -> 0.2

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.RENAMED:
                raise AttributeError(f"LatentDiffusion.{name} is now .{self.RENAMED[name]}, named for the slot it "
                                     f"fills (minildm 0.2)") from None
            raise

    def forward(self, *args, **kwargs):
        raise TypeError("a LatentDiffusion is not called directly: ldm.generate(prompts) makes images, "
                        "ldm.training_loss(images, captions) gives the loss")

    @property
    def is_flow(self) -> bool:
        """True for a rectified flow (a FlowMatchSchedule), False for a diffusion model."""
        return isinstance(self.schedule, FlowMatchSchedule)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's dtype: latents live in it; images come back as float32 whatever it is."""
        return next(self.backbone.parameters()).dtype

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(c, h, w) of the latents of a `height` x `width` image (default image_size)."""
        f = self.first_stage.downsampling_factor
        height = height if height is not None else self.image_size
        width = width if width is not None else self.image_size
        return (self.first_stage.latent_channels, height // f, width // f)

    # ---- the first stage: images <-> scaled latents ----------------------------------------------------------

    @property
    def first_stage_dtype(self) -> torch.dtype:
        """The dtype images enter the first stage in: its weights', or the backbone's for PixelSpace."""
        weight = next(self.first_stage.parameters(), None)
        return weight.dtype if weight is not None else self.dtype  # PixelSpace has no weights

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents z_0 = scaling_factor · E(x), (B, c, H/f, W/f),
        in the model's dtype. Raises TypeError / ValueError for images of the wrong kind or on another device."""
        check_images(images, "images", self.first_stage.in_channels, self.first_stage.downsampling_factor)
        check_device(images, "images", self.device)
        check_generator(generator)
        images = images.to(self.first_stage_dtype)  # float32 images into a bf16 / fp16 model
        latents = self.first_stage.encode(images).sample(generator) * self.first_stage.scaling_factor
        return latents.to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, C, f·h, f·w), float32 in [0, 1]."""
        check_images(latents, "latents", self.first_stage.latent_channels, what="latents")
        check_device(latents, "latents", self.device)
        latents = latents.to(self.first_stage_dtype)
        images = self.first_stage.decode(latents / self.first_stage.scaling_factor)  # in [-1, 1], roughly
        return ((images.float() + 1) / 2).clamp(0, 1)

    # ---- training -------------------------------------------------------------------------------------------

    def training_loss(self, images: torch.Tensor, captions: list[str], caption_dropout: float = 0.1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. (3) from images (B, C, H, W) in [-1, 1]: encode with the frozen first stage, then as below."""
        return self.latent_training_loss(self.encode_images(images, generator), captions, caption_dropout, generator,
                                         images=images if self.concat_conditioning is not None else None)

    def latent_training_loss(self, latents: torch.Tensor, captions: list[str], caption_dropout: float = 0.1,
                             generator: torch.Generator | None = None, snr_gamma: float | None = None, *,
                             images: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. (3) on scaled latents z_0 (B, c, h, w), a scalar float32 loss. Draws t, ε and the caption
        dropout from `generator` (draw_training_noise), then computes diffusion_loss. A model with
        concat_conditioning also needs the `images` (B, C, H, W) in [-1, 1] the latents come from: its training
        condition (a random mask, the low-resolution image) is drawn from them, after t, ε and the dropout."""
        self._check_captions(latents, captions)  # before the draws, which need the batch's shape
        self._check_training_images(images, latents)
        timesteps, noise, dropped = self.draw_training_noise(latents.shape, caption_dropout, generator)
        concat_input = self.training_concat_input(images, generator) if images is not None else None
        return self.diffusion_loss(latents, captions, timesteps, noise, dropped, snr_gamma=snr_gamma,
                                   concat_input=concat_input)

    def _check_training_images(self, images, latents) -> None:
        if self.concat_conditioning is None:
            if images is not None:
                raise ValueError("images= is for a model with concat_conditioning (its training condition is drawn "
                                 "from them); this model has none")
            return
        if images is None:
            raise ValueError(f"this model's {type(self.concat_conditioning).__name__} draws its training condition "
                             f"from the images: pass images= (B, C, H, W) in [-1, 1], those the latents come from")
        check_images(images, "images", self.first_stage.in_channels, self.first_stage.downsampling_factor)
        f = self.first_stage.downsampling_factor
        if len(images) != len(latents) or tuple(images.shape[2:]) != (latents.shape[2] * f, latents.shape[3] * f):
            raise ValueError(f"images {tuple(images.shape)} must be the {len(latents)} images of the latents "
                             f"{tuple(latents.shape)} (f={f})")

    def training_concat_input(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The concatenated condition of one training batch, images (B, C, H, W) in [-1, 1] -> (B, extra, h, w) in
        the model's dtype on its device: concat_conditioning draws it from the images (its randomness, such as
        the masks, from `generator` on the CPU), then builds it with the frozen first stage."""
        images = images.to(self.device, self.first_stage_dtype)
        inputs = self.concat_conditioning.draw_training_input(images, generator)
        f = self.first_stage.downsampling_factor
        latent_size = (images.shape[2] // f, images.shape[3] // f)
        return self.concat_conditioning.model_input(self.first_stage, latent_size, **inputs).to(self.dtype)

    def draw_training_noise(self, shape: tuple[int, ...], caption_dropout: float = 0.1,
                            generator: torch.Generator | None = None):
        """The randomness of one training step for latents of `shape` (B, c, h, w), drawn on the CPU from
        `generator`: (timesteps (B,), noise ε (B, c, h, w) float32, dropped (B,) bool). Timesteps are int64 in
        [0, T) for diffusion, uniform; for a flow, float32 σ · T with σ logit-normal (FlowMatchSchedule)."""
        if not isinstance(caption_dropout, numbers.Real) or not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout!r}")
        check_generator(generator)
        B = shape[0]
        dropped = torch.rand(B, generator=generator) < caption_dropout
        if self.is_flow:
            timesteps = self.schedule.sample_sigmas(B, generator) * self.schedule.num_train_timesteps
        else:
            timesteps = torch.randint(0, self.schedule.num_train_timesteps, (B,), generator=generator)
        noise = torch.randn(tuple(shape), generator=generator)
        return timesteps, noise, dropped

    def diffusion_loss(self, latents: torch.Tensor, captions: list[str], timesteps: torch.Tensor,
                       noise: torch.Tensor, dropped: torch.Tensor, *, snr_gamma: float | None = None,
                       concat_input: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. (3) with every random draw given: || target - model(z_t, t, τ(y)) ||², averaged, as float32.

        latents z_0 (B, c, h, w); captions, B strings; timesteps (B,) integers in [0, T) (for a flow, floats
        σ · T in [0, T]); noise ε like latents;
        dropped (B,) bool: these captions are replaced by the null condition. snr_gamma: None for the plain
        mean, or γ of Min-SNR-γ weighting (loss_weighting.py; Hang et al. 2023 use 5): each sample's MSE is
        weighted by min(SNR(t), γ) over SNR(t) (ε), SNR(t) + 1 (v) or 1 (x_0). concat_input: for a model with
        concat_conditioning, its condition (B, extra, h, w) (training_concat_input), put beside z_t; the
        caption dropout drops the caption only, never this (as Stable Diffusion's inpainting model trains).
        Raises TypeError / ValueError for arguments of the wrong kind or shape.
        """
        self._check_captions(latents, captions)
        self._check_concat_input(concat_input, latents.shape)
        if self.is_flow and snr_gamma is not None:
            raise ValueError("snr_gamma (Min-SNR-γ) weighs diffusion timesteps by their SNR; a rectified flow has "
                             "none: its logit-normal σ sampling plays that part (FlowMatchSchedule)")
        device, dtype = self.device, self.dtype
        latents = latents.to(dtype)
        noise = noise.to(device, dtype)  # ε, drawn on the CPU
        sigmas = self.schedule.to_sigmas(timesteps) if self.is_flow else None  # (B,) σ = t / T, checked on the CPU
        timesteps = timesteps.to(device)
        captions = [self.conditioner.null_condition if drop else caption
                    for caption, drop in zip(captions, dropped.tolist())]
        if self.is_flow:
            noisy = self.schedule.add_noise(latents, noise, sigmas)  # z_σ = (1 - σ) z_0 + σ ε
        else:
            noisy = self.schedule.add_noise(latents, noise, timesteps)  # z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε
        if concat_input is not None:
            noisy = torch.cat([noisy, concat_input.to(device, dtype)], dim=1)  # (B, c + extra, h, w): [z_t, y]
        model_output = self.backbone(noisy, timesteps, self.conditioner.encode(captions))
        if self.is_flow:
            target = self.schedule.get_velocity(latents, noise)  # u = ε - z_0
        elif self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.schedule.get_velocity(latents, noise, timesteps)  # v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z_0
        else:
            target = latents
        if snr_gamma is None:
            return F.mse_loss(model_output.float(), target.float())
        weights = min_snr_weights(self.schedule.snr(timesteps), snr_gamma, self.prediction_type).to(device)  # (B,)
        per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
        return (weights * per_sample).mean()

    def _check_concat_input(self, concat_input, shape) -> None:
        if self.concat_conditioning is None:
            if concat_input is not None:
                raise ValueError("concat_input is for a model with concat_conditioning; this model has none")
            return
        extra = self.concat_conditioning.extra_channels(self.first_stage)
        expected = (shape[0], extra, *shape[2:])
        if concat_input is None:
            raise ValueError(f"this model's backbone takes its {type(self.concat_conditioning).__name__} beside z_t: "
                             f"pass concat_input {expected} (ldm.training_concat_input(images, generator))")
        if not torch.is_tensor(concat_input) or tuple(concat_input.shape) != expected:
            got = tuple(concat_input.shape) if torch.is_tensor(concat_input) else type(concat_input).__name__
            raise ValueError(f"concat_input must have shape {expected}, got {got}")

    def _check_captions(self, latents, captions) -> None:
        check_images(latents, "latents", self.first_stage.latent_channels, what="latents")
        check_device(latents, "latents", self.device)
        if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be a list of strings, got {captions!r:.80}")
        if len(captions) != len(latents):
            raise ValueError(f"got {len(latents)} latents but {len(captions)} captions")

    def warn_ignored_words(self, prompts: list[str], what: str = "prompts", stacklevel: int = 2) -> None:
        """One UserWarning naming every word of `prompts` the conditioner cannot use (unknown words, words past
        its token limit), grouped by reason; nothing when every word gets through."""
        by_reason: dict[str, dict[str, None]] = {}  # reason -> the words, in order, each once
        for prompt in dict.fromkeys(prompts):  # each distinct prompt once
            for reason, words in self.conditioner.ignored_words(prompt).items():
                by_reason.setdefault(reason, {}).update(dict.fromkeys(words))
        if by_reason:
            listed = "; ".join(f"{reason}: {', '.join(repr(w) for w in list(words)[:20])}"
                               + (" ..." if len(words) > 20 else "") for reason, words in by_reason.items())
            warnings.warn(f"the model cannot use some words of the {what} ({listed})", UserWarning,
                          stacklevel=stacklevel + 1)

    # ---- sampling -------------------------------------------------------------------------------------------

    def make_sampler(self, name: str | None = None, **settings):
        """A sampler for this model's schedule and prediction type, by name: "ddim" (the default), "ddpm" or
        "dpm_solver" (DPM-Solver++(2M)) for a diffusion model; "euler" (the default) or "heun" for a flow.

        Unless `settings` say otherwise the diffusion samplers use "trailing" spacing, and DDIM lands on a
        clean x_0 (set_alpha_to_one=True): every num_inference_steps from 1 to T then works, and the first
        step starts from t = T - 1 (Lin et al. 2023). `make_sampler()` is generate()'s default sampler.
        `settings` are the sampler's own arguments (eta=..., timestep_spacing=..., shift=...).
        Raises ValueError for a name of the other family or an unknown one.
        """
        family, other = ("flow", "diffusion") if self.is_flow else ("diffusion", "flow")
        name = next(iter(SAMPLERS[family])) if name is None else name
        if not isinstance(name, str) or name not in SAMPLERS[family]:
            kind = "a rectified flow" if self.is_flow else "a diffusion model"
            hint = f" ({name!r} is a sampler for {other} models)" if isinstance(name, str) and name in SAMPLERS[other] \
                else ""
            raise ValueError(f"this model is {kind}: sampler name must be one of {tuple(SAMPLERS[family])}, got "
                             f"{name!r}{hint}")
        if "prediction_type" in settings or "schedule" in settings:
            raise ValueError("make_sampler builds the sampler for this model's schedule and prediction_type; for "
                             "another, build the sampler class yourself")
        sampler_class, defaults = SAMPLERS[family][name]
        if self.is_flow:
            return sampler_class(self.schedule, **{**defaults, **settings})
        return sampler_class(self.schedule, prediction_type=self.prediction_type, **{**defaults, **settings})

    def guided_model_output(self, latents: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None,
                            guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
        """Classifier-free guidance: out_u + s (out_c - out_u), both from one batched backbone call, then
        rescaled towards the conditional output's standard deviation by φ = guidance_rescale (rescale_guidance).
        latents (B, c, h, w); t one timestep; cond, uncond (B, L, D) -> (B, c, h, w)."""
        if guidance_scale == 1.0:  # the guided output is exactly the conditional one: skip half the work
            return self.backbone(latents, t, cond)
        both = self.backbone(torch.cat([latents, latents]), t, torch.cat([uncond, cond]))  # (2B, c, h, w)
        out_uncond, out_cond = both.chunk(2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        return rescale_guidance(guided, out_cond, guidance_rescale) if guidance_rescale > 0 else guided

    def denoise(self, latents: torch.Tensor, prompts: list[str], sampler, num_inference_steps: int,
                guidance_scale: float, generator: torch.Generator | None = None, on_step=None,
                progress: bool = False, guidance_rescale: float = 0.0, *,
                concat_input: torch.Tensor | None = None) -> torch.Tensor:
        """The sampling loop: noise (B, c, h, w) -> z_0, guided by `prompts`. `on_step(i, t, step_output)`
        runs after every step. It calls sampler.set_timesteps, which also resets the sampler's state.
        concat_input (B, extra, h, w): a concat_conditioning model's condition (concat_model_input), put beside
        z_t at every step, in both halves of classifier-free guidance: only the prompt is dropped there."""
        cond = self.conditioner.encode(prompts)  # (B, L, D)
        uncond = None  # guidance 1 is the conditional model alone: no unconditional prediction needed
        if guidance_scale != 1:
            uncond = self.conditioner.encode([self.conditioner.null_condition] * len(prompts))  # (B, L, D)
        sampler.set_timesteps(num_inference_steps)
        latents = latents * sampler.init_noise_sigma  # z_T
        for i, t in enumerate(tqdm(sampler.timesteps, desc="sampling", disable=not progress)):
            model_input = sampler.scale_model_input(latents, t)
            if concat_input is not None:
                model_input = torch.cat([model_input, concat_input], dim=1)  # (B, c + extra, h, w): [z_t, y]
            model_output = self.guided_model_output(model_input, t, cond, uncond, guidance_scale, guidance_rescale)
            out = sampler.step(model_output, t, latents, generator=generator)
            latents = out.prev_sample
            if on_step is not None:
                on_step(i, t, out)
        return latents

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | str | None = None,
        num_inference_steps: int = 50,
        *,
        sampler: Sampler | None = None,
        guidance_scale: float = 3.0,
        guidance_rescale: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        return_intermediates: bool = False,
        max_batch_size: int = 256,
        callback=None,
        progress: bool = False,
        image: torch.Tensor | None = None,
        mask_image: torch.Tensor | None = None,
        class_labels: list[int] | torch.Tensor | None = None,
    ) -> torch.Tensor | GenerationOutput:
        """Images (B, C, height, width), float32 in [0, 1], one per prompt; with return_intermediates a
        GenerationOutput that also holds every step's latents and predicted z_0.

        sampler: any Sampler built for this model's schedule and prediction type (make_sampler("ddpm"),
            make_sampler("ddim", eta=1.0), or DDIMSampler(ldm.schedule, ...) with its own defaults, which are
            Stable Diffusion's); None is make_sampler(): DDIM with "trailing" spacing, or Euler for a rectified
            flow (FlowMatchEulerSampler, FlowMatchHeunSampler). generate() calls its
            set_timesteps(num_inference_steps), as a diffusers pipeline does.
        guidance_scale: s >= 0 of classifier-free guidance; 1 is the conditional model alone.
        guidance_rescale: φ in [0, 1] (diffusers' name): mix the guided output with itself rescaled to the
            conditional output's standard deviation (Lin et al. 2023, sec. 3.4; rescale_guidance); 0 = off.
            It counters the over-exposure that large scales cause with zero-terminal-SNR, v-prediction models.
        generator: the CPU torch.Generator all noise is drawn from, so a seed gives the same noise on any
            device (GPU kernels may still differ in the last bits).
        latents: the starting noise (B, c, height/f, width/f) instead of drawing it (diffusers' name); it is
            multiplied by the sampler's init_noise_sigma.
        height, width: the image size, multiples of the first stage's factor f (default image_size, or what
            `latents` implies).
        max_batch_size: larger requests run in chunks of this size, one after the other. A stochastic sampler
            (DDPM, DDIM with η > 0) draws its noise chunk by chunk, so the chunk size changes its images.
        callback(step_index, timestep, latents) runs after every step of every chunk, with that chunk's latents.
        image, mask_image: the spatial condition of a model with concat_conditioning (diffusers' names), (B, C,
            H, W) in [0, 1] and (B, 1, H, W) of 0s and 1s (1 = repaint) for an InpaintingCondition, the
            low-resolution image alone for a LowResCondition; a batch of 1 serves every prompt. The output's
            size follows from it unless height and width say otherwise.
        class_labels: for a class-conditional model (a ClassEmbedder conditioner), integer labels in place of
            prompts (diffusers' name); give exactly one of prompts and class_labels.

        Warns (UserWarning, once per call) about words of the prompts the conditioner cannot use. Raises
        TypeError / ValueError for arguments of the wrong kind, naming the argument, and NotImplementedError
        when torch lacks an operation in the model's dtype on its device (checks.explain_missing_kernels).
        """
        prompts = self._conditions_of(prompts, class_labels)
        if self.concat_conditioning is None:
            if image is not None or mask_image is not None:
                raise ValueError("image= and mask_image= condition a model trained with concat_conditioning "
                                 "(an inpainting or super-resolution model); this model has none "
                                 "(ldm.concat_conditioning is None)")
        else:
            self.concat_conditioning.check_inputs(image, mask_image, self.first_stage.in_channels)
            if latents is None:  # the size the condition implies, unless told otherwise
                implied = self.concat_conditioning.output_size(image)
                height, width = (height if height is not None else implied[0]), \
                    (width if width is not None else implied[1])
        prompts, sampler, start = self._check_generate_arguments(prompts, num_inference_steps, sampler,
                                                                 guidance_scale, generator, latents, height, width,
                                                                 max_batch_size, callback)
        if not isinstance(guidance_rescale, numbers.Real) or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1] (0 = off), got {guidance_rescale!r}")
        concat_input = self.concat_model_input(image, mask_image, len(prompts), tuple(start.shape[2:])) \
            if self.concat_conditioning is not None else None
        self.warn_ignored_words(prompts, stacklevel=3)  # the caller of generate(), past torch.no_grad's wrapper
        was_training = self.training
        if any(m.training for m in (self, self.backbone, self.conditioner, self.first_stage)):
            self.eval()  # no dropout while sampling; eval() visits every module (~1 ms): only when needed
        chunks = []
        with explain_missing_kernels(self.device, self.dtype):
            for first in range(0, len(prompts), max_batch_size):
                chunk = slice(first, first + max_batch_size)
                chunks.append(self._generate_chunk(prompts[chunk], start[chunk], sampler, num_inference_steps,
                                                   guidance_scale, generator, return_intermediates, callback,
                                                   progress, guidance_rescale,
                                                   concat_input[chunk] if concat_input is not None else None))
        if was_training:
            self.train()
        if not return_intermediates:
            return torch.cat(chunks)
        return GenerationOutput(torch.cat([c.images for c in chunks]), chunks[0].timesteps,
                                torch.cat([c.latents for c in chunks], dim=1),
                                torch.cat([c.pred_original_latents for c in chunks], dim=1))

    def _generate_chunk(self, prompts, start, sampler, num_inference_steps, guidance_scale, generator,
                        return_intermediates, callback, progress, guidance_rescale=0.0, concat_input=None):
        trajectory, predictions, timesteps = [start], [], []

        def on_step(i, t, out):
            if return_intermediates:
                trajectory.append(out.prev_sample)
                predictions.append(out.pred_original_sample)
                timesteps.append(t.item() if torch.is_tensor(t) else t)
            if callback is not None:
                callback(i, t.item() if torch.is_tensor(t) else t, out.prev_sample)

        latents = self.denoise(start, prompts, sampler, num_inference_steps, guidance_scale, generator, on_step,
                               progress, guidance_rescale, concat_input=concat_input)
        images = self.decode_latents(latents)
        if not return_intermediates:
            return images
        return GenerationOutput(images, timesteps, torch.stack(trajectory), torch.stack(predictions))

    def _conditions_of(self, prompts, class_labels) -> list[str] | str:
        """The conditions generate() passes on: the prompts, or the class names of `class_labels` (exactly one)."""
        if (prompts is None) == (class_labels is None):
            raise ValueError("give exactly one of prompts and class_labels (class_labels for a class-conditional "
                             f"model), got {'both' if prompts is not None else 'neither'}")
        if class_labels is None:
            return prompts
        if not callable(getattr(self.conditioner, "condition_names", None)):
            raise TypeError(f"class_labels need a class-conditional model (a ClassEmbedder conditioner); this one's "
                            f"conditioner is a {type(self.conditioner).__name__}: pass prompts")
        return self.conditioner.condition_names(class_labels)

    def concat_model_input(self, image: torch.Tensor | None, mask_image: torch.Tensor | None, batch_size: int,
                           latent_size: tuple[int, int]) -> torch.Tensor:
        """The concat_conditioning's input for sampling, (batch_size, extra, h, w) in the model's dtype on its
        device, from generate()'s image= / mask_image= (a batch of 1 is repeated). Raises ValueError for inputs
        that do not fit (missing, of another size or batch)."""
        self.concat_conditioning.check_inputs(image, mask_image, self.first_stage.in_channels)
        for name, value in (("image", image), ("mask_image", mask_image)):
            if value is not None and len(value) not in (1, batch_size):
                raise ValueError(f"{name} must hold 1 or {batch_size} images (one per prompt), got {len(value)}")
        move = {"device": self.device, "dtype": self.first_stage_dtype}
        image = image.to(**move).expand(batch_size, -1, -1, -1)
        mask_image = mask_image.to(**move).expand(batch_size, -1, -1, -1) if mask_image is not None else None
        return self.concat_conditioning.model_input(self.first_stage, latent_size, image, mask_image).to(self.dtype)

    def _check_generate_arguments(self, prompts, num_inference_steps, sampler, guidance_scale, generator, latents,
                                  height, width, max_batch_size, callback):
        """generate()'s arguments, checked before any work: (prompts as a list, the sampler, the starting noise
        (B, c, h, w) in the model's dtype on its device)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0 or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}")
        prompts = list(prompts)
        sampler = self.make_sampler() if sampler is None else sampler
        self.check_sampler(sampler)
        sampler.set_timesteps(num_inference_steps)  # raises now, before any work, for an impossible number
        if not isinstance(guidance_scale, numbers.Real) or not 0 <= guidance_scale < math.inf:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        check_generator(generator)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a function (step_index, timestep, latents) or None, "
                            f"got {type(callback).__name__}")
        f = self.first_stage.downsampling_factor
        if latents is not None:
            check_images(latents, "latents", self.first_stage.latent_channels, what="latents")
            height = height if height is not None else latents.shape[2] * f
            width = width if width is not None else latents.shape[3] * f
        for name, size in (("height", height), ("width", width)):
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < f or size % f):
                raise ValueError(f"{name} must be an integer multiple of the first stage's factor f={f}, got "
                                 f"{size!r}")
        shape = (len(prompts), *self.latent_shape(height, width))
        if latents is None:
            latents = randn_tensor(shape, generator, self.device)  # drawn on the generator's device
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {len(prompts)} prompts of {height}x{width} "
                             f"images, got {tuple(latents.shape)}")
        elif latents.device.type == "meta":
            raise ValueError("latents must hold values: got a tensor on the meta device")
        return prompts, sampler, latents.to(self.device, self.dtype)

    def check_sampler(self, sampler) -> None:
        """Raise TypeError unless `sampler` fills the sampler slot, ValueError unless it was built for this
        model's prediction type and noise schedule."""
        if isinstance(sampler, str):
            raise TypeError(f"sampler must be a sampler object, not a name: ldm.make_sampler({sampler!r}) builds one "
                            f"for this model (or DDIMSampler(ldm.schedule, ...))")
        if type(sampler).__module__.startswith("diffusers") and not hasattr(sampler, "schedule"):
            raise TypeError(f"diffusers' {type(sampler).__name__} does not fill minildm's sampler slot (it holds no "
                            f"NoiseSchedule): use minildm's samplers, e.g. ldm.make_sampler('ddim')")
        check_slot(sampler, Sampler, "sampler")
        if isinstance(sampler.schedule, FlowMatchSchedule) != self.is_flow:
            kinds = ("a rectified flow", "a diffusion model")
            kinds = kinds if self.is_flow else kinds[::-1]
            raise ValueError(f"this model is {kinds[0]}, but {type(sampler).__name__} samples {kinds[1]}: use "
                             f"ldm.make_sampler({'euler' if self.is_flow else 'ddim'!r}) or another of "
                             f"{tuple(SAMPLERS['flow' if self.is_flow else 'diffusion'])}")
        if sampler.prediction_type != self.prediction_type:
            raise ValueError(f"the sampler was built for prediction_type={sampler.prediction_type!r} but this model "
                             f"predicts {self.prediction_type!r}; build it with prediction_type=ldm.prediction_type "
                             f"or with ldm.make_sampler(...)")
        if sampler.schedule != self.schedule:
            raise ValueError(f"the sampler was built for another noise schedule than the model's: {sampler.schedule} "
                             f"vs the model's {self.schedule}; build it with ldm.schedule or ldm.make_sampler(...)")

    @torch.no_grad()
    def cross_attention_maps(self, prompt: str, num_inference_steps: int = 50, guidance_scale: float = 3.0,
                             generator: torch.Generator | None = None, sampler: Sampler | None = None):
        """Where each word of `prompt` looks: (image (C, H, W), maps (L, h, w), tokens), sampled with `sampler`
        (None: make_sampler()). See attention_maps.py."""
        return cross_attention_maps(self, prompt, num_inference_steps, guidance_scale, generator, sampler)

    # ---- editing (editing.py: img2img, inversion, inpainting; any trained model, no retraining) ---------------

    def img2img(self, images: torch.Tensor, prompts: list[str] | str, strength: float = 0.8,
                num_inference_steps: int = 50, *, sampler: Sampler | None = None, guidance_scale: float = 3.0,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """SDEdit (Meng et al. 2021): images (B, C, H, W) in [0, 1] noised to `strength` of the schedule, then
        denoised after `prompts`; -> (B, C, H, W) float32 in [0, 1]. strength 0 returns D(E(x)). editing.img2img."""
        return editing.img2img(self, images, prompts, strength, num_inference_steps, sampler=sampler,
                               guidance_scale=guidance_scale, generator=generator, noise=noise)

    def invert(self, images: torch.Tensor, prompts: list[str] | str, num_inference_steps: int = 50, *,
               sampler: Sampler | None = None, guidance_scale: float = 1.0, strength: float = 1.0,
               fixed_point_iterations: int = 0) -> torch.Tensor:
        """DDIM inversion (a flow: Euler backwards): images (B, C, H, W) in [0, 1] -> starting latents z_T
        (B, c, h, w) that generate(prompts, latents=z_T, same sampler and steps) maps back to the images.
        DDIM with eta=0 or flow Euler only (ValueError otherwise). editing.invert."""
        return editing.invert(self, images, prompts, num_inference_steps, sampler=sampler,
                              guidance_scale=guidance_scale, strength=strength,
                              fixed_point_iterations=fixed_point_iterations)

    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, prompts: list[str] | str,
                num_inference_steps: int = 50, *, sampler: Sampler | None = None, strength: float = 1.0,
                guidance_scale: float = 3.0, generator: torch.Generator | None = None, paste_original: bool = False,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Blended latent inpainting (Avrahami et al. 2023), no retraining: repaint where masks (B, 1, H, W) is 1
        after `prompts`, keep the rest of images (B, C, H, W) in [0, 1]; -> (B, C, H, W). editing.inpaint."""
        return editing.inpaint(self, images, masks, prompts, num_inference_steps, sampler=sampler,
                               strength=strength, guidance_scale=guidance_scale, generator=generator,
                               paste_original=paste_original, noise=noise)

    # ---- files ----------------------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        """What config.json holds: the format version, the settings, and each slot's class and config."""
        return model_folder.config_of(self)

    def save(self, directory: str | os.PathLike) -> None:
        """Weights as safetensors (in the model's dtype), config as JSON, the folder replaced as a whole
        (atomic.atomic_directory): a crash leaves the old model or the new one, never a mix, and load() finds it.
        The format is model_folder.py's, version 2."""
        model_folder.save(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
             torch_dtype: torch.dtype | str | None = None) -> LatentDiffusion:
        """Rebuild a model from save()'s folder (any format version so far, 1 or 2), checking every tensor's
        name, shape and dtype against the config. It loads in the dtype it was saved in ("auto" or None), or
        `torch_dtype` (diffusers' name: torch.bfloat16, or "bfloat16"), on `device`, in eval mode. Raises
        FileNotFoundError for a missing folder or file, ValueError for a config or weights that do not describe a
        valid model."""
        return model_folder.load(cls, directory, device, torch_dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu", variant: str | None = None,
                        clip_skip: int | None = None) -> LatentDiffusion:
        """Stable Diffusion 1.x / 2.x from a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
        tokenizer/, scheduler/) in minildm's own modules (pretrained.load_pipeline; what is read, mapped and
        refused is listed there), on `device` in eval mode; `torch_dtype` as in load() (float16 / bfloat16 on a
        GPU). The folder's scheduler, as a minildm sampler: minildm.pretrained.load_sampler(path, model.schedule).
        variant="fp16" reads the *.fp16.safetensors files. A single .safetensors checkpoint: minildm.single_file.
        Raises FileNotFoundError for a missing part, ValueError for settings or weights minildm cannot use."""
        from . import pretrained  # imports clip.py, and so transformers' tokenizer, only when a folder is read

        return pretrained.load_pipeline(cls, path, torch_dtype, variant, clip_skip).to(device)
