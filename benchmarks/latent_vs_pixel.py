"""The paper's downsampling-factor study (Rombach et al. 2022, section 4.1, LDM-1 ... LDM-32) at toy scale.

For MNIST and for ShapesDataset, and for f = 1 (pixels), 2, 4, 8: the same UNet design (channels 64, 64,
cross-attention at the coarser level) and text encoder, each diffusion model trained for the same
wall-clock budget on this machine. The autoencoders (f > 1) are trained first, for a fixed time of their
own, and are not counted, as in the paper. Reported per f:

  - training step time and the steps the budget bought;
  - sampling time for 64 images with DDIM-50 (guidance 3, so 128 UNet rows per step), decoding included;
    every sampling here uses the DDIM the recorded results were measured with: Stable Diffusion's settings
    ("leading" spacing, steps_offset=1; `recorded_sampler`), not generate()'s default ("trailing");
  - quality: prompt accuracy and domain FID (MNIST, via fid.dataset_classifier), or the share of samples with
    all four attributes right (ShapesDataset, via ShapesChecker);
  - quality over training time (a curve per f), measured every budget/points of training; the time spent
    evaluating is not counted in the budget, and the curve's early points use the raw weights (the final
    point uses the EMA weights, as minildm's training ends with);
  - the training time each f needed to first reach a fixed quality (--target, default 0.9).

Targets (issue 5): f = 4 reaches the target quality in at most a quarter of the time f = 1 needs and samples at
least 10x faster; f = 8 shows where compression starts to cost quality.

    python -m benchmarks.latent_vs_pixel [--minutes 4] [--datasets mnist shapes] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import matplotlib
import torch

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.fid import dataset_classifier, fid, label_accuracy, psnr
from minildm.ldm import LatentDiffusion
from minildm.metrics import ShapesChecker
from minildm.mnist import load_mnist
from minildm.samplers import DDIMSampler
from minildm.schedule import NoiseSchedule
from minildm.shapes import ShapesDataset, evaluation_prompts
from minildm.text import TextEncoder
from minildm.train import TrainingConfig, train_autoencoder, train_ldm
from minildm.unet import UNet2DConditionModel, UNetConfig

from .common import RESULTS, machine, write_result

FACTORS = (1, 2, 4, 8)


class Task:
    """A dataset with its training data, its prompts for evaluation, and its quality score."""

    def __init__(self, name: str, quick: bool, root=None):
        self.name = name
        if name == "mnist":
            train = load_mnist("train", root=root, size=32, progress=False)
            test = load_mnist("test", root=root, size=32, progress=False)
            n = 512 if quick else len(train.images)
            self.images, self.captions = train.images[:n], train.captions[:n]
            # --quick trains a throwaway 20-step classifier in a temporary folder, never in the shared cache.
            self.classifier = dataset_classifier("mnist", root=root, cache_dir=tempfile.mkdtemp() if quick else None,
                                                 steps=20 if quick else None, progress=False)
            self.real = test.images[torch.randperm(len(test.images), generator=torch.Generator().manual_seed(0))[:2000]]
            self.prompt_of = test.caption
            self.test_images = test.images[:1000]
        else:
            data = ShapesDataset(length=512 if quick else 20000, seed=0, progress=False)
            self.images, self.captions = data.images, data.captions
            self.checker = ShapesChecker.cached(32)
            self.prompts_and_attributes = evaluation_prompts("all")
            self.test_images = ShapesDataset(length=200 if quick else 1000, seed=1, split="all", progress=False).images
        self.channels = self.images.shape[1]

    def prompts(self, count: int):
        """`count` prompts cycling through the classes (MNIST) or the 120 combinations (Shapes), and their labels."""
        if self.name == "mnist":
            labels = torch.arange(count) % 10
            return [self.prompt_of(int(k)) for k in labels], labels
        chosen = [self.prompts_and_attributes[i % len(self.prompts_and_attributes)] for i in range(count)]
        return [p for p, _ in chosen], [a for _, a in chosen]

    def quality(self, images: torch.Tensor, labels, with_fid: bool) -> dict:
        """images (N, C, H, W) in [0, 1]. "quality" is prompt accuracy (MNIST) or all-attributes-right (Shapes)."""
        if self.name == "mnist":
            x = images * 2 - 1
            result = {"quality": label_accuracy(x, labels, self.classifier)}
            if with_fid:
                result["fid"] = fid(self.real, x, self.classifier)
            return result
        return {"quality": self.checker.score(images, labels)["all"]}


def build_autoencoder(f: int, channels: int, quick: bool) -> AutoencoderKL:
    return AutoencoderKL(AutoencoderConfig.for_factor(f, in_channels=channels, latent_channels=4,
                                                      width=8 if quick else 16, norm_num_groups=8))


def build_model(f: int, autoencoder: AutoencoderKL | None, task: Task, quick: bool) -> LatentDiffusion:
    text_encoder = TextEncoder.from_captions(task.captions, hidden_size=32 if quick else 128,
                                             num_layers=1 if quick else 2)
    channels = task.channels if f == 1 else 4
    unet = UNet2DConditionModel(UNetConfig(
        in_channels=channels, out_channels=channels, block_out_channels=(16, 16) if quick else (64, 64),
        attention_levels=(False, True), cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=8 if quick else 32, norm_num_groups=8 if quick else 16))
    return LatentDiffusion(autoencoder, unet, NoiseSchedule(), text_encoder, image_size=32)


def recorded_sampler(ldm: LatentDiffusion) -> DDIMSampler:
    """The DDIM of the recorded results (RESULTS.md): DDIMSampler's own defaults, Stable Diffusion's "leading"
    spacing with steps_offset=1, which was generate()'s default then (today's is "trailing")."""
    return DDIMSampler(ldm.schedule, prediction_type=ldm.prediction_type)


def run_factor(task: Task, f: int, args) -> dict:
    quick = args.quick
    result: dict = {"f": f}
    autoencoder = None
    if f > 1:
        torch.manual_seed(0)
        autoencoder = build_autoencoder(f, task.channels, quick)
        history = train_autoencoder(autoencoder, task.images, TrainingConfig.for_autoencoder(
            steps=100_000, batch_size=16, lr=2e-3, max_minutes=args.ae_minutes, progress=False))
        autoencoder.eval()
        with torch.no_grad():
            result["autoencoder_psnr_db"] = psnr(task.test_images, autoencoder(task.test_images).clamp(-1, 1))
        result["autoencoder_steps"] = history["steps"][0]
    torch.manual_seed(0)
    ldm = build_model(f, autoencoder, task, quick)
    result["unet_params"] = sum(p.numel() for p in ldm.backbone.parameters())
    result["latent_shape"] = list(ldm.latent_shape())

    # Quality over training time: evaluate every budget / points of training (evaluation time excluded).
    curve_prompts, curve_labels = task.prompts(args.curve_samples)
    budget_s = args.minutes * 60
    curve: list[dict] = []
    clock = {"start": None, "evaluating": 0.0, "next": budget_s / args.points}

    def evaluate_now(step):
        if clock["start"] is None:  # the first step has run: start the clock here, after the one-time encoding
            clock["start"] = time.perf_counter()
        trained = time.perf_counter() - clock["start"] - clock["evaluating"]
        if trained < clock["next"]:
            return
        began = time.perf_counter()
        images = ldm.generate(curve_prompts, num_inference_steps=10, sampler=recorded_sampler(ldm),
                              guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
        ldm.backbone.train()
        ldm.conditioner.train()
        curve.append({"train_seconds": trained, "steps": step, **task.quality(images, curve_labels, False)})
        clock["next"] += budget_s / args.points
        clock["evaluating"] += time.perf_counter() - began

    history = train_ldm(ldm, task.images, task.captions, TrainingConfig(
        steps=1_000_000, batch_size=8 if quick else 64, lr=1e-3, max_minutes=args.minutes, callback_every=1,
        progress=False), callback=evaluate_now)
    result["steps"] = history["steps"][0]
    result["train_seconds"] = history["seconds"][0]
    result["step_ms"] = 1e3 * history["seconds"][0] / max(history["steps"][0], 1)
    images = ldm.generate(curve_prompts, num_inference_steps=10, sampler=recorded_sampler(ldm), guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(1))
    curve.append({"train_seconds": history["seconds"][0], "steps": result["steps"], "ema": True,
                  **task.quality(images, curve_labels, False)})
    result["curve"] = curve
    reached = [point["train_seconds"] for point in curve if point["quality"] >= args.target]
    result["seconds_to_target"] = reached[0] if reached else None

    # Sampling speed: 64 images, DDIM-50, guidance 3, decoding included.
    prompts, _ = task.prompts(args.sampling_images)
    start = time.perf_counter()
    ldm.generate(prompts, num_inference_steps=50, sampler=recorded_sampler(ldm), guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0))
    result["sampling_seconds"] = time.perf_counter() - start

    # Final quality: DDIM-25, guidance 3.
    prompts, labels = task.prompts(args.eval_samples)
    images = ldm.generate(prompts, num_inference_steps=25, sampler=recorded_sampler(ldm), guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(2))
    result.update({f"final_{k}": v for k, v in task.quality(images, labels, task.name == "mnist").items()})
    return result


def plot(results: dict, path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (dataset, rows) in zip(axes[0], results.items()):
        for row in rows:
            times = [p["train_seconds"] / 60 for p in row["curve"]]
            ax.plot(times, [p["quality"] for p in row["curve"]], marker="o", label=f"f={row['f']}")
        ax.set_xlabel("training time (minutes)")
        ax.set_ylabel("prompt accuracy" if dataset == "mnist" else "all attributes right")
        ax.set_ylim(0, 1.02)
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("quality against training time, the same UNet on pixels (f=1) and latents")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0, help="diffusion training budget per f (default 4)")
    parser.add_argument("--ae-minutes", type=float, default=2.0, help="autoencoder budget per f (default 2)")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "shapes"], choices=["mnist", "shapes"])
    parser.add_argument("--factors", nargs="+", type=int, default=list(FACTORS))
    parser.add_argument("--points", type=int, default=6, help="quality measurements along training (default 6)")
    parser.add_argument("--curve-samples", type=int, default=60)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--sampling-images", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.9, help="the fixed quality for time-to-quality")
    parser.add_argument("--root", default=None, help="folder with the MNIST IDX files (default: MINILDM_DATA, ...)")
    parser.add_argument("--quick", action="store_true", help="seconds per f, tiny models: checks that it runs")
    parser.add_argument("--tag", default=None, help="write results/latent_vs_pixel_TAG.json (a partial rerun)")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.ae_minutes, args.points = 0.02, 0.01, 2
        args.curve_samples, args.eval_samples, args.sampling_images = 10, 10, 4
    for f in args.factors:
        if f not in FACTORS:
            parser.error(f"--factors must be among {FACTORS}, got {f}")
    info = machine()
    results = {}
    for dataset in args.datasets:
        task = Task(dataset, args.quick, args.root)
        results[dataset] = []
        for f in args.factors:
            row = run_factor(task, f, args)
            results[dataset].append(row)
            print(f"{dataset} f={f}: {row['steps']} steps ({row['step_ms']:.0f} ms each), "
                  f"{args.sampling_images} samples in {row['sampling_seconds']:.1f} s, "
                  f"quality {row['final_quality']:.1%}"
                  + (f", FID {row['final_fid']:.1f}" if "final_fid" in row else "")
                  + (f", target reached after {row['seconds_to_target']:.0f} s" if row["seconds_to_target"] else
                     ", target not reached"), flush=True)
    summary = {}
    for dataset, rows in results.items():
        by_f = {row["f"]: row for row in rows}
        if 1 in by_f and 4 in by_f:
            f1, f4 = by_f[1], by_f[4]
            summary[dataset] = {
                "sampling_speedup_f4_vs_f1": f1["sampling_seconds"] / f4["sampling_seconds"],
                "step_speedup_f4_vs_f1": f1["step_ms"] / f4["step_ms"],
                "f4_seconds_to_target": f4["seconds_to_target"], "f1_seconds_to_target": f1["seconds_to_target"],
            }
    result = {"args": vars(args), "results": results, "summary": summary, "machine": info}
    for dataset, s in summary.items():
        f1_time = s["f1_seconds_to_target"]
        print(f"{dataset}: f=4 samples {s['sampling_speedup_f4_vs_f1']:.1f}x faster than f=1 (target >= 10x); "
              f"reaches {args.target:.0%} after {s['f4_seconds_to_target']} s vs "
              f"{f1_time if f1_time is not None else f'more than {args.minutes * 60:.0f}'} s for f=1")
    if not args.quick:
        name = "latent_vs_pixel" + (f"_{args.tag}" if args.tag else "")
        print(f"wrote {write_result(name, result)}")
        plot(results, RESULTS / f"{name}.png")
    return result


if __name__ == "__main__":
    main()
