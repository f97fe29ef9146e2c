"""Objectives, backbones and samplers side by side (issue 14), on ShapesDataset, one machine, one run.

Part 1, objectives and backbones. The demo's autoencoder is trained once, 1800 steps (not counted; cached in
$MINILDM_CACHE for the next run); then, on its frozen
latents, each of these trains the same number of steps with the demo's settings (batch 64, lr 1e-3, EMA 0.999):
  - unet_eps:        the demo's UNet (64, 64 channels), ε-prediction, Stable Diffusion's schedule;
  - unet_v_zero_snr: the same UNet, v-prediction on the zero-terminal-SNR schedule (Lin et al. 2023);
  - unet_flow:       the same UNet, rectified flow (FlowMatchSchedule, logit-normal σ);
  - dit_flow:        a DiT of about the same parameter count (hidden 128, 4 blocks, 2x2 patches), flow;
  - dit_eps:         that DiT, ε-prediction.
Each is scored during training ("quality": the share of 120 samples, every attribute combination once, the 8 held-out
ones included, with all four attributes right by ShapesChecker; guidance 3, each family's default sampler at 25
steps: DDIM for diffusion, Euler for the flow). The curve's points use the raw weights and its last the EMA
weights. Time: each model's training step is timed alternately with the others' (so that a busy machine slows
all alike), and a curve's time axis is its steps times that step time: the training time its steps cost here.
(Training for a fixed wall-clock budget instead gave unequal budgets on a shared 2-core machine.)

Part 2, quality against network evaluations per sample (NFE: a guided step is one batched evaluation; Heun's
two calls are two). On unet_eps (DDIM, DDPM, DPM-Solver++(2M), all "trailing") and unet_flow (Euler, Heun), at
NFE 1, 2, 4, 8, 10, 20, 50 from the same starting noise, at a guidance where DDIM-50 is below 90% when there is
one (--nfe-guidance, default 1). Heun's n steps cost 2n - 1 evaluations: it runs the largest n within the NFE.
Target: DPM-Solver++ at 10 evaluations within 2 points of DDIM-50.

--dataset mnist runs the same on MNIST (a 1-channel autoencoder of the same design; quality: prompt accuracy of
200 samples, 20 per digit, by the cached MNIST classifier, and domain KID against 200 test digits, next to the KID
of 200 other test digits; KID, not FID, because 200 samples are far too few for FID's 64-dimensional features).

    python -m benchmarks.objectives [--steps 1200] [--dataset shapes|mnist] [--quick]

Writes benchmarks/results/objectives.json and objectives.png (objectives_mnist.* for MNIST); the load average
is recorded before every model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import torch

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.demo import DemoConfig, build_autoencoder
from minildm.dit import DiTConfig, DiTTransformer2DModel
from minildm.fid import dataset_classifier, kid, label_accuracy, proportion_ci
from minildm.flow import FlowMatchSchedule
from minildm.ldm import LatentDiffusion
from minildm.metrics import ShapesChecker
from minildm.mnist import load_mnist
from minildm.schedule import NoiseSchedule
from minildm.shapes import HELD_OUT, ShapesDataset, evaluation_prompts
from minildm.text import TextEncoder
from minildm.train import TrainingConfig, train_autoencoder, train_ldm
from minildm.unet import UNet2DConditionModel, UNetConfig

from .common import RESULTS, machine, time_alternating

MODELS = {  # name: (backbone, prediction_type, schedule)
    "unet_eps": ("unet", "epsilon", lambda: NoiseSchedule()),
    "unet_v_zero_snr": ("unet", "v_prediction", lambda: NoiseSchedule(rescale_betas_zero_snr=True)),
    "unet_flow": ("unet", "flow_prediction", lambda: FlowMatchSchedule()),
    "dit_flow": ("dit", "flow_prediction", lambda: FlowMatchSchedule()),
    "dit_eps": ("dit", "epsilon", lambda: NoiseSchedule()),
}
NFES = (1, 2, 4, 8, 10, 20, 50)
EVAL_STEPS, EVAL_GUIDANCE = 25, 3.0


def build(name: str, config: DemoConfig, autoencoder, captions) -> LatentDiffusion:
    backbone_kind, prediction_type, schedule = MODELS[name]
    torch.manual_seed(config.seed)
    text_encoder = TextEncoder.from_captions(captions, hidden_size=config.text_hidden_size,
                                             num_layers=config.text_layers)
    if backbone_kind == "unet":
        backbone = UNet2DConditionModel(UNetConfig(
            in_channels=config.latent_channels, out_channels=config.latent_channels,
            block_out_channels=config.unet_channels, attention_levels=config.unet_attention_levels,
            cross_attention_dim=config.text_hidden_size, norm_num_groups=config.unet_norm_groups))
    else:
        backbone = DiTTransformer2DModel(DiTConfig(
            in_channels=config.latent_channels, out_channels=config.latent_channels, patch_size=2,
            hidden_size=128, num_layers=4, num_attention_heads=4, cross_attention_dim=config.text_hidden_size))
    return LatentDiffusion(autoencoder, backbone, schedule(), text_encoder, prediction_type,
                           image_size=config.image_size)


class Scorer:
    """All-attributes accuracy of one sample per combination (120, held-out included), from fixed noise."""

    def __init__(self, checker: ShapesChecker, quick: bool):
        pairs = evaluation_prompts("all")
        if quick:
            pairs = pairs[:: max(1, len(pairs) // 24)]
        self.prompts = [p for p, _ in pairs]
        self.attributes = [a for _, a in pairs]
        self.held_out = [a in HELD_OUT for a in self.attributes]
        self.checker = checker

    def __call__(self, ldm: LatentDiffusion, sampler=None, steps: int = EVAL_STEPS,
                 guidance: float = EVAL_GUIDANCE) -> dict:
        images = ldm.generate(self.prompts, steps, sampler=sampler, guidance_scale=guidance,
                              generator=torch.Generator().manual_seed(1234)).cpu()
        readings = self.checker.read(images)
        right = [r == a for r, a in zip(readings, self.attributes)]
        held = [ok for ok, h in zip(right, self.held_out) if h]
        n = len(right)
        low, high = proportion_ci(sum(right), n)
        return {"quality": sum(right) / n, "ci95": [low, high], "n": n,
                "held_out": sum(held) / len(held) if held else None, "n_held_out": len(held)}


class MnistScorer:
    """Prompt accuracy (the cached MNIST classifier, fid.dataset_classifier) of 200 samples, 20 per digit, from
    fixed noise, and domain KID against 200 test digits next to the KID of 200 other test digits (its floor)."""

    def __init__(self, quick: bool):
        test = load_mnist("test", size=32, progress=False)
        self.classifier = dataset_classifier("mnist", cache_dir=tempfile.mkdtemp() if quick else None,
                                             steps=20 if quick else None, progress=False)
        n = 40 if quick else 200
        self.labels = torch.arange(n) % 10
        self.prompts = [test.caption(int(k)) for k in self.labels]
        order = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(0))
        self.real, self.other_real = test.images[order[:n]], test.images[order[n:2 * n]]
        self.kid_floor = kid(self.real, self.other_real, self.classifier)

    def __call__(self, ldm: LatentDiffusion, sampler=None, steps: int = EVAL_STEPS,
                 guidance: float = EVAL_GUIDANCE) -> dict:
        images = ldm.generate(self.prompts, steps, sampler=sampler, guidance_scale=guidance,
                              generator=torch.Generator().manual_seed(1234)).cpu()
        x = images * 2 - 1
        accuracy = label_accuracy(x, self.labels, self.classifier)
        n = len(self.labels)
        low, high = proportion_ci(round(accuracy * n), n)
        distance = kid(self.real, x, self.classifier)
        return {"quality": accuracy, "ci95": [low, high], "n": n, "held_out": None, "n_held_out": 0,
                "kid": distance.mean, "kid_std": distance.std, "kid_real_vs_real": self.kid_floor.mean}


def train_with_curve(ldm, dataset, config: DemoConfig, steps: int, scorer: Scorer, points: int) -> dict:
    """Train `steps` steps (the demo's settings), scoring `points` times on the way (raw weights) and at the end
    (EMA weights, which the run ends with); returns the curve, by step."""
    curve = []

    def callback(step):
        score = scorer(ldm)
        curve.append({"step": step, **score, "weights": "raw"})
        print(f"    step {step:5d}: quality {score['quality']:.1%}", flush=True)

    history = train_ldm(ldm, dataset.images, dataset.captions, TrainingConfig(
        steps=steps, batch_size=config.ldm_batch_size, lr=config.ldm_lr, ema_decay=config.ema_decay,
        seed=config.seed, progress=False, callback_every=max(1, steps // points)), callback=callback)
    final = scorer(ldm)
    curve.append({"step": steps, **final, "weights": "ema"})
    print(f"    final (EMA) after {steps} steps ({history['seconds'][-1]:.0f} s on a shared machine): quality "
          f"{final['quality']:.1%} [{final['ci95'][0]:.1%}, {final['ci95'][1]:.1%}]", flush=True)
    return {"steps": steps, "wall_s_shared_machine": round(history["seconds"][-1], 1), "curve": curve,
            "final": final}


def step_times(models: dict, dataset, config: DemoConfig, repeats: int) -> dict[str, float]:
    """Milliseconds per training step (batch config.ldm_batch_size) of each model, timed alternately so that
    load on the machine hits every model alike (common.time_alternating); the step is the loss, its backward
    and an AdamW step on the backbone and the text encoder."""
    functions = {}
    for name, ldm in models.items():
        ldm.train()
        parameters = [p for p in ldm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)
        latents = ldm.encode_images(dataset.images[: config.ldm_batch_size])
        captions = dataset.captions[: config.ldm_batch_size]

        def step(ldm=ldm, optimizer=optimizer, latents=latents, captions=captions):
            loss = ldm.latent_training_loss(latents, captions, generator=torch.Generator().manual_seed(0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        functions[name] = step
    times = time_alternating(functions, repeats, warmup=3)
    for ldm in models.values():
        ldm.eval()
    return {name: round(1000 * seconds, 1) for name, seconds in times.items()}


def nfe_sweep(ldm: LatentDiffusion, scorer: Scorer, guidance: float, nfes=NFES) -> dict:
    """Quality per network evaluations for each of the model's samplers, from the same starting noise."""
    names = ("euler", "heun") if ldm.is_flow else ("ddim", "ddpm", "dpm_solver")
    results = {}
    for name in names:
        rows = []
        for nfe in nfes:
            steps = (nfe + 1) // 2 if name == "heun" else nfe  # Heun: n steps = 2n - 1 evaluations
            used = 2 * steps - 1 if name == "heun" else steps
            if rows and rows[-1]["evaluations"] == used:
                continue
            t = time.perf_counter()
            score = scorer(ldm, ldm.make_sampler(name), steps, guidance)
            rows.append({"evaluations": used, "steps": steps, **score, "seconds": round(time.perf_counter() - t, 1)})
            print(f"    {name:10s} {used:3d} evaluations: {score['quality']:.1%}", flush=True)
        results[name] = rows
    return results


def plot(result: dict, path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, run in result["objectives"].items():
        xs = [p["train_s"] / 60 for p in run["curve"]]
        ys = [p["quality"] for p in run["curve"]]
        left.plot(xs, ys, marker="o", label=f"{name} ({run['parameters'] / 1e6:.2f}M)")
    quality = "all four attributes right" if result["settings"]["dataset"] == "shapes" else "prompt accuracy"
    left.set(xlabel="training time (min, this machine)", ylabel=quality, ylim=(0, 1),
             title=f"objectives and backbones (guidance {EVAL_GUIDANCE}, 25 steps)")
    left.legend(fontsize=8)
    for model, samplers in result["nfe"]["runs"].items():
        for name, rows in samplers.items():
            xs = [r["evaluations"] for r in rows]
            ys = [r["quality"] for r in rows]
            errors = [[r["quality"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["quality"]
                                                                        for r in rows]]
            right.errorbar(xs, ys, yerr=errors, marker="o", capsize=2, label=f"{model}: {name}")
    right.set(xscale="log", xlabel="network evaluations per sample", ylabel=quality, ylim=(0, 1),
              title=f"quality against evaluations (guidance {result['nfe']['guidance']})")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps of each model")
    parser.add_argument("--ae-steps", type=int, default=1800, help="the shared autoencoder's training steps")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--points", type=int, default=5, help="scores along each training curve")
    parser.add_argument("--nfe-guidance", type=float, default=1.0)
    parser.add_argument("--dataset", choices=("shapes", "mnist"), default="shapes")
    parser.add_argument("--quick", action="store_true", help="seconds: checks that the script runs")
    parser.add_argument("--results", default=None, help="folder for the .json and .png (default benchmarks/results)")
    args = parser.parse_args(argv)
    config = DemoConfig.smoke() if args.quick else DemoConfig()
    steps, ae_steps = (6, 3) if args.quick else (args.steps, args.ae_steps)

    result = {"machine": machine(), "settings": vars(args), "objectives": {}}
    folder = Path(args.results) if args.results else RESULTS
    stem = ("objectives" if args.dataset == "shapes" else "objectives_mnist") + ("_quick" if args.quick else "")

    def save(result):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        return folder / f"{stem}.json"

    if args.dataset == "shapes":
        dataset = ShapesDataset(config.image_size, config.num_images, config.seed, "train", progress=False)
    else:  # MNIST digits at 32 px, grey: the same models with a 1-channel autoencoder
        mnist = load_mnist("train", size=32, progress=False)
        n = 256 if args.quick else len(mnist.images)
        dataset = SimpleNamespace(images=mnist.images[:n], captions=mnist.captions[:n])
    autoencoder = build_autoencoder(config) if args.dataset == "shapes" else AutoencoderKL(AutoencoderConfig(
        1, config.latent_channels, config.ae_channels, norm_num_groups=config.ae_norm_groups))
    torch.manual_seed(config.seed)
    cached = (Path(os.environ.get("MINILDM_CACHE") or Path.home() / ".cache" / "minildm")
              / f"objectives_{args.dataset}_ae_{ae_steps}")
    t = time.perf_counter()
    if not args.quick and (cached / "autoencoder.json").is_file():
        autoencoder = AutoencoderKL.load(cached)
        print(f"autoencoder: reused {cached}", flush=True)
    else:
        ae = train_autoencoder(autoencoder, dataset.images, TrainingConfig.for_autoencoder(
            steps=ae_steps, batch_size=config.ae_batch_size, lr=config.ae_lr, seed=config.seed, progress=False))
        print(f"autoencoder: {ae['steps'][0]} steps in {time.perf_counter() - t:.0f} s", flush=True)
        if not args.quick:
            autoencoder.save(cached)
    result["autoencoder"] = {"steps": ae_steps, "config": autoencoder.config_dict() if hasattr(autoencoder,
                             "config_dict") else None}
    scorer = Scorer(ShapesChecker.cached(config.image_size), args.quick) if args.dataset == "shapes" else \
        MnistScorer(args.quick)

    models = {}
    for name in args.models:
        ldm = build(name, config, autoencoder, dataset.captions)
        parameters = sum(p.numel() for p in ldm.backbone.parameters())
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        print(f"{name}: {parameters / 1e6:.2f}M backbone parameters, load average {load}", flush=True)
        run = train_with_curve(ldm, dataset, config, steps, scorer, args.points)
        result["objectives"][name] = {"parameters": parameters, "load_average_before": load, **run}
        models[name] = ldm
        save(result)  # after every model: a crash keeps what was measured

    # Training cost: milliseconds per step on fresh copies, timed alternately; the curves' time axis is
    # steps x this, the time each model's steps cost on this machine.
    fresh = {name: build(name, config, autoencoder, dataset.captions) for name in args.models}
    result["step_ms"] = step_times(fresh, dataset, config, 3 if args.quick else 30)
    print(f"training step (batch {config.ldm_batch_size}), ms, timed alternately: {result['step_ms']}", flush=True)
    for name, run in result["objectives"].items():
        for point in run["curve"]:
            point["train_s"] = round(point["step"] * result["step_ms"][name] / 1000, 1)
    save(result)

    result["nfe"] = {"guidance": args.nfe_guidance, "runs": {}}
    for name in ("unet_eps", "unet_flow"):
        if name in models:
            print(f"{name}: quality against evaluations, guidance {args.nfe_guidance}", flush=True)
            result["nfe"]["runs"][name] = nfe_sweep(models[name], scorer, args.nfe_guidance,
                                                    (1, 2, 4) if args.quick else NFES)
    eps = result["nfe"]["runs"].get("unet_eps")
    if eps:
        ddim50 = next((r for r in eps["ddim"] if r["evaluations"] == max(NFES)), None)
        dpm10 = next((r for r in eps["dpm_solver"] if r["evaluations"] == 10), None)
        if ddim50 and dpm10:
            gap = ddim50["quality"] - dpm10["quality"]
            result["nfe"]["target"] = {"ddim_50": ddim50["quality"], "dpm_solver_10": dpm10["quality"],
                                       "gap_points": round(100 * gap, 1), "met": gap <= 0.02,
                                       "ddim_50_below_90": ddim50["quality"] < 0.9}
            print(f"target: DPM-Solver++ at 10 evaluations {dpm10['quality']:.1%} vs DDIM-50 "
                  f"{ddim50['quality']:.1%} (gap {100 * gap:.1f} points; met: {gap <= 0.02})")
    result["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = save(result)
    plot(result, folder / f"{stem}.png")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
