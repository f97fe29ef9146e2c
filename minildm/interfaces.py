"""The four slots a latent diffusion model is built from, written down as the methods the pipeline calls.

    first stage   images x <-> latents z; the paper's E and D (Rombach et al. 2022, section 3.1)
    conditioner   prompts y -> encoder_hidden_states τ_θ(y), which the backbone cross-attends to (section 3.3)
    backbone      ε_θ(z_t, t, τ_θ(y)): the network that predicts the noise (or x_0, or v)
    sampler       the reverse process: which timesteps to visit, and one step from z_t towards z_0

LatentDiffusion (ldm.py) ties one of each together and relies on nothing but what is listed here, so a
new kind of first stage, conditioner, backbone or sampler plugs in without changing it. These are
`typing.Protocol`s: a class fills a slot by having these attributes and methods, not by inheriting
from anything; `isinstance(x, Backbone)` checks that the names are there (not their signatures).

Filling the slots today:
    first stage   AutoencoderKL (autoencoder.py); VQModel (vq.py), whose decoder quantises; PixelSpace
                  (pixel_space.py), the identity, for LDM-1
    conditioner   TextEncoder (text.py), a word-level transformer trained with the backbone
    backbone      UNet2DConditionModel (unet.py)
    sampler       DDPMSampler, DDIMSampler (samplers/)

Shapes: B batch, C image channels, H x W image size, c latent channels, f the first stage's
downsampling factor (h = H / f, w = W / f), L tokens per prompt, D their width. Depends on torch only.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class LatentDistribution(Protocol):
    """What a first stage's encoder returns: q(z | x), or a point mass for a deterministic encoder."""

    mean: torch.Tensor  # (B, c, h, w)
    std: torch.Tensor  # (B, c, h, w), zeros for a deterministic encoder

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor: ...  # z = mean + std · ε

    def mode(self) -> torch.Tensor: ...


@runtime_checkable
class FirstStage(Protocol):
    """Perceptual compression: images (B, C, H, W) in [-1, 1] <-> unscaled latents (B, c, H/f, W/f).

    The pipeline diffuses z_0 = scaling_factor · E(x) and decodes D(z_0 / scaling_factor) (LDM sections 4.3.2 and D.1:
    the factor gives the latents unit variance). H and W must be multiples of f.
    """

    in_channels: int  # C
    latent_channels: int  # c
    downsampling_factor: int  # f
    scaling_factor: float

    def encode(self, images: torch.Tensor) -> LatentDistribution: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...  # unscaled latents -> images, roughly [-1, 1]

    def config_dict(self) -> dict: ...  # JSON-able; the class's from_config_dict(d) rebuilds it (weights apart)


@runtime_checkable
class Conditioner(Protocol):
    """Conditions (prompts today) -> encoder_hidden_states (B, L, D) for the backbone's cross-attention.

    `null_condition` is what stands for "no condition" (the empty prompt ""): classifier-free guidance
    encodes it for the unconditional prediction, and training swaps it in for a dropped caption.
    """

    hidden_size: int  # D, the backbone's cross_attention_dim
    null_condition: Any

    def encode(self, conditions: list) -> torch.Tensor: ...  # (B, L, D)

    def tokens(self, condition) -> list[str]: ...  # a label for each of the first positions, for attention maps

    def ignored_words(self, condition) -> dict[str, list[str]]: ...  # {why: [words]} the model cannot use

    def config_dict(self) -> dict: ...


@runtime_checkable
class Backbone(Protocol):
    """The denoising network: forward(sample (B, c, h, w), timestep, encoder_hidden_states (B, L, D)) -> (B, c, h, w).

    `timestep` is one number for the whole batch (a python int or float, or a 0-d tensor) or one per sample
    (B,); floats are allowed for samplers that work in continuous time (a flow's σ · 1000). A UNet accepts any
    h and w; a transformer (DiTTransformer2DModel) multiples of its patch size, refusing others with a ValueError.
    """

    in_channels: int
    out_channels: int
    cross_attention_dim: int | None  # D (None: an unconditional backbone, which LatentDiffusion does not take)

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None
                 ) -> torch.Tensor: ...

    def cross_attention_modules(self) -> dict[str, torch.nn.Module]: ...  # name -> attention layer (attention maps)

    def config_dict(self) -> dict: ...


@runtime_checkable
class Sampler(Protocol):
    """The reverse process, as a diffusers scheduler: the caller owns the loop and calls the model.

        sampler.set_timesteps(n)                    # chooses the timesteps and resets any state
        x = noise * sampler.init_noise_sigma
        for t in sampler.timesteps:                 # one model call per entry
            out = model(sampler.scale_model_input(x, t), t)
            x = sampler.step(out, t, x, generator=generator).prev_sample

    `timesteps` may be integers (DDPM, DDIM) or floats (flows), and may list a timestep twice when a step
    takes several model calls (Heun, `order` = 2). A sampler is built for one noise schedule and one
    prediction type, and the pipeline refuses one whose `schedule` or `prediction_type` is not its model's.
    """

    timesteps: torch.Tensor | None  # (about n * order,) set by set_timesteps, in the order the loop visits them
    init_noise_sigma: float  # the starting noise's standard deviation (a property if set_timesteps decides it)
    order: int  # model calls per step
    prediction_type: str
    schedule: Any

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> Any: ...  # with .prev_sample, .pred_original_sample


def check_slot(value, protocol: type, name: str) -> None:
    """Raise TypeError unless `value` has every attribute and method of `protocol`, naming what it lacks."""
    members = [n for n in (*getattr(protocol, "__annotations__", {}), *vars(protocol)) if not n.startswith("_")]
    missing = [n for n in dict.fromkeys(members) if not hasattr(value, n)]
    if missing:
        raise TypeError(f"{name} must fill the {protocol.__name__} slot (minildm.interfaces.{protocol.__name__}): "
                        f"{type(value).__name__} has no {', '.join(missing)}")
