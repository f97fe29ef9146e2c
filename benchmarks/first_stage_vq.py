"""VQ against KL first stage (issue 15; the LDM paper's two regularisations, Rombach et al. 2022, section 3.1 and
table 8, at toy scale), on MNIST and ShapesDataset, one machine, one run, equal training steps.

Part 1, the first stage. Each trains the same steps with the same settings (the demo's autoencoder: channels
16-32-64, f = 4, 4 latent channels, batch 16, lr 2e-3):
  - kl:             AutoencoderKL, kl_weight 1e-6 (autoencoder.py);
  - vq:             VQModel, K codes learned by VQ-VAE's codebook term, β = 0.25 (vq.py);
  - vq_ema_restart: the same VQModel with an EMA codebook (γ 0.99) and dead-code restarts (unused 50 steps).
Scored on held-out images (MNIST: the first 1000 test digits; shapes: 1000 images of another seed): PSNR of the
clamped reconstruction, and on MNIST the domain FID and KID of the reconstructions against the images themselves
(fid.fid / fid.kid with the cached MNIST classifier; 0 would be perfect), and each VQ model's codebook usage
(the held-out codes' perplexity and how many of the K codes they use; the training's final perplexity and dead
codes).

Part 2, the downstream LDM on each of kl and the VQ model with the better held-out PSNR: the same UNet rectified
flow as benchmarks/objectives.py's unet_flow (its `build`; batch 64, lr 1e-3, EMA 0.99 of the weights, shorter
than the demo's 0.999 for these short runs), the same steps on each first stage's frozen
latents (the VQ models' pre-quantisation latents, the quantiser absorbed into the decoder), scored as
objectives.py scores (its Scorer: 120 shapes prompts, all four attributes right by ShapesChecker; its
MnistScorer: 200 prompted digits read by the MNIST classifier, and KID), guidance 3, Euler 25 steps, with
Wilson intervals.

    python -m benchmarks.first_stage_vq [--ae-steps 500] [--ldm-steps 400] [--codes 256] [--quick]

Writes benchmarks/results/first_stage_vq.json and .png. Step times are measured under contention (a shared
2-core machine): read only the quality columns as results.
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
from minildm.demo import DemoConfig
from minildm.fid import dataset_classifier, fid, kid, psnr
from minildm.metrics import ShapesChecker
from minildm.mnist import load_mnist
from minildm.shapes import ShapesDataset
from minildm.train import TrainingConfig, train_autoencoder, train_ldm
from minildm.vq import VQModel, VQModelConfig, codebook_perplexity

from .common import RESULTS, git_commit, machine
from .objectives import MnistScorer, Scorer, build

FIRST_STAGES = ("kl", "vq", "vq_ema_restart")
LDM_EMA_DECAY = 0.99  # the demo's 0.999 averages over more steps than these short runs have


def first_stage(name: str, channels: int, config: DemoConfig, codes: int):
    """An untrained first stage of the demo's size for images of `channels` channels."""
    sizes = {"in_channels": channels, "latent_channels": config.latent_channels,
             "block_out_channels": config.ae_channels, "norm_num_groups": config.ae_norm_groups}
    torch.manual_seed(config.seed)
    if name == "kl":
        return AutoencoderKL(AutoencoderConfig(**sizes))
    codebook = {"codebook_ema_decay": 0.99, "restart_dead_codes": True, "dead_code_steps": 50} \
        if name == "vq_ema_restart" else {}
    return VQModel(VQModelConfig(**sizes, num_vq_embeddings=codes, **codebook))


@torch.no_grad()
def reconstruction_scores(model, held_out: torch.Tensor, classifier) -> dict:
    reconstructions = torch.cat([model(held_out[i : i + 250]) for i in range(0, len(held_out), 250)]).clamp(-1, 1)
    scores = {"psnr_db": round(psnr(held_out, reconstructions), 2)}
    if classifier is not None:
        scores["fid"] = round(fid(held_out, reconstructions, classifier), 3)
        distance = kid(held_out, reconstructions, classifier)
        scores["kid"], scores["kid_std"] = distance.mean, distance.std
    if isinstance(model, VQModel):
        indices = torch.cat([model.quantize(model.encode(held_out[i : i + 250]).mean).indices
                             for i in range(0, len(held_out), 250)])
        counts = torch.bincount(indices.flatten(), minlength=model.config.num_vq_embeddings).float()
        scores["held_out_perplexity"] = round(codebook_perplexity(counts).item(), 1)
        scores["held_out_codes_used"] = int((counts > 0).sum())
    return scores, reconstructions


def plot(result: dict, pictures: dict, path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result["datasets"])
    fig, axes = plt.subplots(len(datasets), 3, figsize=(14, 3.8 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        run = result["datasets"][dataset]
        names = list(run["first_stages"])
        left, middle, right = row
        left.bar(names, [run["first_stages"][n]["psnr_db"] for n in names], color=["C0", "C1", "C2"][: len(names)])
        left.set(ylabel="held-out PSNR (dB)", title=f"{dataset}: reconstruction, {run['ae_steps']} steps each")
        for name in names:
            history = run["first_stages"][name].get("perplexity_history")
            if history:
                middle.plot(range(1, len(history) + 1), history, label=name)
        middle.set(xlabel="training step", ylabel="batch codebook perplexity exp(H)", yscale="log",
                   title=f"{dataset}: codebook usage (K = {result['settings']['codes']})")
        middle.legend(fontsize=8)
        ldms = run["ldm"]
        xs = list(ldms)
        ys = [ldms[n]["quality"] for n in xs]
        errors = [[ldms[n]["quality"] - ldms[n]["ci95"][0] for n in xs], [ldms[n]["ci95"][1] - ldms[n]["quality"]
                                                                         for n in xs]]
        right.bar(xs, ys, yerr=errors, capsize=4, color="C4")
        n = ldms[xs[0]]["n"] if xs else 0
        right.set(ylim=(0, 1), ylabel="prompt accuracy" if dataset == "mnist" else "all four attributes right",
                  title=f"{dataset}: LDM after {run['ldm_steps']} steps (n = {n}, 95% Wilson)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    for dataset, images in pictures.items():  # originals over each first stage's reconstructions
        fig, grid = plt.subplots(len(images), 1, figsize=(10, 1.3 * len(images)))
        for ax, (name, batch) in zip(grid, images.items()):
            strip = torch.cat(list((batch[:10] + 1) / 2), dim=2)  # (C, H, 10 W)
            ax.imshow(strip.permute(1, 2, 0).squeeze(-1).clamp(0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title(name, fontsize=9, loc="left")
        fig.tight_layout()
        fig.savefig(Path(path).with_name(f"{Path(path).stem}_{dataset}_reconstructions.png"), dpi=100)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ae-steps", type=int, default=500, help="training steps of each first stage")
    parser.add_argument("--ldm-steps", type=int, default=400, help="training steps of each downstream LDM")
    parser.add_argument("--codes", type=int, default=256, help="K, the VQ models' codebook size")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "shapes"], choices=["mnist", "shapes"])
    parser.add_argument("--quick", action="store_true", help="seconds: checks that the script runs")
    parser.add_argument("--results", default=None, help="folder for the .json and .png (default benchmarks/results)")
    args = parser.parse_args(argv)
    config = DemoConfig.smoke() if args.quick else DemoConfig()
    ae_steps, ldm_steps = (4, 4) if args.quick else (args.ae_steps, args.ldm_steps)
    folder = Path(args.results) if args.results else RESULTS
    stem = "first_stage_vq" + ("_quick" if args.quick else "")
    result = {"machine": machine(), "git": git_commit(), "settings": vars(args), "datasets": {}}
    pictures = {}

    def save():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        return folder / f"{stem}.json"

    for dataset_name in args.datasets:
        n_held_out = 64 if args.quick else 1000
        if dataset_name == "mnist":
            train = load_mnist("train", size=32, progress=False)
            test = load_mnist("test", size=32, progress=False)
            n = 256 if args.quick else len(train.images)
            dataset = SimpleNamespace(images=train.images[:n], captions=train.captions[:n])
            held_out, channels = test.images[:n_held_out], 1
            classifier = dataset_classifier("mnist", progress=False, **({"steps": 20, "cache_dir": tempfile.mkdtemp()}
                                                                         if args.quick else {}))
            scorer = MnistScorer(args.quick)
        else:
            dataset = ShapesDataset(config.image_size, 256 if args.quick else 10000, config.seed, "train",
                                    progress=False)
            held_out = ShapesDataset(config.image_size, n_held_out, config.seed + 1, "train", progress=False).images
            channels, classifier = 3, None
            scorer = Scorer(ShapesChecker.cached(config.image_size), args.quick)
        run = {"ae_steps": ae_steps, "ldm_steps": ldm_steps, "first_stages": {}, "ldm": {}}
        result["datasets"][dataset_name] = run
        models, pictures[dataset_name] = {}, {"original": held_out[:10]}
        for name in FIRST_STAGES:
            model = first_stage(name, channels, config, args.codes)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            start = time.perf_counter()
            history = train_autoencoder(model, dataset.images, TrainingConfig.for_autoencoder(
                steps=ae_steps, batch_size=config.ae_batch_size, lr=config.ae_lr, seed=config.seed, progress=False))
            seconds = time.perf_counter() - start
            scores, reconstructions = reconstruction_scores(model, held_out, classifier)
            entry = {"parameters": sum(p.numel() for p in model.parameters()), "load_average_before": load,
                     "train_s_under_contention": round(seconds, 1), "scaling_factor": model.scaling_factor, **scores}
            if isinstance(model, VQModel):
                entry["final_perplexity"] = round(sum(history["perplexity"][-20:]) / 20, 1)  # mean of the last 20
                entry["final_dead_codes"] = history["dead_codes"][-1]
                entry["codes_restarted"] = sum(history.get("restarted_codes", []))
                entry["perplexity_history"] = [round(p, 2) for p in history["perplexity"]]
            run["first_stages"][name] = entry
            models[name] = model
            pictures[dataset_name][name] = reconstructions[:10]
            print(f"{dataset_name} {name}: {ae_steps} steps in {seconds:.0f} s; " + ", ".join(
                f"{k} {v}" for k, v in scores.items()) + (f"; final perplexity {entry['final_perplexity']}, dead "
                                                          f"codes {entry['final_dead_codes']:.0f}"
                                                          if "final_perplexity" in entry else ""), flush=True)
            save()
        best_vq = max(("vq", "vq_ema_restart"), key=lambda n: run["first_stages"][n]["psnr_db"])
        run["ldm_first_stages"] = ["kl", best_vq]
        for name in run["ldm_first_stages"]:
            ldm = build("unet_flow", config, models[name], dataset.captions)
            start = time.perf_counter()
            train_ldm(ldm, dataset.images, dataset.captions, TrainingConfig(
                steps=ldm_steps, batch_size=config.ldm_batch_size, lr=config.ldm_lr, ema_decay=LDM_EMA_DECAY,
                seed=config.seed, progress=False))
            seconds = time.perf_counter() - start
            score = scorer(ldm)
            run["ldm"][name] = {**score, "train_s_under_contention": round(seconds, 1)}
            print(f"{dataset_name} LDM on {name}: {ldm_steps} steps in {seconds:.0f} s; quality "
                  f"{score['quality']:.1%} [{score['ci95'][0]:.1%}, {score['ci95'][1]:.1%}] of {score['n']}"
                  + (f", KID {score['kid']:.4f} (real vs real {score['kid_real_vs_real']:.4f})"
                     if "kid" in score else ""), flush=True)
            save()
    result["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = save()
    plot(result, pictures, folder / f"{stem}.png")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
