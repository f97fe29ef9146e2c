"""Training loops for the two stages: the autoencoder first, then the latent diffusion model.

Both loops are plain PyTorch: random batches drawn with a seeded `torch.Generator`, AdamW, gradient
clipping, a cosine learning-rate decay over the run, an exponential moving average (EMA) of the
weights for sampling, a tqdm progress bar, and a wall-clock budget (`max_minutes`) so a run fits a
lesson. On a GPU they use bf16 autocast. `checkpoint_dir` saves the full training state (weights,
EMA, optimizer, step, random-number state) every `checkpoint_every` steps, and `resume=True` picks it
up again (training_state.py). Everything is safetensors + JSON (checkpoint.py). A step whose loss or
gradient is not finite stops the run before it changes anything, naming the step and the tensor (or, with
nan_policy="skip", is left out and counted).

Stage two trains on precomputed latents: the autoencoder is frozen, so each image is encoded once
(its posterior mean and std kept), and every step draws z = mean + std · ε from them, scaled by the
scaling factor. That makes a latent training step cost a UNet call, nothing more.
"""

from __future__ import annotations

import math
import numbers
import os
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import readable_directory
from .autoencoder import AutoencoderKL
from .discriminator import PatchDiscriminator, generator_loss, hinge_discriminator_loss
from .ldm import LatentDiffusion
from .training_state import load_training_state, save_training_state


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


# ---- the loop both stages share ------------------------------------------------------------------------------

NAN_POLICIES = ("raise", "skip")


def _check_training_arguments(steps, batch_size, lr, grad_clip, max_minutes, checkpoint_every, callback_every,
                              nan_policy) -> None:
    """The settings both training functions share, checked before any work starts."""
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("checkpoint_every", checkpoint_every), ("callback_every", callback_every)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    for name, value in (("lr", lr), ("grad_clip", grad_clip)):
        if not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if max_minutes is not None and (not isinstance(max_minutes, numbers.Real) or not max_minutes > 0):
        raise ValueError(f"max_minutes must be None or a positive number, got {max_minutes!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")


def _check_images(images, channels: int) -> None:
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a tensor (N, {channels}, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != channels or len(images) == 0:
        raise ValueError(f"images must have shape (N, {channels}, H, W) with N >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")


def _run(name, loss_fn, parameters, modules, steps, lr, max_minutes, grad_clip, ema, device, seed,
         checkpoint_dir, checkpoint_every, resume, callback, callback_every, progress, nan_policy="raise",
         extra_optimizers=None):
    """One optimisation loop. `loss_fn(generator, step) -> (loss, parts, extra_losses)` gives each step's loss
    for `parameters`, the parts to log, and a loss for each of `extra_optimizers` (by name) that trains now."""
    extra_optimizers = extra_optimizers if extra_optimizers is not None else {}
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    parameter_names = {id(p): f"{module_name}.{n}" for module_name, module in modules.items()
                       for n, p in module.named_parameters()}
    history: dict[str, list[float]] = {"loss": []}
    step = 0
    if resume and checkpoint_dir is not None and (readable_directory(checkpoint_dir) / "trainer.json").is_file():
        step, history = load_training_state(checkpoint_dir, modules, optimizer, ema, generator, extra_optimizers)
    saved_step = step if step > 0 else None  # the step of the checkpoint on disk, named if a step goes wrong
    history.setdefault("skipped_steps", [])
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
            loss, parts, extra_losses = loss_fn(generator, step)
        # Each loss fills the gradients of its own optimizer's parameters only (`inputs=`): the autoencoder's
        # adversarial term must not train the discriminator. Every loss and every gradient's norm is checked.
        learners = [("loss", optimizer, loss)]
        learners += [(f"{key} loss", extra_optimizers[key], extra_loss) for key, extra_loss in extra_losses.items()]
        checks: dict[str, torch.Tensor] = {}
        for label, learner, learner_loss in learners:
            learner_parameters = [p for group in learner.param_groups for p in group["params"]]
            learner.zero_grad(set_to_none=True)
            learner_loss.backward(inputs=learner_parameters)
            checks[f"the {label}"] = learner_loss
            checks.update({f"the gradient of {parameter_names[id(p)]}": p.grad.norm()
                           for p in learner_parameters if p.grad is not None})
        values = torch.stack([v.detach().float() for v in [*checks.values(), *parts.values()]]).tolist()  # one sync
        problem = next((f"{label} is {v}" for label, v in zip(checks, values) if not math.isfinite(v)), None)
        if problem is not None:
            if nan_policy == "raise":
                bar.close()
                kept = "" if checkpoint_dir is None else (
                    f"; {checkpoint_dir} keeps the checkpoint of step {saved_step}" if saved_step is not None
                    else f"; no checkpoint was saved to {checkpoint_dir} yet")
                raise FloatingPointError(f"{name}: {problem} at step {step}{kept}. Lower the learning rate, check "
                                         f"the data for NaN, or pass nan_policy='skip' to skip such steps")
            history["skipped_steps"].append(step)  # "skip": the weights, optimizer and EMA stay as they were
            step += 1
            bar.update(1)
            bar.set_postfix(skipped=len(history["skipped_steps"]))
            continue
        # Gradient clipping, as clip_grad_norm_ does it: scale the gradients so that their joint L2 norm is at
        # most grad_clip. The norms of `parameters`' gradients follow the loss in `values`.
        gradient_norms = values[1 : 1 + sum(p.grad is not None for p in parameters)]
        total_norm = math.sqrt(sum(norm * norm for norm in gradient_norms))
        if total_norm > grad_clip:
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(grad_clip / (total_norm + 1e-6))
        for _, learner, _ in learners:
            learner.step()
        if ema is not None:
            ema.update(parameters)
        step += 1
        loss_value = values[0]
        history["loss"].append(loss_value)
        for key, value in zip(parts, values[len(checks) :]):
            history.setdefault(key, []).append(value)
        bar.update(1)
        postfix = {"loss": f"{loss_value:.4f}"}
        if budget < math.inf:  # with a time budget, the step count is only an upper bound: show the time left
            postfix["left"] = f"{max(0.0, budget - elapsed) / 60:.1f} min"
        if history["skipped_steps"]:
            postfix["skipped"] = len(history["skipped_steps"])
        bar.set_postfix(postfix)
        if checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0:
            save_training_state(checkpoint_dir, modules, optimizer, ema, generator, step, history, extra_optimizers)
            saved_step = step
        if callback is not None and callback_every and step % callback_every == 0:
            began = time.perf_counter()
            callback(step)
            start += time.perf_counter() - began  # the budget is for training: time in callbacks is not counted
    bar.close()
    history["seconds"] = [time.perf_counter() - start]
    history["steps"] = [step]
    if checkpoint_dir is not None:
        save_training_state(checkpoint_dir, modules, optimizer, ema, generator, step, history, extra_optimizers)
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
    nan_policy: str = "raise",
) -> dict[str, list[float]]:
    """Train the autoencoder on images (N, C, H, W) in [-1, 1]; then estimate its scaling factor.

    With a `discriminator` (discriminator.py), from step `discriminator_start` on each step also trains
    it on real vs reconstructed images and adds `discriminator_weight` times the adversarial loss. Its
    weights and its optimizer are checkpointed too, so resume stays bit-exact.

    A NaN or infinite loss or gradient stops training with a FloatingPointError that names the step and
    the tensor (`nan_policy="raise"`), before the bad step changes anything; `nan_policy="skip"` leaves
    that step out and goes on, listing it in history["skipped_steps"].

    Returns the history: per-step "loss", "reconstruction" (L1) and "kl" (and "discriminator",
    "adversarial" once the discriminator is on), plus "skipped_steps", "seconds" and "steps".
    """
    if not isinstance(autoencoder, AutoencoderKL):
        raise TypeError(f"autoencoder must be an AutoencoderKL, got {type(autoencoder).__name__}")
    _check_images(images, autoencoder.config.in_channels)
    _check_training_arguments(steps, batch_size, lr, grad_clip, max_minutes, checkpoint_every, callback_every,
                              nan_policy)
    if not isinstance(kl_weight, numbers.Real) or not 0 <= kl_weight < math.inf:
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    if discriminator is not None and not isinstance(discriminator, PatchDiscriminator):
        raise TypeError(f"discriminator must be a PatchDiscriminator or None, got {type(discriminator).__name__}")
    if not isinstance(discriminator_weight, numbers.Real) or not 0 <= discriminator_weight < math.inf:
        raise ValueError(f"discriminator_weight must be a finite number >= 0, got {discriminator_weight!r}")
    if not isinstance(discriminator_start, numbers.Integral) or discriminator_start < 0:
        raise ValueError(f"discriminator_start must be an integer >= 0, got {discriminator_start!r}")
    device = pick_device(device)
    autoencoder.to(device).train().requires_grad_(True)  # a LatentDiffusion freezes it; here it learns
    parameters = list(autoencoder.parameters())
    modules: dict[str, nn.Module] = {"autoencoder": autoencoder}
    extra_optimizers = {}
    if discriminator is not None:
        discriminator.to(device).train()
        modules["discriminator"] = discriminator
        extra_optimizers["discriminator"] = torch.optim.AdamW(discriminator.parameters(), lr=lr, betas=(0.5, 0.9))

    def loss_fn(generator, step):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[idx].to(device)
        loss, reconstruction, parts = autoencoder.training_loss(x, kl_weight, generator=generator)
        if discriminator is None or step < discriminator_start:
            return loss, parts, {}
        # Both terms see the discriminator as it is before this step's update (the order CompVis uses); its own
        # hinge loss sees the reconstruction detached, so it trains the discriminator alone.
        g_loss = generator_loss(discriminator(reconstruction))
        d_loss = hinge_discriminator_loss(discriminator(x), discriminator(reconstruction.detach()))
        parts = {**parts, "discriminator": d_loss.detach(), "adversarial": g_loss.detach()}
        return loss + discriminator_weight * g_loss, parts, {"discriminator": d_loss}

    history = _run("autoencoder", loss_fn, parameters, modules, steps, lr, max_minutes, grad_clip, None, device,
                   seed, checkpoint_dir, checkpoint_every, resume, callback, callback_every, progress, nan_policy,
                   extra_optimizers)
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
    nan_policy: str = "raise",
) -> dict[str, list[float]]:
    """Train the UNet and the text encoder on (image, caption) pairs; the autoencoder stays frozen.

    At the end the EMA weights are copied into the model (they sample better). `callback(step)` runs
    every `callback_every` steps, e.g. to draw samples; its time counts neither against `max_minutes` nor
    in the history's "seconds". `nan_policy` as in train_autoencoder.
    """
    if not isinstance(ldm, LatentDiffusion):
        raise TypeError(f"ldm must be a LatentDiffusion, got {type(ldm).__name__}")
    channels = ldm.autoencoder.config.in_channels if ldm.autoencoder is not None else ldm.unet.config.in_channels
    _check_images(images, channels)
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions must be a list of strings, got {captions!r:.80}")
    if len(images) != len(captions):
        raise ValueError(f"captions must have one entry per image: got {len(images)} images but "
                         f"{len(captions)} captions")
    _check_training_arguments(steps, batch_size, lr, grad_clip, max_minutes, checkpoint_every, callback_every,
                              nan_policy)
    if not isinstance(ema_decay, numbers.Real) or not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (0 = no EMA), got {ema_decay!r}")
    device = pick_device(device)
    ldm.to(device)
    means, stds = encode_dataset(ldm, images)
    scale = ldm.autoencoder.scaling_factor if ldm.autoencoder is not None else 1.0
    ldm.unet.train()
    ldm.text_encoder.train()
    parameters = [p for p in [*ldm.unet.parameters(), *ldm.text_encoder.parameters()] if p.requires_grad]
    ema = EMA(parameters, ema_decay) if ema_decay > 0 else None

    def loss_fn(generator, step):
        idx = torch.randint(0, len(means), (batch_size,), generator=generator)
        noise = torch.randn(means[idx].shape, generator=generator).to(device)
        latents = (means[idx] + stds[idx] * noise) * scale  # z_0 = scaling_factor · (μ + σ ε)
        loss = ldm.latent_training_loss(latents, [captions[i] for i in idx.tolist()], caption_dropout, generator)
        return loss, {}, {}

    modules = {"unet": ldm.unet, "text_encoder": ldm.text_encoder}
    history = _run("latent diffusion", loss_fn, parameters, modules, steps, lr, max_minutes, grad_clip, ema,
                   device, seed, checkpoint_dir, checkpoint_every, resume, callback, callback_every, progress,
                   nan_policy)
    if ema is not None:
        ema.copy_to(parameters)
    ldm.eval()
    return history
