"""LatentDiffusion: the autoencoder, the text encoder, the UNet and the noise schedule, tied together.

Training (Rombach et al. 2022, eq. 2, conditional form eq. 3):

    L_LDM = E_{E(x), y, ε ~ N(0, I), t} [ || ε - ε_θ(z_t, t, τ_θ(y)) ||² ],
    z_0 = scaling_factor · E(x),   z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε

with the autoencoder frozen. A caption is replaced by "" with probability `caption_dropout`, so the
same network also learns the unconditional prediction ε_θ(z_t, t, τ_θ("")).

Sampling with classifier-free guidance (Ho & Salimans 2022, eq. 6, in the ε form used by SD):

    ε̂ = ε_θ(z_t, t, τ("")) + s · (ε_θ(z_t, t, τ(y)) - ε_θ(z_t, t, τ("")))

s = 1 is the plain conditional model; s > 1 trades diversity for prompt adherence.

With `autoencoder=None` the same model diffuses pixels directly (z_0 = x, the paper's LDM-1, f = 1):
the baseline that shows what the latent space buys. The loop is
`generate()`: start from z_T ~ N(0, I), call the sampler's `step` once per timestep, decode
D(z_0 / scaling_factor). It is short on purpose: copy it and change it.

This is the one module that sees models and samplers together (with train.py and the command line).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_directory, atomic_write_json, read_json, readable_directory
from .autoencoder import AutoencoderConfig, AutoencoderKL
from .checkpoint import load_module_weights, save_weights
from .checks import check_like_weights
from .samplers import DDIMSampler, DDPMSampler
from .schedule import NoiseSchedule
from .text import TextEncoder, TextEncoderConfig, Tokenizer
from .unet import UNet2DConditionModel, UNetConfig

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = ("ddim", "ddpm")
FILES = ("config.json", "vocab.json", "autoencoder.safetensors", "unet.safetensors", "text_encoder.safetensors")


@dataclass
class GenerationOutput:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    timesteps: list[int]  # the T timesteps visited, high to low
    latents: torch.Tensor  # (T + 1, B, c, h, w): z_T, ..., z_0 (scaled latents)
    pred_original_latents: torch.Tensor  # (T, B, c, h, w): the predicted z_0 at each step


class LatentDiffusion(nn.Module):
    def __init__(
        self,
        autoencoder: AutoencoderKL | None,
        unet: UNet2DConditionModel,
        schedule: NoiseSchedule,
        text_encoder: TextEncoder,
        prediction_type: str = "epsilon",
        image_size: int = 32,
    ):
        super().__init__()
        for name, value, kind in (("autoencoder", autoencoder, AutoencoderKL), ("unet", unet, UNet2DConditionModel),
                                  ("schedule", schedule, NoiseSchedule), ("text_encoder", text_encoder, TextEncoder)):
            if not isinstance(value, kind) and not (name == "autoencoder" and value is None):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        if autoencoder is not None and unet.config.in_channels != autoencoder.config.latent_channels:
            raise ValueError(f"the UNet takes {unet.config.in_channels} channels but the autoencoder makes "
                             f"{autoencoder.config.latent_channels}-channel latents")
        if autoencoder is None and unet.config.in_channels != unet.config.out_channels:
            raise ValueError(f"in pixel space (autoencoder=None) the UNet must output as many channels as it takes, "
                             f"got in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}")
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(f"the UNet's cross_attention_dim={unet.config.cross_attention_dim} must equal the text "
                             f"encoder's hidden_size={text_encoder.config.hidden_size}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        f = autoencoder.config.downsampling_factor if autoencoder is not None else 1
        if image_size % (f * 2 ** (len(unet.config.block_out_channels) - 1)):
            raise ValueError(f"image_size={image_size} must divide by f={f} times the UNet's total downsampling")
        # The first stage is trained separately, then frozen; None means pixel space.
        self.autoencoder = autoencoder.requires_grad_(False) if autoencoder is not None else None
        self.unet = unet
        self.text_encoder = text_encoder
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.image_size = image_size

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        if self.autoencoder is None:
            return (self.unet.config.in_channels, self.image_size, self.image_size)
        h = self.image_size // self.autoencoder.config.downsampling_factor
        return (self.autoencoder.config.latent_channels, h, h)

    # ---- the two stages' interfaces ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents z_0 = scaling_factor · E(x), (B, c, h, w)."""
        if self.autoencoder is None:
            return images  # pixel space: z_0 = x
        return self.autoencoder.encode(images).sample(generator) * self.autoencoder.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, 3, H, W) in [0, 1]."""
        if self.autoencoder is None:
            images = latents
        else:
            images = self.autoencoder.decode(latents / self.autoencoder.scaling_factor)  # in [-1, 1], roughly
        return ((images + 1) / 2).clamp(0, 1)

    # ---- training ---------------------------------------------------------------------------------------------

    def latent_training_loss(self, latents: torch.Tensor, captions: list[str], caption_dropout: float = 0.1,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. (3) on scaled latents z_0 (B, c, h, w) — precompute them once when the autoencoder is frozen."""
        self._check_batch(latents, "latents", self.unet, 1, captions, caption_dropout, generator)
        B, device = latents.shape[0], latents.device
        drop = torch.rand(B, generator=generator) < caption_dropout
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        t = torch.randint(0, self.schedule.num_train_timesteps, (B,), generator=generator).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)  # ε
        noisy = self.schedule.add_noise(latents, noise, t)  # z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε
        model_output = self.unet(noisy, t, self.text_encoder.encode(captions))
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.schedule.get_velocity(latents, noise, t)  # v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z_0
        else:
            target = latents
        return F.mse_loss(model_output.float(), target.float())

    def training_loss(self, images: torch.Tensor, captions: list[str], caption_dropout: float = 0.1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. (3) from images (B, 3, H, W) in [-1, 1]: encode with the frozen autoencoder, then as above."""
        first_stage = self.autoencoder if self.autoencoder is not None else self.unet
        f = self.autoencoder.config.downsampling_factor if self.autoencoder is not None else 1
        self._check_batch(images, "images", first_stage, f, captions, caption_dropout, generator)
        return self.latent_training_loss(self.encode_images(images, generator), captions, caption_dropout, generator)

    def _check_batch(self, batch, name: str, first_module: nn.Module, f: int, captions, caption_dropout,
                     generator) -> None:
        """The training losses' arguments: a batch (B, C, H, W) that `first_module` (the autoencoder, or the UNet)
        takes, with H and W multiples of f times the UNet's downsampling; a caption per item; a dropout in [0, 1]."""
        weight = next(first_module.parameters())
        channels = (first_module.config.in_channels if isinstance(first_module, AutoencoderKL)
                    else self.unet.config.in_channels)
        factor = f * 2 ** (len(self.unet.config.block_out_channels) - 1)
        check_like_weights(batch, name, weight)
        if batch.ndim != 4 or batch.shape[1] != channels or 0 in batch.shape or batch.shape[2] % factor \
                or batch.shape[3] % factor:
            raise ValueError(f"{name} must have shape (B, {channels}, H, W) with B >= 1 and H, W multiples of "
                             f"{factor}, got {tuple(batch.shape)}")
        if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be a list of strings, got {captions!r:.80}")
        if len(captions) != len(batch):
            raise ValueError(f"got {len(batch)} {name} but {len(captions)} captions")
        if not isinstance(caption_dropout, numbers.Real) or not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    # ---- sampling ---------------------------------------------------------------------------------------------

    def make_sampler(self, sampler: str = "ddim", eta: float = 0.0):
        if sampler == "ddim":
            return DDIMSampler(self.schedule, eta=eta, prediction_type=self.prediction_type)
        if sampler == "ddpm":
            return DDPMSampler(self.schedule, prediction_type=self.prediction_type)
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")

    def guided_model_output(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                            uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance: out_u + s (out_c - out_u), both from one batched UNet call. t: one timestep."""
        if guidance_scale == 1.0:  # the guided output is exactly the conditional one: skip half the work
            return self.unet(latents, t, cond)
        both = self.unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond]))  # (2B, c, h, w)
        out_uncond, out_cond = both.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | str,
        num_inference_steps: int = 50,
        sampler: str = "ddim",
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        return_intermediates: bool = False,
        max_batch_size: int = 256,
        callback=None,
        progress: bool = False,
    ) -> torch.Tensor | GenerationOutput:
        """Images (B, 3, H, W) in [0, 1] for `prompts`; with return_intermediates, a GenerationOutput.

        The initial noise comes from `generator` on the CPU, so one seed gives the same images on any CPU
        (GPU kernels may differ in the last bits). Requests above `max_batch_size` run in chunks, one after
        the other, drawing from the same generator. `callback(step_index, timestep, latents)` runs after
        every step.
        """
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0 or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}")
        prompts = list(prompts)
        if not isinstance(guidance_scale, numbers.Real) or not 0 <= guidance_scale < math.inf:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a function (step_index, timestep, latents) or None, "
                            f"got {type(callback).__name__}")
        if len(prompts) > max_batch_size:
            chunks = [self.generate(prompts[i : i + max_batch_size], num_inference_steps, sampler, guidance_scale,
                                    eta, generator, return_intermediates, max_batch_size, callback, progress)
                      for i in range(0, len(prompts), max_batch_size)]
            if not return_intermediates:
                return torch.cat(chunks)
            return GenerationOutput(torch.cat([c.images for c in chunks]), chunks[0].timesteps,
                                    torch.cat([c.latents for c in chunks], dim=1),
                                    torch.cat([c.pred_original_latents for c in chunks], dim=1))

        was_training = self.training
        if any(m.training for m in (self, self.unet, self.text_encoder, self.autoencoder) if m is not None):
            self.eval()  # no dropout while sampling; eval() visits every module (~1 ms): only when needed
        scheduler = self.make_sampler(sampler, eta)
        scheduler.set_timesteps(num_inference_steps)
        cond = self.text_encoder.encode(prompts)  # (B, L, D)
        # The empty prompt's states, (B, L, D); guidance 1 is the conditional model alone and needs none.
        uncond = self.text_encoder.encode([""] * len(prompts)) if guidance_scale != 1.0 else None
        shape = (len(prompts), *self.latent_shape)
        latents = torch.randn(shape, generator=generator).to(self.device)  # z_T ~ N(0, I)
        trajectory, predictions = [latents], []
        timesteps_here = scheduler.timesteps.to(self.device)  # moved once: a copy per step would wait on a GPU
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress)):
            model_output = self.guided_model_output(latents, timesteps_here[i], cond, uncond, guidance_scale)
            out = scheduler.step(model_output, t, latents, generator=generator)
            latents = out.prev_sample
            if return_intermediates:
                trajectory.append(latents)
                predictions.append(out.pred_original_sample)
            if callback is not None:
                callback(i, int(t), latents)
        images = self.decode_latents(latents)
        if was_training:
            self.train()
        if not return_intermediates:
            return images
        return GenerationOutput(images, [int(t) for t in scheduler.timesteps], torch.stack(trajectory),
                                torch.stack(predictions))

    @torch.no_grad()
    def cross_attention_maps(self, prompt: str, num_inference_steps: int = 50, guidance_scale: float = 3.0,
                             generator: torch.Generator | None = None):
        """Where each word of `prompt` looks: returns (image (3, H, W), maps (L, h, w), tokens).

        maps[j] is the attention probability of token j, averaged over heads, layers and steps, at every
        latent position (layers with coarser maps are upsampled to the latent size h x w).
        """
        modules = list(self.unet.cross_attention_modules().values())
        h, w = self.latent_shape[1:]
        total = torch.zeros(self.text_encoder.config.max_length, h, w)

        def collect(step, timestep, latents):
            for module in modules:
                probs = module.attention_probs[-1].mean(dim=0)  # conditional sample, mean over heads: (N, L)
                side = int(probs.shape[0] ** 0.5)
                maps = probs.T.reshape(-1, 1, side, side).float().cpu()  # (N, L) -> (L, 1, side, side)
                total.add_(F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[:, 0])

        for module in modules:
            module.store_attention_probs = True
        try:
            image = self.generate([prompt], num_inference_steps, "ddim", guidance_scale, generator=generator,
                                  callback=collect)[0]
        finally:
            for module in modules:
                module.store_attention_probs = False
                module.attention_probs = None
        tokens = self.text_encoder.tokenizer.tokenize(prompt)
        return image, total[: len(tokens)] / (len(modules) * num_inference_steps), tokens

    # ---- files ------------------------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        s = self.schedule
        tokenizer = self.text_encoder.tokenizer
        return {
            "format": "minildm.LatentDiffusion",
            "version": 1,
            "image_size": self.image_size,
            "prediction_type": self.prediction_type,
            "schedule": {"beta_schedule": s.beta_schedule, "num_train_timesteps": s.num_train_timesteps,
                         "beta_start": s.beta_start, "beta_end": s.beta_end},
            "autoencoder": asdict(self.autoencoder.config) if self.autoencoder is not None else None,
            "unet": asdict(self.unet.config),
            "text_encoder": asdict(self.text_encoder.config),
            "tokenizer": {"max_length": tokenizer.max_length},
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Weights as safetensors, config and vocabulary as JSON. The folder is replaced as a whole
        (checkpoint.atomic_directory): a crash leaves the old model or the new one, never a mix, and load()
        finds it."""
        with atomic_directory(directory) as folder:
            atomic_write_json(folder / "vocab.json", self.text_encoder.tokenizer.vocab)
            if self.autoencoder is not None:
                save_weights(self.autoencoder.state_dict(), folder / "autoencoder.safetensors")
            save_weights(self.unet.state_dict(), folder / "unet.safetensors")
            save_weights(self.text_encoder.state_dict(), folder / "text_encoder.safetensors")
            atomic_write_json(folder / "config.json", self.config_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> LatentDiffusion:
        """Rebuild from `save()`'s folder, checking every tensor's name, shape and dtype against the config."""
        directory = readable_directory(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no model folder at {directory}")
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} is not a minildm model: it has no config.json "
                                    f"(expected {', '.join(FILES)})")
        config = read_json(directory / "config.json")
        if not isinstance(config, dict) or config.get("format") != "minildm.LatentDiffusion":
            raise ValueError(f"{directory / 'config.json'} is not a minildm LatentDiffusion config")
        pixel_space = config.get("autoencoder", {}) is None
        expected = [name for name in FILES if not (pixel_space and name == "autoencoder.safetensors")]
        missing = [name for name in expected if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a complete minildm model: missing {', '.join(missing)} "
                                    f"(expected {', '.join(expected)})")
        try:
            tokenizer = Tokenizer(read_json(directory / "vocab.json"), config["tokenizer"]["max_length"])
            autoencoder = None if pixel_space else AutoencoderKL(AutoencoderConfig(**config["autoencoder"]))
            unet = UNet2DConditionModel(UNetConfig(**config["unet"]))
            text_encoder = TextEncoder(TextEncoderConfig(**config["text_encoder"]), tokenizer)
            schedule = NoiseSchedule(**config["schedule"])
            model = cls(autoencoder, unet, schedule, text_encoder, config["prediction_type"], config["image_size"])
        except (KeyError, TypeError, ValueError) as e:  # a field missing, unknown, of the wrong type or out of range
            raise ValueError(f"{directory / 'config.json'} (with vocab.json) does not describe a valid model: "
                             f"{type(e).__name__}: {e}") from e
        if autoencoder is not None:
            load_module_weights(autoencoder, directory / "autoencoder.safetensors")
        load_module_weights(unet, directory / "unet.safetensors")
        load_module_weights(text_encoder, directory / "text_encoder.safetensors")
        return model.to(device).eval()
