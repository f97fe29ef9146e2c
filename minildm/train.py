"""Training loops for the two stages: the autoencoder first, then the latent diffusion model.

Both loops are plain PyTorch: random batches drawn with a seeded `torch.Generator`, AdamW, gradient
clipping, a cosine learning-rate decay over the run, an exponential moving average (EMA) of the
weights for sampling, a tqdm progress bar, and a wall-clock budget (`max_minutes`) so a run fits a
lesson. On a GPU they use bf16 autocast. `checkpoint_dir` saves the full training state (weights,
EMA, optimizer, step, random-number state) every `checkpoint_every` steps, and `resume=True` picks it
up again. Everything is safetensors + JSON (checkpoint.py).

Stage two trains on precomputed latents: the autoencoder is frozen, so each image is encoded once
(its posterior mean and std kept), and every step draws z = mean + std · ε from them, scaled by the
scaling factor. That makes a latent training step cost a UNet call, nothing more.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .autoencoder import AutoencoderKL
from .checkpoint import atomic_write_json, load_module_weights, load_weights, read_json, save_weights
from .discriminator import PatchDiscriminator, generator_loss, hinge_discriminator_loss
from .ldm import LatentDiffusion


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else CUDA, then Apple's MPS, then the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class EMA:
    """θ_ema <- d θ_ema + (1 - d) θ, with d warmed up as min(decay, (1 + n) / (10 + n)) so short runs benefit."""

    def __init__(self, parameters: list[nn.Parameter], decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: list[nn.Parameter]) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, parameters):
            s.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, parameters: list[nn.Parameter]) -> None:
        for s, p in zip(self.shadow, parameters):
            p.copy_(s)


def cosine_lr(base_lr: float, progress: float, warmup: float = 0.02) -> float:
    """Linear warm-up over the first 2% of the run, then cosine decay to 10% of base_lr."""
    if progress < warmup:
        return base_lr * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ---- training state on disk --------------------------------------------------------------------------------


def save_training_state(directory, modules: dict[str, nn.Module], optimizer, ema: EMA | None,
                        generator: torch.Generator, step: int, history: dict) -> None:
    """Everything needed to continue bit for bit: weights, EMA, optimizer moments, step, RNG state."""
    directory = Path(directory)
    for name, module in modules.items():
        save_weights(module.state_dict(), directory / f"{name}.safetensors")
    if ema is not None:
        save_weights({str(i): s for i, s in enumerate(ema.shadow)}, directory / "ema.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"{i}.{key}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, state in opt["state"].items() for key, v in state.items()}
    tensors["rng"] = generator.get_state()
    save_weights(tensors, directory / "optimizer.safetensors")
    atomic_write_json(directory / "trainer.json", {
        "step": step, "param_groups": opt["param_groups"], "ema_updates": ema.num_updates if ema else 0,
        "history": history,
    })  # written last: a trainer.json on disk means the files it describes are there


def load_training_state(directory, modules: dict[str, nn.Module], optimizer, ema: EMA | None,
                        generator: torch.Generator) -> tuple[int, dict]:
    directory = Path(directory)
    meta = read_json(directory / "trainer.json")
    for name, module in modules.items():
        load_module_weights(module, directory / f"{name}.safetensors")
    if ema is not None:
        shadow = load_weights(directory / "ema.safetensors")
        ema.shadow = [shadow[str(i)].to(s.device) for i, s in enumerate(ema.shadow)]
        ema.num_updates = meta["ema_updates"]
    tensors = load_weights(directory / "optimizer.safetensors")
    generator.set_state(tensors.pop("rng"))
    state: dict = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["history"]


# ---- the loop both stages share ------------------------------------------------------------------------------


def _run(name, loss_fn, parameters, modules, steps, lr, max_minutes, grad_clip, ema, device, seed,
         checkpoint_dir, checkpoint_every, resume, callback, callback_every, progress):
    """One optimisation loop: `loss_fn(generator) -> (loss, parts)` gives each step's loss."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    history: dict[str, list[float]] = {"loss": []}
    step = 0
    if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / "trainer.json").is_file():
        step, history = load_training_state(checkpoint_dir, modules, optimizer, ema, generator)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    budget = max_minutes * 60 if max_minutes is not None else math.inf
    start = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc=name, disable=not progress)
    while step < steps:
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, max(step / steps, elapsed / budget))
        with autocast:
            loss, parts = loss_fn(generator)
        loss_value = loss.item()  # one device sync per step, reused below
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{name}: the loss is {loss_value} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(parameters)
        step += 1
        history["loss"].append(loss_value)
        for key, value in parts.items():
            history.setdefault(key, []).append(float(value))
        bar.update(1)
        if budget < math.inf:  # with a time budget, the step count is only an upper bound: show the time left
            bar.set_postfix(loss=f"{loss_value:.4f}", left=f"{max(0.0, budget - elapsed) / 60:.1f} min")
        else:
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0:
            save_training_state(checkpoint_dir, modules, optimizer, ema, generator, step, history)
        if callback is not None and callback_every and step % callback_every == 0:
            callback(step)
    bar.close()
    history["seconds"] = [time.perf_counter() - start]
    history["steps"] = [step]
    if checkpoint_dir is not None:
        save_training_state(checkpoint_dir, modules, optimizer, ema, generator, step, history)
    return history


def train_autoencoder(
    autoencoder: AutoencoderKL,
    images: torch.Tensor,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    max_minutes: float | None = None,
    grad_clip: float = 1.0,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    discriminator: PatchDiscriminator | None = None,
    discriminator_weight: float = 0.1,
    discriminator_start: int = 0,
    callback=None,
    callback_every: int | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train the autoencoder on images (N, C, H, W) in [-1, 1]; then estimate its scaling factor.

    With a `discriminator` (discriminator.py), from step `discriminator_start` on each step also trains
    it on real vs reconstructed images and adds `discriminator_weight` times the adversarial loss. Its
    weights are checkpointed; its optimizer restarts on resume, so that resume is not bit-exact.

    Returns the history: per-step "loss", "reconstruction" (L1) and "kl" (and "discriminator",
    "adversarial" once the discriminator is on), plus "seconds" and "steps".
    """
    if images.ndim != 4 or images.shape[1] != autoencoder.config.in_channels:
        raise ValueError(f"images must have shape (N, {autoencoder.config.in_channels}, H, W), "
                         f"got {tuple(images.shape)}")
    device = pick_device(device)
    autoencoder.to(device).train().requires_grad_(True)  # a LatentDiffusion freezes it; here it learns
    parameters = list(autoencoder.parameters())
    modules: dict[str, nn.Module] = {"autoencoder": autoencoder}
    if discriminator is not None:
        discriminator.to(device).train()
        d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        modules["discriminator"] = discriminator
    step = 0

    def loss_fn(generator):
        nonlocal step
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[idx].to(device)
        loss, reconstruction, parts = autoencoder.training_loss(x, kl_weight, generator=generator)
        if discriminator is not None and step >= discriminator_start:
            d_loss = hinge_discriminator_loss(discriminator(x), discriminator(reconstruction.detach()))
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optimizer.step()
            g_loss = generator_loss(discriminator(reconstruction))
            loss = loss + discriminator_weight * g_loss
            parts = {**parts, "discriminator": d_loss.detach(), "adversarial": g_loss.detach()}
        step += 1
        return loss, parts

    history = _run("autoencoder", loss_fn, parameters, modules, steps, lr, max_minutes, grad_clip, None, device,
                   seed, checkpoint_dir, checkpoint_every, resume, callback, callback_every, progress)
    autoencoder.eval()
    autoencoder.estimate_scaling_factor(images[:2048].to(device))
    return history


@torch.no_grad()
def encode_dataset(ldm: LatentDiffusion, images: torch.Tensor, batch_size: int = 256):
    """Posterior mean and std (N, c, h, w) of every image, computed once for the frozen autoencoder."""
    if ldm.autoencoder is None:  # pixel space: z_0 = x exactly
        images = images.to(ldm.device)
        return images, torch.zeros_like(images)
    ldm.autoencoder.eval()
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = ldm.autoencoder.encode(images[i : i + batch_size].to(ldm.device))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_ldm(
    ldm: LatentDiffusion,
    images: torch.Tensor,
    captions: list[str],
    steps: int = 5000,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    max_minutes: float | None = None,
    grad_clip: float = 1.0,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    callback=None,
    callback_every: int | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train the UNet and the text encoder on (image, caption) pairs; the autoencoder stays frozen.

    At the end the EMA weights are copied into the model (they sample better). `callback(step)` runs
    every `callback_every` steps, e.g. to draw samples.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    device = pick_device(device)
    ldm.to(device)
    means, stds = encode_dataset(ldm, images)
    scale = ldm.autoencoder.scaling_factor if ldm.autoencoder is not None else 1.0
    ldm.unet.train()
    ldm.text_encoder.train()
    parameters = [p for p in [*ldm.unet.parameters(), *ldm.text_encoder.parameters()] if p.requires_grad]
    ema = EMA(parameters, ema_decay) if ema_decay > 0 else None

    def loss_fn(generator):
        idx = torch.randint(0, len(means), (batch_size,), generator=generator)
        noise = torch.randn(means[idx].shape, generator=generator).to(device)
        latents = (means[idx] + stds[idx] * noise) * scale  # z_0 = scaling_factor · (μ + σ ε)
        loss = ldm.latent_training_loss(latents, [captions[i] for i in idx.tolist()], caption_dropout, generator)
        return loss, {}

    modules = {"unet": ldm.unet, "text_encoder": ldm.text_encoder}
    history = _run("latent diffusion", loss_fn, parameters, modules, steps, lr, max_minutes, grad_clip, ema,
                   device, seed, checkpoint_dir, checkpoint_every, resume, callback, callback_every, progress)
    if ema is not None:
        ema.copy_to(parameters)
    ldm.eval()
    return history
