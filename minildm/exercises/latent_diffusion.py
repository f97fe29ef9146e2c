"""Exercises of notebook 06, diffusion in latent space: z_0 = s · E(x) on the way in, x = D(z_0 / s) on the way out.

Notation as in ldm.py: E and D the autoencoder's encoder and decoder, q(z | x) = N(μ, σ²) the posterior, s the
scaling factor (sections 4.3.2 and D.1), images in [-1, 1] for the autoencoder and in [0, 1] (or 0 .. 255) to look at.
Each solution below is the code of the notebook's solution cell (between # BEGIN SOLUTION and # END SOLUTION);
each Mistake is a wrong answer students write, with the hint it earns.
"""

from __future__ import annotations

import functools

import torch

from ..autoencoder import AutoencoderConfig, AutoencoderKL
from ..ldm import LatentDiffusion
from ..schedule import NoiseSchedule
from ..text import TextEncoder
from ..unet import UNet2DConditionModel, UNetConfig
from .core import Exercise, Mistake

SOURCE_LDM = "Rombach et al. 2022 (arXiv:2112.10752)"
SCALING_FACTORS = (0.18215, 2.5)  # seed 0: Stable Diffusion's (latents with std > 1); seed 1: latents with std < 1


# ---- z_0 = s · E(x) --------------------------------------------------------------------------------------------------


def encode_to_latents(mean, std, noise, scaling_factor):
    # BEGIN SOLUTION
    z = mean + std * noise  # a sample of the posterior q(z | x): z = μ + σ ε
    return scaling_factor * z  # z_0 = s · E(x): the latents the diffusion model trains on
    # END SOLUTION


def _encode_cases(seed):
    g = torch.Generator().manual_seed(400 + seed)
    cases = []
    for shape, scaling_factor in (((3, 4, 5, 2), SCALING_FACTORS[seed]), ((2, 3, 1, 4), 0.7 + seed)):
        mean = torch.randn(shape, generator=g, dtype=torch.float64) * 3
        std = torch.exp(torch.randn(shape, generator=g, dtype=torch.float64) - 1)  # σ > 0, mostly below 1
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        cases.append({"mean": mean, "std": std, "noise": noise, "scaling_factor": scaling_factor})
    return cases


ENCODE_TO_LATENTS = Exercise(
    name="encode_to_latents", notebook="06_latent_diffusion",
    task="encode_to_latents(mean, std, noise, scaling_factor) -> z_0 (B, c, h, w): the scaled latents of a batch "
         "of images, from their posterior's mean μ and std σ (B, c, h, w) and the noise ε, as train_ldm makes them.",
    source=f"{SOURCE_LDM}, section 3.2 (the diffusion model learns on z = E(x), eq. (2)) and sections 4.3.2, D.1 (the "
           "latents rescaled to unit variance: z_0 = s · z)",
    solution=encode_to_latents, cases=_encode_cases,  # LatentDiffusion.encode_images gives the same (own tests)
    mistakes=(
        Mistake("the scaling factor is missing: the diffusion model trains on z_0 = s · (μ + σ ε)",
                lambda mean, std, noise, scaling_factor: mean + std * noise),
        Mistake("that divides by the scaling factor: multiply, z_0 = s · (μ + σ ε) (dividing undoes it, when "
                "decoding)",
                lambda mean, std, noise, scaling_factor: (mean + std * noise) / scaling_factor),
        Mistake("σ ε is missing: that is s · μ, the posterior's mode; the training latents are samples, s · (μ + σ ε)",
                lambda mean, std, noise, scaling_factor: scaling_factor * mean),
        Mistake("only the mean is scaled: scale the whole sample, s · (μ + σ ε)",
                lambda mean, std, noise, scaling_factor: scaling_factor * mean + std * noise),
    ),
)


# ---- x = D(z_0 / s) --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=len(SCALING_FACTORS))
def _tiny_ldm(seed: int) -> LatentDiffusion:
    """A tiny float64 LDM (f = 2, 4 latent channels, 3 image channels) with scaling factor SCALING_FACTORS[seed].
    Its decoder's last layer is made larger than at initialisation, so that some pixels fall outside [-1, 1]."""
    with torch.random.fork_rng(devices=[]):  # the student's random numbers stay as they were
        torch.manual_seed(500 + seed)
        autoencoder = AutoencoderKL(AutoencoderConfig(in_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                                      norm_num_groups=4, scaling_factor=SCALING_FACTORS[seed]))
        with torch.no_grad():
            autoencoder.decoder.conv_out.weight.mul_(2.5)
        conditioner = TextEncoder.from_captions(["a tiny model"], hidden_size=8, num_layers=0, num_heads=1)
        backbone = UNet2DConditionModel(UNetConfig(block_out_channels=(8,), attention_levels=(False,),
                                                   cross_attention_dim=8, attention_head_dim=8, norm_num_groups=4))
        ldm = LatentDiffusion(autoencoder, backbone, NoiseSchedule(), conditioner, image_size=8)
    return ldm.double().eval().requires_grad_(False)


class _Decoder:
    """The tiny LDM's autoencoder.decode, as the cases pass it (a failing check prints its repr)."""

    def __init__(self, ldm: LatentDiffusion):
        self.ldm = ldm

    def __call__(self, latents):
        return self.ldm.first_stage.decode(latents)

    def __repr__(self):
        return "autoencoder.decode"


def _decode_cases(seed):
    ldm = _tiny_ldm(seed)
    g = torch.Generator().manual_seed(600 + seed)
    return [{"latents": torch.randn(shape, generator=g, dtype=torch.float64),  # like a sampler's z_0: std about 1
             "scaling_factor": ldm.first_stage.scaling_factor, "decoder": _Decoder(ldm)}
            for shape in ((2, 4, 3, 5), (5, 4, 2, 3))]  # images (2, 3, 6, 10) and (5, 3, 4, 6)


def decode_latents(latents, scaling_factor, decoder):
    # BEGIN SOLUTION
    images = decoder(latents / scaling_factor)  # x = D(z_0 / s): the decoder knows unscaled latents; (B, C, H, W)
    return ((images + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1], the range images are shown in
    # END SOLUTION


DECODE_LATENTS = Exercise(
    name="decode_latents", notebook="06_latent_diffusion",
    task="decode_latents(latents, scaling_factor, decoder) -> images (B, C, H, W) in [0, 1]: the sampler's scaled "
         "latents z_0 (B, c, h, w) through the decoder (a function, the autoencoder's decode, which gives [-1, 1]).",
    source=f"{SOURCE_LDM}, section 3.2 (a sample of p(z) goes to image space in one pass through D) and sections "
           "4.3.2, D.1 (the latents were scaled by s: the decoder gets z_0 / s)",
    solution=decode_latents, cases=_decode_cases,
    reference=lambda latents, scaling_factor, decoder: decoder.ldm.decode_latents(latents),
    mistakes=(
        Mistake("the latents are not unscaled: the sampler gives z_0 = s · z, the decoder wants z = z_0 / s",
                lambda latents, scaling_factor, decoder: ((decoder(latents) + 1) / 2).clamp(0, 1)),
        Mistake("that multiplies by the scaling factor again: undo it, decoder(latents / scaling_factor)",
                lambda latents, scaling_factor, decoder: ((decoder(latents * scaling_factor) + 1) / 2).clamp(0, 1)),
        Mistake("the decoder gives [-1, 1]: map it to [0, 1] with (x + 1) / 2 before clamping",
                lambda latents, scaling_factor, decoder: decoder(latents / scaling_factor).clamp(0, 1)),
        Mistake("the clamp is missing: a decoder's output can leave [-1, 1]; clamp the images to [0, 1]",
                lambda latents, scaling_factor, decoder: (decoder(latents / scaling_factor) + 1) / 2),
    ),
)


# ---- debug this: the end of a sampling loop ------------------------------------------------------------------------


def latents_to_uint8(latents, scaling_factor, decoder):
    # BEGIN SOLUTION
    images = decoder(latents / scaling_factor)  # undo z_0 = s · z before decoding: (B, c, h, w) -> (B, C, H, W)
    images = ((images + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1]
    images = (images * 255).round().to(torch.uint8)  # [0, 1] -> 0 .. 255, to the nearest level
    return images.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C), the layout of PIL and matplotlib
    # END SOLUTION


LATENTS_TO_UINT8_STUB = """\
images = decoder(latents)  # (B, c, h, w) -> (B, C, H, W)
images = ((images + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1]
images = (images * 255).round().to(torch.uint8)  # [0, 1] -> 0 .. 255, to the nearest level
return images.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C), the layout of PIL and matplotlib"""


def _to_uint8(images, rounding=True, layout="permute"):
    images = ((images + 1) / 2).clamp(0, 1) * 255
    images = (images.round() if rounding else images).to(torch.uint8)
    B, C, H, W = images.shape
    return {"permute": images.permute(0, 2, 3, 1), "none": images, "reshape": images.reshape(B, H, W, C)}[layout]


LATENTS_TO_UINT8 = Exercise(
    name="latents_to_uint8", notebook="06_latent_diffusion",
    task="Debug this: latents_to_uint8(latents, scaling_factor, decoder) -> images (B, H, W, C) uint8 in "
         "0 .. 255 ends a sampling loop: it turns the sampler's z_0 (B, c, h, w) into pictures to save. As written, "
         "its pictures come out faint and washed-out (with another autoencoder, saturated), though the model trained "
         "well. Find the bug and repair it.",
    source=f"{SOURCE_LDM}, sections 4.3.2 and D.1: the diffusion model works on z_0 = s · E(x), so its samples are "
           "decoded as D(z_0 / s)",
    solution=latents_to_uint8, cases=_decode_cases, stub=LATENTS_TO_UINT8_STUB,
    mistakes=(
        Mistake("this is still the code you started from: on what scale did the diffusion model learn its latents, "
                "and on what scale does the decoder expect them?",
                lambda latents, scaling_factor, decoder: _to_uint8(decoder(latents))),
        Mistake("that multiplies by the scaling factor again: undo it, decoder(latents / scaling_factor)",
                lambda latents, scaling_factor, decoder: _to_uint8(decoder(latents * scaling_factor))),
        Mistake(".to(torch.uint8) truncates (254.9 becomes 254): round first, then convert",
                lambda latents, scaling_factor, decoder: _to_uint8(decoder(latents / scaling_factor), rounding=False)),
        Mistake("the layout: return (B, H, W, C), channels last, with images.permute(0, 2, 3, 1)",
                lambda latents, scaling_factor, decoder: _to_uint8(decoder(latents / scaling_factor), layout="none")),
        Mistake("reshape keeps the memory order, so the numbers land in the wrong places: move the channel axis with "
                "permute(0, 2, 3, 1)",
                lambda latents, scaling_factor, decoder: _to_uint8(decoder(latents / scaling_factor),
                                                                   layout="reshape")),
    ),
)


EXERCISES = [ENCODE_TO_LATENTS, DECODE_LATENTS, LATENTS_TO_UINT8]
