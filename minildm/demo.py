"""The end-to-end demo: train a text-to-image latent diffusion model on ShapesDataset, on a laptop CPU.

    1. draw the captioned shapes (shapes.py)
    2. train the autoencoder, f = 4: 32x32x3 images <-> 8x8x4 latents (autoencoder.py)
    3. train the UNet and the text encoder on the frozen latents, as a rectified flow by default (unet.py,
       text.py, flow.py, ldm.py)
    4. sample every attribute combination, including those held out of training, at several
       guidance scales, and read the samples back with the ShapesChecker (metrics.py)
    5. write samples.png, denoising.gif, report.json and the model

`python -m minildm demo` runs it; `DemoConfig` holds every setting, and report.json records them.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed, viz
from .atomic import atomic_write_json
from .autoencoder import AutoencoderConfig, AutoencoderKL
from .flow import FlowMatchSchedule
from .ldm import LatentDiffusion
from .metrics import ShapesChecker
from .schedule import NoiseSchedule
from .shapes import HELD_OUT, ShapesDataset, evaluation_prompts
from .text import TextEncoder
from .train import TrainingConfig, train_autoencoder, train_ldm
from .unet import UNet2DConditionModel, UNetConfig

OBJECTIVES = {  # DemoConfig.objective -> (the schedule, what the backbone predicts)
    "epsilon": lambda: (NoiseSchedule(), "epsilon"),
    "v_prediction": lambda: (NoiseSchedule(rescale_betas_zero_snr=True), "v_prediction"),
    "flow": lambda: (FlowMatchSchedule(), "flow_prediction"),
}


@dataclass
class DemoConfig:
    minutes: float = 5.0  # wall-clock budget for everything; the training stages get fixed shares of it
    seed: int = 0
    image_size: int = 32
    num_images: int = 20000
    # stage 1: the autoencoder
    ae_channels: tuple[int, ...] = (16, 32, 64)
    ae_norm_groups: int = 8
    latent_channels: int = 4
    ae_steps: int = 1800  # small batches, many steps: for these images, steps matter more than batch size
    ae_batch_size: int = 16
    ae_lr: float = 2e-3
    ae_share: float = 0.3
    # stage 2: the latent diffusion model
    unet_channels: tuple[int, ...] = (64, 64)
    unet_attention_levels: tuple[bool, ...] = (False, True)
    unet_norm_groups: int = 16
    text_hidden_size: int = 128
    text_layers: int = 2
    ldm_steps: int = 8000  # an upper bound: on a 2-core CPU the time budget (ldm_share) ends training first
    ldm_batch_size: int = 64
    ldm_lr: float = 1e-3
    ldm_share: float = 0.55
    ema_decay: float = 0.999
    # "flow" (rectified flow), "epsilon" or "v_prediction" (on a zero-terminal-SNR schedule). The flow is the
    # default: in benchmarks/objectives.py it reached 100% in 1200 steps, where ε reached 97% (RESULTS.md)
    objective: str = "flow"
    # evaluation
    sampler: str | None = None  # a name make_sampler knows ("ddim", "dpm_solver"; "euler", "heun" for a flow), or
    # None: the model's default (DDIM for diffusion, Euler for a flow)
    num_inference_steps: int = 10  # the flow's Euler: as good at 4 evaluations as at 50 (benchmarks/objectives.py)
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    samples_per_prompt: int = 2

    @classmethod
    def smoke(cls) -> DemoConfig:
        """A few seconds end to end, for tests: the same pipeline, nothing learned."""
        return cls(minutes=1.0, num_images=256, ae_channels=(8, 16, 16), ae_steps=3, ae_batch_size=8,
                   unet_channels=(32, 32), unet_norm_groups=8, text_hidden_size=32, text_layers=1, ldm_steps=3,
                   ldm_batch_size=8, num_inference_steps=2, guidance_scales=(1.0, 3.0), samples_per_prompt=1)


def build_autoencoder(config: DemoConfig) -> AutoencoderKL:
    return AutoencoderKL(AutoencoderConfig(3, config.latent_channels, config.ae_channels,
                                           norm_num_groups=config.ae_norm_groups))


def build_model(config: DemoConfig, autoencoder: AutoencoderKL, captions: list[str]) -> LatentDiffusion:
    text_encoder = TextEncoder.from_captions(captions, hidden_size=config.text_hidden_size,
                                             num_layers=config.text_layers)
    unet = UNet2DConditionModel(UNetConfig(
        in_channels=config.latent_channels, out_channels=config.latent_channels,
        block_out_channels=config.unet_channels, attention_levels=config.unet_attention_levels,
        cross_attention_dim=config.text_hidden_size, norm_num_groups=config.unet_norm_groups,
    ))
    schedule, prediction_type = OBJECTIVES[config.objective]()
    return LatentDiffusion(autoencoder, unet, schedule, text_encoder, prediction_type, image_size=config.image_size)


@torch.no_grad()
def evaluate_adherence(ldm: LatentDiffusion, checker: ShapesChecker, guidance_scales, num_inference_steps: int = 25,
                       samples_per_prompt: int = 2, seed: int = 0, sampler: str | None = None) -> dict:
    """Sample the canonical prompt of every attribute combination at each guidance scale and score it, with
    ldm.make_sampler(sampler) (None: generate()'s default).

    Returns {scale: {"all": {...rates}, "seen": {...}, "held_out": {...}}, "images": {scale: tensor}}.
    """
    prompts, attributes = zip(*evaluation_prompts("all"))
    prompts = list(prompts) * samples_per_prompt
    attributes = list(attributes) * samples_per_prompt
    held_out = torch.tensor([a in HELD_OUT for a in attributes])
    results, images_by_scale = {}, {}
    for scale in guidance_scales:
        generator = torch.Generator().manual_seed(seed)  # the same starting noise for every scale
        images = ldm.generate(prompts, num_inference_steps, sampler=ldm.make_sampler(sampler), guidance_scale=scale,
                              generator=generator).cpu()
        results[str(scale)] = {
            "all": checker.score(images, attributes),
            "seen": checker.score(images[~held_out], [a for a, h in zip(attributes, held_out) if not h]),
            "held_out": checker.score(images[held_out], [a for a, h in zip(attributes, held_out) if h]),
        }
        images_by_scale[str(scale)] = images
    return {"scores": results, "images": images_by_scale, "prompts": prompts}


def run_demo(out: str | os.PathLike = "demo_out", config: DemoConfig | None = None,
             device: str | None = None, progress: bool = True) -> dict | None:
    """Run the demo and return report.json's contents. Under torchrun every process trains, and rank 0 alone
    samples and writes `out` (the others return None)."""
    config = config if config is not None else DemoConfig()
    out = Path(out)
    device = distributed.pick_device(device)
    rank, world_size = distributed.setup(device)
    progress = progress and rank == 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    timings = {}
    say = print if progress else (lambda *a, **k: None)
    processes = f", {world_size} processes" if world_size > 1 else ""
    say(f"minildm demo on {device} ({torch.get_num_threads()} threads{processes}), budget {config.minutes} min "
        f"-> {out}")

    start = time.perf_counter()
    dataset = ShapesDataset(config.image_size, config.num_images, config.seed, "train", progress=progress)
    timings["data_s"] = time.perf_counter() - start

    autoencoder = build_autoencoder(config)
    say(f"stage 1: autoencoder, f={autoencoder.config.downsampling_factor}, "
        f"{sum(p.numel() for p in autoencoder.parameters()) / 1e3:.0f}k parameters")
    t = time.perf_counter()
    ae_history = train_autoencoder(autoencoder, dataset.images, TrainingConfig.for_autoencoder(
        steps=config.ae_steps, batch_size=config.ae_batch_size, lr=config.ae_lr,
        max_minutes=config.minutes * config.ae_share, device=device, seed=config.seed, progress=progress))
    timings["autoencoder_s"] = time.perf_counter() - t

    ldm = build_model(config, autoencoder, dataset.captions)
    say(f"stage 2: latent diffusion, UNet {sum(p.numel() for p in ldm.backbone.parameters()) / 1e3:.0f}k + text "
        f"encoder {sum(p.numel() for p in ldm.conditioner.parameters()) / 1e3:.0f}k parameters, latents "
        f"{ldm.latent_shape()}, scaling factor {ldm.first_stage.scaling_factor:.3f}")
    t = time.perf_counter()
    ldm_history = train_ldm(ldm, dataset.images, dataset.captions, TrainingConfig(
        steps=config.ldm_steps, batch_size=config.ldm_batch_size, lr=config.ldm_lr, ema_decay=config.ema_decay,
        max_minutes=config.minutes * config.ldm_share, device=device, seed=config.seed, progress=progress))
    timings["ldm_s"] = time.perf_counter() - t
    if rank != 0:  # under torchrun the other ranks only train; rank 0 samples and writes
        return None

    say("stage 3: sampling every attribute combination and reading the samples back")
    t = time.perf_counter()
    checker = ShapesChecker.cached(config.image_size)
    timings["checker_s"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluation = evaluate_adherence(ldm, checker, config.guidance_scales, config.num_inference_steps,
                                    config.samples_per_prompt, config.seed, config.sampler)
    timings["sampling_s"] = time.perf_counter() - t
    scores = evaluation["scores"]
    best_scale = max(scores, key=lambda s: scores[s]["all"]["all"])

    t = time.perf_counter()
    ldm.save(out / "model")
    write_pictures(ldm, evaluation, best_scale, out, config)
    timings["outputs_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    report = {
        "adherence": {scale: s for scale, s in scores.items()},
        "adherence_guidance_1": scores[str(1.0)]["all"]["all"] if str(1.0) in scores else None,
        "best_guidance_scale": float(best_scale),
        "adherence_best": scores[best_scale]["all"]["all"],
        "adherence_best_held_out": scores[best_scale]["held_out"]["all"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "autoencoder": {"steps": ae_history["steps"][0],
                        "final_l1": sum(ae_history["reconstruction"][-50:]) / len(ae_history["reconstruction"][-50:]),
                        "scaling_factor": ldm.first_stage.scaling_factor},
        "ldm": {"steps": ldm_history["steps"][0], "final_loss": sum(ldm_history["loss"][-100:]) /
                len(ldm_history["loss"][-100:])},
        "config": asdict(config),
        "machine": {"device": str(device), "processes": world_size, "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "torch": torch.__version__},
    }
    atomic_write_json(out / "report.json", report)
    say(json.dumps({k: report[k] for k in ("adherence_guidance_1", "best_guidance_scale", "adherence_best",
                                           "adherence_best_held_out", "timings_s")}, indent=2))
    say(f"wrote {out / 'samples.png'}, {out / 'denoising.gif'}, {out / 'report.json'} and {out / 'model'}")
    return report


def write_pictures(ldm: LatentDiffusion, evaluation: dict, best_scale: str, out: Path, config: DemoConfig) -> None:
    """samples.png: one sample per prompt at the best guidance scale (held-out prompts first, marked with *);
    denoising.gif: eight prompts denoised step by step."""
    prompts = evaluation["prompts"]
    images = evaluation["images"][best_scale]
    held_out_prompts = {prompt for prompt, _ in evaluation_prompts("heldout")}
    unique = range(len(evaluation_prompts("all")))  # with several samples per prompt, show the first of each
    held = [i for i in unique if prompts[i] in held_out_prompts]
    others = [i for i in unique if prompts[i] not in held_out_prompts]
    order = held + others[:: max(1, len(others) // (32 - len(held)))][: 32 - len(held)]  # spread over colours
    titles = [("* " if i in held else "") + prompts[i] for i in order]
    fig = viz.show_images(images[order], titles, ncols=8,
                          suptitle=f"minildm samples, guidance {best_scale} (* = combination held out of training)")
    fig.savefig(out / "samples.png", dpi=110, bbox_inches="tight")

    gif_prompts = [prompts[i] for i in order[:8]]
    generator = torch.Generator().manual_seed(config.seed)
    result = ldm.generate(gif_prompts, config.num_inference_steps, sampler=ldm.make_sampler(config.sampler),
                          guidance_scale=float(best_scale),
                          generator=generator, return_intermediates=True)
    frames = torch.stack([ldm.decode_latents(z.to(ldm.device)).cpu() for z in result.latents])  # (T+1, 8, 3, H, W)
    viz.save_gif(frames, out / "denoising.gif", nrow=8)
