"""Training loops for the two stages: the first stage (the autoencoder), then the latent diffusion model.

Both run one plain PyTorch loop, `_run`, set by a TrainingConfig: random batches drawn with a seeded
`torch.Generator`, AdamW, gradient clipping (clip_grad_norm_'s rule), a learning rate warmed up and then
decayed on a cosine, an exponential moving average of the weights (ema.py), a tqdm progress bar, and a
wall-clock budget (`max_minutes`) so a run fits a lesson. On a GPU a float32 model trains under bf16
autocast; a bf16 or fp16 model trains in its own dtype. `checkpoint_dir` saves the full training state
every `checkpoint_every` steps and `resume=True` picks it up again, bit for bit (training_state.py).
A step whose loss or gradient is not finite stops the run before it changes anything, naming the step
and the tensor (or, with nan_policy="skip", is left out and counted).

Under torchrun the same loop trains on several processes (distributed.py): every rank draws the whole
batch's randomness from the same generator and trains on its slice, DistributedDataParallel averages
the gradients, and only rank 0 writes checkpoints and runs the callback.

Stage two trains on precomputed latents: the first stage is frozen, so each image is encoded once (its
posterior mean and std kept), and every step draws z = mean + std · ε from them, scaled by the scaling
factor. That makes a latent training step cost a backbone call, nothing more.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed
from .atomic import readable_directory
from .autoencoder import AutoencoderKL
from .checks import check_images, explain_missing_kernels
from .discriminator import PatchDiscriminator, generator_loss, hinge_discriminator_loss
from .distributed import pick_device
from .ema import EMAModel
from .ldm import LatentDiffusion
from .loss_weighting import min_snr_weights
from .training_state import TrainingState, load_training_state, save_training_state
from .vq import VQModel

NAN_POLICIES = ("raise", "skip")


@dataclass
class TrainingConfig:
    """How a training loop runs. The loss's own settings stay with the stage (train_autoencoder's kl_weight,
    train_ldm's caption_dropout). `TrainingConfig()` holds the LDM's defaults, `for_autoencoder()` the
    autoencoder's. Raises ValueError for a setting out of range."""

    steps: int = 5000  # an upper bound when max_minutes is set
    batch_size: int = 64  # the whole batch, over all processes
    lr: float = 1e-3  # AdamW's peak learning rate (cosine_lr)
    ema_decay: float = 0.999  # of the weights' moving average, copied into the model at the end; 0 = none
    grad_clip: float = 1.0  # the gradients' global L2 norm is scaled down to at most this
    max_minutes: float | None = None  # wall-clock budget for training (callbacks not counted)
    checkpoint_dir: str | os.PathLike | None = None  # the full training state is saved here ...
    checkpoint_every: int | None = None  # ... every this many steps, and at the end
    resume: bool = False  # continue from checkpoint_dir's state when there is one
    nan_policy: str = "raise"  # "raise": stop at a non-finite loss or gradient; "skip": leave the step out
    callback_every: int | None = None  # train's callback(step) runs every this many steps
    device: str | torch.device | None = None  # None: distributed.pick_device()
    seed: int = 0  # of the batches, t, ε and caption dropout
    progress: bool = True  # a tqdm bar

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("checkpoint_every", "callback_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.ema_decay, numbers.Real) or not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay!r}")
        if self.max_minutes is not None and (not isinstance(self.max_minutes, numbers.Real)
                                             or not self.max_minutes > 0):
            raise ValueError(f"max_minutes must be None or a positive number, got {self.max_minutes!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.checkpoint_dir is None and (self.resume or self.checkpoint_every is not None):
            raise ValueError("resume and checkpoint_every need a checkpoint_dir to read and write the training state")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'mps', got "
                                 f"{self.device!r}") from e

    @classmethod
    def for_autoencoder(cls, **changes) -> TrainingConfig:
        """The autoencoder's defaults: 2000 steps of batch 32, no EMA; `changes` as keyword arguments."""
        return cls(**{"steps": 2000, "batch_size": 32, "ema_decay": 0.0, **changes})


def cosine_lr(base_lr: float, progress: float, warmup: float = 0.02) -> float:
    """Linear warm-up over the first 2% of the run, then cosine decay to 10% of base_lr."""
    if progress < warmup:
        return base_lr * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ---- the loop both stages share ------------------------------------------------------------------------------


class _Objective(nn.Module):
    """The modules one optimizer trains, with the stage's loss as forward(): what DistributedDataParallel wraps,
    so that it sees their parameters and averages their gradients in backward."""

    def __init__(self, trained: dict[str, nn.Module], loss_fn):
        super().__init__()
        self.trained = nn.ModuleDict(trained)
        self.loss_fn = loss_fn

    def forward(self, generator: torch.Generator, step: int):
        return self.loss_fn(generator, step)


def _gradient_norm(parameters) -> torch.Tensor:
    """The L2 norm of all the gradients of `parameters` together, as a 0-d tensor (no sync)."""
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def _first_non_finite(modules: dict[str, nn.Module]) -> str | None:
    """The first gradient of `modules` that holds a NaN or an infinity, by name (the rare path)."""
    for module_name, module in modules.items():
        for name, p in module.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"the gradient of {module_name}.{name} is {p.grad.norm().item()}"
    return None


def _run(name: str, trained: dict[str, nn.Module], loss_fn, config: TrainingConfig, device: torch.device,
         callback=None, extra_learners: dict[str, tuple[nn.Module, torch.optim.Optimizer]] | None = None):
    """One optimisation loop. AdamW trains the parameters of `trained` (name -> module) on
    `loss_fn(generator, step) -> (loss, parts, extra_losses)`: the step's loss on this rank's slice of the
    batch, its parts to log, and a loss for each of `extra_learners` (name -> (module, its own optimizer),
    the discriminator) that trains at this step. Returns the history."""
    extra_learners = extra_learners if extra_learners is not None else {}
    rank, world_size = distributed.world()
    objective = _Objective(trained, loss_fn)
    model = DistributedDataParallel(objective) if world_size > 1 else objective
    model_parameters = [p for p in objective.parameters() if p.requires_grad]
    # A bf16 or fp16 model computes in its dtype, but the optimizer steps float32 copies of its weights (mixed
    # precision, Micikevicius et al. 2018, arXiv:1710.03740): bf16 keeps 8 bits of mantissa, so most updates
    # of a weight (lr 1e-3 times Adam's ~1) would round away, and AdamW's eps of 1e-8 is 0 in fp16 (0/0 = NaN).
    half = model_parameters[0].dtype in (torch.float16, torch.bfloat16)
    parameters = [p.detach().float().requires_grad_(True) for p in model_parameters] if half else model_parameters
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    ema = EMAModel(parameters, config.ema_decay) if config.ema_decay > 0 else None
    extra_optimizers = {key: learner_optimizer for key, (_, learner_optimizer) in extra_learners.items()}
    saved = {**trained, **{key: module for key, (module, _) in extra_learners.items()}}
    state = TrainingState(saved, optimizer, generator, ema, extra_optimizers, parameters if half else None)
    history: dict[str, list[float]] = {"loss": []}
    step = 0
    checkpoint_dir = config.checkpoint_dir
    if checkpoint_dir is not None:
        found = readable_directory(checkpoint_dir)
        model_files = [n for n in ("config.json", "autoencoder.json", "vq_model.json") if (found / n).is_file()]
        if model_files and not (found / "trainer.json").is_file():
            raise ValueError(f"checkpoint_dir {checkpoint_dir} holds a saved model ({model_files[0]}): a training "
                             f"checkpoint would overwrite its weights; give the checkpoint a folder of its own")
        if config.resume and (found / "trainer.json").is_file():
            step, history = load_training_state(checkpoint_dir, state)
        if config.resume and rank == 0 and config.progress:
            print(f"{name}: resuming from step {step} in {checkpoint_dir}" if step else
                  f"{name}: no checkpoint in {checkpoint_dir} yet: starting a new run")
    saved_step = step if step > 0 else None  # the step of the checkpoint on disk, named if a step goes wrong
    history.setdefault("skipped_steps", [])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and not half)
    budget = config.max_minutes * 60 if config.max_minutes is not None else math.inf
    start, elapsed = time.perf_counter(), 0.0  # elapsed: training time so far, agreed by all ranks each step
    bar = tqdm(total=config.steps, initial=step, desc=name, disable=not (config.progress and rank == 0))
    while step < config.steps and elapsed <= budget:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.lr, max(step / config.steps, elapsed / budget))
        with autocast:
            loss, parts, extra_losses = model(generator, step)
        # Each loss fills the gradients of its own learner's parameters only (`inputs=`): the autoencoder's
        # adversarial term must not train the discriminator.
        objective.zero_grad(set_to_none=True)  # the model's gradients (the float copies get theirs assigned)
        loss.backward(inputs=model_parameters)  # under DDP, the gradients are averaged over the ranks here
        if half:
            for copy, p in zip(parameters, model_parameters):
                copy.grad = p.grad.float() if p.grad is not None else None
        checks = {"the loss": loss.detach(), "the gradient norm": _gradient_norm(parameters)}
        for key, extra_loss in extra_losses.items():  # the learners that train at this step
            learner_parameters = list(extra_learners[key][0].parameters())
            extra_optimizers[key].zero_grad(set_to_none=True)
            extra_loss.backward(inputs=learner_parameters)
            distributed.average_gradients(learner_parameters)  # a second backward: outside DDP's bookkeeping
            checks[f"the {key} loss"] = extra_loss.detach()
            checks[f"the {key} gradient norm"] = _gradient_norm(learner_parameters)
        # One sync per step (.tolist()): every value averaged over the ranks, the clock too, so that all of them
        # decide and log alike. The clock is filled in on the device: a copy to a GPU would be a second sync.
        clock = torch.full((1,), time.perf_counter() - start, device=loss.device)
        values = torch.cat([torch.stack([v.float() for v in (*checks.values(), *parts.values())]), clock])
        values = distributed.average(values).tolist()
        elapsed = values.pop()
        problem = next((f"{label} is {v}" for label, v in zip(checks, values) if not math.isfinite(v)), None)
        if problem is not None:
            if "gradient" in problem:  # name the tensor to blame
                problem = _first_non_finite(saved) or problem
            if config.nan_policy == "raise":
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
        torch.nn.utils.clip_grads_with_norm_(parameters, config.grad_clip, checks["the gradient norm"])
        optimizer.step()
        if half:
            with torch.no_grad():
                for copy, p in zip(parameters, model_parameters):
                    p.copy_(copy)  # back into the model's dtype
        for key in extra_losses:
            extra_optimizers[key].step()
        if ema is not None:
            ema.step(parameters)
        step += 1
        history["loss"].append(values[0])
        for key, value in zip(parts, values[len(checks):]):
            history.setdefault(key, []).append(value)
        bar.update(1)
        postfix = {"loss": f"{values[0]:.4f}"}
        if budget < math.inf:  # with a time budget, the step count is only an upper bound: show the time left
            postfix["left"] = f"{max(0.0, budget - elapsed) / 60:.1f} min"
        if history["skipped_steps"]:
            postfix["skipped"] = len(history["skipped_steps"])
        for key in ("perplexity", "dead_codes"):  # a VQModel's codebook usage (vq.py)
            if key in parts:
                postfix[key] = f"{history[key][-1]:.1f}"
        bar.set_postfix(postfix)
        if checkpoint_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
            if rank == 0:
                save_training_state(checkpoint_dir, state, step, history)
            saved_step = step
        if callback is not None and config.callback_every and step % config.callback_every == 0:
            began = time.perf_counter()
            if rank == 0:
                callback(step)
            distributed.barrier()  # the other ranks wait for rank 0's callback
            start += time.perf_counter() - began  # the budget is for training: time in callbacks is not counted
    bar.close()
    if history["skipped_steps"]:
        warnings.warn(f"{name}: {len(history['skipped_steps'])} of {step} steps were skipped for a loss or gradient "
                      f"that was not finite (history['skipped_steps'])", UserWarning, stacklevel=3)
    history["seconds"] = [time.perf_counter() - start]
    history["steps"] = [step]
    if checkpoint_dir is not None and rank == 0:
        save_training_state(checkpoint_dir, state, step, history)
    if ema is not None:
        ema.copy_to(model_parameters)  # the averaged weights sample better; the checkpoint keeps the raw ones
    return history


def _check_config(config, default: TrainingConfig, function: str, keywords: dict) -> TrainingConfig:
    """`config`, or `default` when None; a TypeError for keywords that are TrainingConfig's fields (the training
    functions took them directly before), saying where they go now."""
    if keywords:
        fields = {f.name for f in dataclasses.fields(TrainingConfig)}
        unknown = [k for k in keywords if k not in fields]
        if unknown:
            raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
        settings = ", ".join(f"{k}={v!r}" for k, v in keywords.items())
        raise TypeError(f"{function}() takes the loop's settings in a TrainingConfig: "
                        f"{function}(..., TrainingConfig({settings}))")
    if config is None:
        return default
    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig or None, got {type(config).__name__}")
    return config


def _start(config: TrainingConfig) -> tuple[torch.device, slice]:
    """The device, joined to torchrun's process group when there is one, and this rank's part of a batch."""
    device = pick_device(config.device)
    distributed.setup(device)
    return device, distributed.rank_slice(config.batch_size)


# ---- the two stages ------------------------------------------------------------------------------------------


def train_autoencoder(
    autoencoder: AutoencoderKL | VQModel,
    images: torch.Tensor,
    config: TrainingConfig | None = None,
    *,
    kl_weight: float = 1e-6,
    discriminator: PatchDiscriminator | None = None,
    discriminator_weight: float = 0.1,
    discriminator_start: int = 0,
    callback=None,
    **settings,
) -> dict[str, list[float]]:
    """Train the autoencoder on images (N, C, H, W) in [-1, 1]; then estimate its scaling factor.

    autoencoder: an AutoencoderKL, or a VQModel (vq.py). Each brings its own regulariser: the KL term for the
        former, the codebook and commitment terms (their settings in VQModelConfig) for the latter, whose
        codebook also updates itself at each step (EMA, restarts; its state is checkpointed with its weights).
    config: how the loop runs (TrainingConfig.for_autoencoder() when None).
    kl_weight: the KL term's weight (autoencoder.training_loss); unused by a VQModel.
    discriminator: a PatchDiscriminator (discriminator.py); from step `discriminator_start` on, each step
        also trains it on real vs reconstructed images and adds `discriminator_weight` times the adversarial
        loss. Its weights and its optimizer are checkpointed too, so resume stays bit-exact.
    callback(step) runs every config.callback_every steps (on rank 0).

    Returns the history: per-step "loss", "reconstruction" (L1) and "kl" (a VQModel: "codebook", "commitment",
    "perplexity", "dead_codes" and, with restarts, "restarted_codes"; and "discriminator", "adversarial" once
    the discriminator is on), plus "skipped_steps", "seconds" and "steps". Raises
    TypeError / ValueError for arguments of the wrong kind, FloatingPointError for a non-finite step.
    """
    config = _check_config(config, TrainingConfig.for_autoencoder(), "train_autoencoder", settings)
    if not isinstance(autoencoder, (AutoencoderKL, VQModel)):
        raise TypeError(f"autoencoder must be an AutoencoderKL or a VQModel, got {type(autoencoder).__name__}")
    check_images(images, "images", autoencoder.in_channels, autoencoder.downsampling_factor)
    if not isinstance(kl_weight, numbers.Real) or not 0 <= kl_weight < math.inf:
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    if discriminator is not None and not isinstance(discriminator, PatchDiscriminator):
        raise TypeError(f"discriminator must be a PatchDiscriminator or None, got {type(discriminator).__name__}")
    if not isinstance(discriminator_weight, numbers.Real) or not 0 <= discriminator_weight < math.inf:
        raise ValueError(f"discriminator_weight must be a finite number >= 0, got {discriminator_weight!r}")
    if not isinstance(discriminator_start, numbers.Integral) or discriminator_start < 0:
        raise ValueError(f"discriminator_start must be an integer >= 0, got {discriminator_start!r}")
    device, mine = _start(config)
    frozen = [p for p in autoencoder.parameters() if not p.requires_grad]  # a LatentDiffusion's first stage is
    autoencoder.to(device).train().requires_grad_(True)  # frozen; here it learns, and is frozen again at the end
    dtype = next(autoencoder.parameters()).dtype  # float32 images are cast to a bf16 / fp16 model's dtype
    latent_shape = (config.batch_size, autoencoder.latent_channels,
                    *(size // autoencoder.downsampling_factor for size in images.shape[2:]))
    extra_learners = {}
    if discriminator is not None:
        discriminator.to(device).train()
        extra_learners["discriminator"] = (discriminator, torch.optim.AdamW(discriminator.parameters(), lr=config.lr,
                                                                            betas=(0.5, 0.9)))

    def judge(images):
        """The discriminator's patch logits, in its own dtype (a bf16 autoencoder may meet a float32 one)."""
        return discriminator(images.to(next(discriminator.parameters()).dtype))

    def regularised_loss(x, generator):
        """The first stage's own loss: the KL autoencoder's with its posterior noise ε for z = μ + σ ε (drawn for
        the whole batch, this rank's slice used); the VQ model's with its codebook update (restarts drawn from
        the same generator: every rank draws alike)."""
        if isinstance(autoencoder, VQModel):
            return autoencoder.training_loss(x, generator=generator)
        noise = torch.randn(latent_shape, generator=generator)
        return autoencoder.training_loss(x, kl_weight, noise=noise[mine].to(device))

    def loss_fn(generator, step):
        idx = torch.randint(0, len(images), (config.batch_size,), generator=generator)  # the whole batch ...
        x = images[idx[mine]].to(device, dtype)  # ... of which this rank trains on its slice
        loss, reconstruction, parts = regularised_loss(x, generator)
        if discriminator is None or step < discriminator_start:
            return loss, parts, {}
        # Both terms see the discriminator as it is before this step's update (the order CompVis uses); its own
        # hinge loss sees the reconstruction detached, so it trains the discriminator alone.
        g_loss = generator_loss(judge(reconstruction))
        d_loss = hinge_discriminator_loss(judge(x), judge(reconstruction.detach()))
        parts = {**parts, "discriminator": d_loss.detach(), "adversarial": g_loss.detach()}
        return loss + discriminator_weight * g_loss, parts, {"discriminator": d_loss}

    with explain_missing_kernels(device, dtype):
        history = _run("autoencoder", {"autoencoder": autoencoder}, loss_fn, config, device, callback, extra_learners)
    autoencoder.eval()
    for p in frozen:
        p.requires_grad_(False)
    # Every rank estimates the same factor: the same images and the same seeded posterior samples.
    autoencoder.estimate_scaling_factor(images[:2048].to(device, dtype),
                                        generator=torch.Generator().manual_seed(config.seed))
    return history


@torch.no_grad()
def encode_dataset(ldm: LatentDiffusion, images: torch.Tensor, batch_size: int = 256):
    """Posterior mean and std (N, c, h, w) of every image under the frozen first stage, computed once."""
    ldm.first_stage.eval()
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = ldm.first_stage.encode(images[i : i + batch_size].to(ldm.device, ldm.first_stage_dtype))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_ldm(
    ldm: LatentDiffusion,
    images: torch.Tensor,
    captions: list[str] | None = None,
    config: TrainingConfig | None = None,
    *,
    caption_dropout: float = 0.1,
    snr_gamma: float | None = None,
    callback=None,
    class_labels=None,
    **settings,
) -> dict[str, list[float]]:
    """Train the backbone and the conditioner on (image, caption) pairs; the first stage stays frozen.

    images (N, C, H, W) in [-1, 1], H and W multiples of the first stage's factor; captions, N strings, or
    class_labels (N,) integers in their place for a class-conditional model (a ClassEmbedder conditioner: each
    label becomes its class name, the condition it encodes; e.g. a LabeledImages' .labels). A model with
    concat_conditioning draws its spatial condition (a random mask, the low-resolution image) from each batch.
    config: how the loop runs (TrainingConfig() when None). caption_dropout: the probability that a caption
    is replaced by the null condition, so the model also learns the unconditional prediction for guidance.
    snr_gamma: None for the plain loss, or γ of Min-SNR-γ loss weighting (Hang et al. 2023 use 5; loss_weighting.py).
    At the end the EMA weights are copied into the model (they sample better). `callback(step)` runs every
    config.callback_every steps, e.g. to draw samples; its time counts neither against max_minutes nor in
    the history's "seconds". Warns once about caption words the conditioner cannot use.

    Returns the history ("loss" per step, "skipped_steps", "seconds", "steps"). Raises TypeError /
    ValueError for arguments of the wrong kind, FloatingPointError for a non-finite step.
    """
    config = _check_config(config, TrainingConfig(), "train_ldm", settings)
    if not isinstance(ldm, LatentDiffusion):
        raise TypeError(f"ldm must be a LatentDiffusion, got {type(ldm).__name__}")
    check_images(images, "images", ldm.first_stage.in_channels, ldm.first_stage.downsampling_factor)
    captions = ldm._conditions_of(captions, class_labels)  # exactly one of the two; labels -> class names
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions must be a list of strings, got {captions!r:.80}")
    if len(images) != len(captions):
        raise ValueError(f"captions must have one entry per image: got {len(images)} images but "
                         f"{len(captions)} captions")
    if not isinstance(caption_dropout, numbers.Real) or not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout!r}")
    if snr_gamma is not None:  # checked now, not at the first step
        min_snr_weights(torch.zeros(1), snr_gamma, ldm.prediction_type)
    device, mine = _start(config)
    if distributed.is_main_process():
        ldm.warn_ignored_words(captions, what="training captions")
    ldm.to(device)
    means, stds = encode_dataset(ldm, images)
    scale = ldm.first_stage.scaling_factor
    ldm.backbone.train()
    ldm.conditioner.train()
    shape = (config.batch_size, *means.shape[1:])

    def loss_fn(generator, step):
        idx = torch.randint(0, len(means), (config.batch_size,), generator=generator)  # the whole batch ...
        posterior_noise = torch.randn(shape, generator=generator)
        timesteps, noise, dropped = ldm.draw_training_noise(shape, caption_dropout, generator)
        whole = idx
        idx, posterior_noise = idx[mine], posterior_noise[mine].to(device)  # ... of which this rank trains its slice
        latents = (means[idx] + stds[idx] * posterior_noise) * scale  # z_0 = scaling_factor · (μ + σ ε)
        concat_input = None
        if ldm.concat_conditioning is not None:  # drawn for the whole batch (the masks from the generator) ...
            concat_input = ldm.training_concat_input(images[whole], generator)[mine]  # ... this rank keeps its slice
        loss = ldm.diffusion_loss(latents, [captions[i] for i in idx.tolist()], timesteps[mine], noise[mine],
                                  dropped[mine], snr_gamma=snr_gamma, concat_input=concat_input)
        return loss, {}, {}

    with explain_missing_kernels(device, ldm.dtype):
        history = _run("latent diffusion", {"backbone": ldm.backbone, "conditioner": ldm.conditioner}, loss_fn,
                       config, device, callback)
    ldm.eval()
    return history
