"""Conditioning by concatenation and by class (issue 15), at toy scale, equal training steps for every model.

Every model is benchmarks/objectives.py's UNet (the demo's: 64, 64 channels, cross-attention at 8x8) trained as
a rectified flow (the objective that learned fastest there) with the demo's settings (batch 64, lr 1e-3, EMA 0.999)
for --steps steps on the frozen f = 4 autoencoder objectives.py trains and caches ($MINILDM_CACHE/
objectives_{shapes,mnist}_ae_1800); samples use Euler, 25 steps. The backbone differs only in its input channels.

(a) Inpainting on ShapesDataset (InpaintingCondition: [z_t, mask, E(x ⊙ (1 - m))], random rectangles and brush
    strokes in training, caption of the whole image). Measured on 60 test images per kind, each masked by a
    rectangle that covers the original shape and the asked-for one (2 px margin): the prompt asks for another
    colour ("colour"), another shape ("shape"), or the original caption ("same"). The ShapesChecker reads the
    result (all four attributes of the prompt right), and PSNR outside the mask against the original (images in
    [0, 1], peak 1), next to the autoencoder's own reconstruction there (the ceiling a latent model has).
(b) Super-resolution (LowResCondition(scale=4): 8x8 -> 32x32, the low-res image at the latents' size) on MNIST
    and ShapesDataset: PSNR against the ground truth of 200 test images, next to bicubic upsampling and the
    autoencoder's reconstruction; on MNIST also KID (the cached MNIST classifier's features) against 200 other
    test digits, with the KID of real vs real as its floor. Guidance 1 (the caption adds little to the image).
(c) Class-conditional MNIST (ClassEmbedder: one token per class, the null class for guidance) against the same
    UNet with notebook 06's text encoder (128 wide, 2 layers) on the captions: prompt accuracy of 200 samples
    (20 per digit) by the cached classifier, with Wilson intervals, along training (raw weights) and at the end
    (EMA weights) at guidance 3 and 1, and KID at the end.

    python -m benchmarks.conditioning [--steps 1200] [--parts inpainting sr class] [--quick]

Writes benchmarks/results/conditioning.json and conditioning.png (examples in conditioning_examples.png).
Timings are of a shared 2-core machine (measured under contention) and are not the point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import torch
import torch.nn.functional as F

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.class_embedder import ClassEmbedder, ClassEmbedderConfig
from minildm.concat_conditioning import InpaintingCondition, LowResCondition
from minildm.demo import DemoConfig, build_autoencoder
from minildm.fid import kid, label_accuracy, proportion_ci
from minildm.flow import FlowMatchSchedule
from minildm.ldm import LatentDiffusion
from minildm.metrics import ShapesChecker
from minildm.mnist import load_mnist
from minildm.shapes import COLORS, SHAPES, ShapesDataset, caption, render_masks
from minildm.text import TextEncoder
from minildm.train import TrainingConfig, train_autoencoder, train_ldm
from minildm.unet import UNet2DConditionModel, UNetConfig

from .common import RESULTS, machine
from .objectives import EVAL_GUIDANCE, EVAL_STEPS, MnistScorer

SEED = 1234  # the sampling noise


# ---- shared pieces ----------------------------------------------------------------------------------------------


def cached_autoencoder(dataset: str, images: torch.Tensor, config: DemoConfig, quick: bool) -> AutoencoderKL:
    """objectives.py's autoencoder for `dataset` (1800 steps, cached in $MINILDM_CACHE), trained if missing."""
    cached = (Path(os.environ.get("MINILDM_CACHE") or Path.home() / ".cache" / "minildm")
              / f"objectives_{dataset}_ae_1800")
    if not quick and (cached / "autoencoder.json").is_file():
        print(f"autoencoder: reused {cached}", flush=True)
        return AutoencoderKL.load(cached).eval()
    torch.manual_seed(config.seed)
    autoencoder = build_autoencoder(config) if dataset == "shapes" else AutoencoderKL(AutoencoderConfig(
        1, config.latent_channels, config.ae_channels, norm_num_groups=config.ae_norm_groups))
    train_autoencoder(autoencoder, images, TrainingConfig.for_autoencoder(
        steps=3 if quick else 1800, batch_size=config.ae_batch_size, lr=config.ae_lr, seed=config.seed,
        progress=False))
    if not quick:
        autoencoder.save(cached)
    return autoencoder.eval()


def build(autoencoder, conditioner, config: DemoConfig, concat_conditioning=None) -> LatentDiffusion:
    """objectives.py's UNet as a rectified flow, with the condition's extra input channels."""
    torch.manual_seed(config.seed)
    c = autoencoder.config.latent_channels
    extra = concat_conditioning.extra_channels(autoencoder) if concat_conditioning is not None else 0
    unet = UNet2DConditionModel(UNetConfig(
        in_channels=c + extra, out_channels=c, block_out_channels=config.unet_channels,
        attention_levels=config.unet_attention_levels, cross_attention_dim=conditioner.hidden_size,
        norm_num_groups=config.unet_norm_groups))
    return LatentDiffusion(autoencoder, unet, FlowMatchSchedule(), conditioner, "flow_prediction",
                           image_size=config.image_size, concat_conditioning=concat_conditioning)


def text_encoder(captions, config: DemoConfig) -> TextEncoder:
    torch.manual_seed(config.seed)
    return TextEncoder.from_captions(captions, hidden_size=config.text_hidden_size, num_layers=config.text_layers)


def training(config: DemoConfig, steps: int, callback_every: int | None = None) -> TrainingConfig:
    return TrainingConfig(steps=steps, batch_size=config.ldm_batch_size, lr=config.ldm_lr, ema_decay=config.ema_decay,
                          seed=config.seed, progress=False, callback_every=callback_every)


def psnr_where(reference: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, peak 1) over the pixels where keep (B, 1, H, W) is 1; images (B, C, H, W) in [0, 1]."""
    weight = keep.expand_as(reference).double()
    mse = ((reference.double() - image.double()).pow(2) * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-12))  # (B,)


def summary(values: torch.Tensor) -> dict:
    return {"mean": round(values.mean().item(), 2), "std": round(values.std().item(), 2), "n": len(values)}


def wilson(successes: int, n: int) -> dict:
    low, high = proportion_ci(successes, n)
    return {"accuracy": successes / n, "ci95": [round(low, 4), round(high, 4)], "n": n}


# ---- (a) inpainting -------------------------------------------------------------------------------------------


def inpainting_cases(per_kind: int, size: int):
    """Test images (N, 3, H, W) in [0, 1], masks (N, 1, H, W), prompts and the attributes each prompt asks for, and
    the kind of each case: the prompt asks for another colour, another shape, or the original caption."""
    test = ShapesDataset(size, per_kind, seed=1, split="train", progress=False)
    images = (test.images + 1) / 2
    colours, cases = list(COLORS), {"images": [], "masks": [], "prompts": [], "wanted": [], "kinds": []}
    for kind in ("colour", "shape", "same"):
        for image, attributes in zip(images, test.attributes):
            if kind == "colour":
                wanted = dataclasses.replace(attributes, color=colours[(colours.index(attributes.color) + 1) % 4])
            elif kind == "shape":
                wanted = dataclasses.replace(attributes, shape=SHAPES[(SHAPES.index(attributes.shape) + 1) % 3])
            else:
                wanted = attributes
            # a rectangle that hides the original shape and has room for the asked-for one, 2 px margin
            covered = (image.amax(0) > 0.02) | torch.from_numpy(render_masks([wanted], size)[0] > 0.02)  # (H, W)
            rows, cols = covered.any(1).nonzero()[:, 0], covered.any(0).nonzero()[:, 0]
            mask = torch.zeros(1, size, size)
            mask[:, max(0, rows.min() - 2): rows.max() + 3, max(0, cols.min() - 2): cols.max() + 3] = 1
            for key, value in zip(("images", "masks", "prompts", "wanted", "kinds"),
                                  (image, mask, caption(wanted), wanted, kind)):
                cases[key].append(value)
    cases["images"], cases["masks"] = torch.stack(cases["images"]), torch.stack(cases["masks"])
    return cases


def run_inpainting(config: DemoConfig, steps: int, quick: bool) -> dict:
    data = ShapesDataset(config.image_size, config.num_images, config.seed, "train", progress=False)
    autoencoder = cached_autoencoder("shapes", data.images, config, quick)
    ldm = build(autoencoder, text_encoder(data.captions, config), config, InpaintingCondition())
    start = time.perf_counter()
    history = train_ldm(ldm, data.images, data.captions, training(config, steps))
    print(f"inpainting: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    cases = inpainting_cases(4 if quick else 60, config.image_size)
    results = ldm.generate(cases["prompts"], EVAL_STEPS, guidance_scale=EVAL_GUIDANCE, image=cases["images"],
                           mask_image=cases["masks"], generator=torch.Generator().manual_seed(SEED))
    reconstruction = ldm.decode_latents(ldm.encode_images(cases["images"] * 2 - 1))  # D(E(x)), the ceiling
    checker = ShapesChecker.cached(config.image_size)
    readings = checker.read(results)
    keep = 1 - cases["masks"]
    out = {"steps": steps, "wall_s_shared_machine": round(history["seconds"][0], 1),
           "mask_area": round(cases["masks"].mean().item(), 3), "kinds": {}}
    for kind in ("colour", "shape", "same"):
        which = [i for i, k in enumerate(cases["kinds"]) if k == kind]
        right = [readings[i] == cases["wanted"][i] for i in which]
        attribute_right = {name: sum(readings[i] is not None and getattr(readings[i], name) ==
                                     getattr(cases["wanted"][i], name) for i in which) / len(which)
                           for name in ("color", "shape", "size", "position")}
        idx = torch.tensor(which)
        out["kinds"][kind] = {
            "all_attributes": wilson(sum(right), len(which)), "per_attribute": attribute_right,
            "psnr_outside_mask": summary(psnr_where(cases["images"][idx], results[idx], keep[idx])),
            "autoencoder_psnr_outside_mask": summary(psnr_where(cases["images"][idx], reconstruction[idx],
                                                                keep[idx])),
        }
        k = out["kinds"][kind]
        print(f"  {kind:6s}: all attributes {k['all_attributes']['accuracy']:.1%} {k['all_attributes']['ci95']}, "
              f"PSNR outside the mask {k['psnr_outside_mask']['mean']:.1f} dB (autoencoder "
              f"{k['autoencoder_psnr_outside_mask']['mean']:.1f} dB)", flush=True)
    picks = [i for kind in ("colour", "shape") for i in [j for j, k in enumerate(cases["kinds"]) if k == kind][:4]]
    examples = {"original": cases["images"][picks], "mask": cases["masks"][picks], "result": results[picks],
                "prompts": [cases["prompts"][i] for i in picks]}
    return out, examples


# ---- (b) super-resolution -------------------------------------------------------------------------------------


def run_super_resolution(dataset: str, config: DemoConfig, steps: int, quick: bool, mnist_scorer=None) -> dict:
    if dataset == "shapes":
        data = ShapesDataset(config.image_size, config.num_images, config.seed, "train", progress=False)
        test = ShapesDataset(config.image_size, 8 if quick else 200, seed=1, split="train", progress=False)
        truth, prompts = test.images, test.captions
    else:
        mnist = load_mnist("train", size=32, progress=False)
        n = 256 if quick else len(mnist.images)
        data = SimpleNamespace(images=mnist.images[:n], captions=mnist.captions[:n])
        test = load_mnist("test", size=32, progress=False)
        order = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(0))
        picked = order[400:408] if quick else order[400:600]  # not the scorer's real sets (order[:400])
        truth, prompts = test.images[picked], [test.captions[i] for i in picked.tolist()]
    autoencoder = cached_autoencoder(dataset, data.images, config, quick)
    condition = LowResCondition(scale=4)
    ldm = build(autoencoder, text_encoder(data.captions, config), config, condition)
    start = time.perf_counter()
    history = train_ldm(ldm, data.images, data.captions, training(config, steps))
    print(f"super-resolution on {dataset}: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    truth01 = (truth + 1) / 2
    low = condition.downsample(truth01)  # (N, C, 8, 8)
    upscaled = ldm.generate(prompts, EVAL_STEPS, guidance_scale=1.0, image=low,
                            generator=torch.Generator().manual_seed(SEED))
    bicubic = F.interpolate(low, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    reconstruction = ldm.decode_latents(ldm.encode_images(truth))
    everywhere = torch.ones_like(truth01[:, :1])
    out = {"steps": steps, "wall_s_shared_machine": round(history["seconds"][0], 1), "low_res": list(low.shape[2:]),
           "psnr": {name: summary(psnr_where(truth01, images, everywhere))
                    for name, images in (("model", upscaled), ("bicubic", bicubic), ("autoencoder", reconstruction))}}
    if mnist_scorer is not None:
        out["kid"] = {name: round(kid(mnist_scorer.real, images * 2 - 1, mnist_scorer.classifier).mean, 4)
                      for name, images in (("model", upscaled), ("bicubic", bicubic))}
        out["kid"]["real_vs_real"] = round(mnist_scorer.kid_floor.mean, 4)
    print(f"  PSNR: model {out['psnr']['model']['mean']:.2f} dB, bicubic {out['psnr']['bicubic']['mean']:.2f} dB, "
          f"autoencoder {out['psnr']['autoencoder']['mean']:.2f} dB; KID {out.get('kid')}", flush=True)
    examples = {"truth": truth01[:6], "low": low[:6], "bicubic": bicubic[:6], "model": upscaled[:6]}
    return out, examples


# ---- (c) class-conditional vs text-conditional ----------------------------------------------------------------


class DigitScorer(MnistScorer):
    """objectives.MnistScorer (200 samples, 20 per digit, the cached classifier; KID against 200 test digits and its
    real-vs-real floor) for a text model (canonical captions) or a class model (class_labels); returns the images."""

    def __call__(self, ldm: LatentDiffusion, guidance: float = EVAL_GUIDANCE, with_kid: bool = False) -> dict:
        condition = {"class_labels": self.labels.tolist()} if isinstance(ldm.conditioner, ClassEmbedder) else \
            {"prompts": self.prompts}
        images = ldm.generate(**condition, num_inference_steps=EVAL_STEPS, guidance_scale=guidance,
                              generator=torch.Generator().manual_seed(SEED)).cpu()
        x = images * 2 - 1
        n = len(self.labels)
        score = {"guidance": guidance, **wilson(round(label_accuracy(x, self.labels, self.classifier) * n), n)}
        if with_kid:
            score["kid"] = round(kid(self.real, x, self.classifier).mean, 4)
            score["kid_real_vs_real"] = round(self.kid_floor.mean, 4)
        return score, images


def run_class_vs_text(config: DemoConfig, steps: int, quick: bool, scorer: DigitScorer, points: int) -> dict:
    mnist = load_mnist("train", size=32, progress=False)
    n = 256 if quick else len(mnist.images)
    images, labels, captions = mnist.images[:n], mnist.labels[:n], mnist.captions[:n]
    autoencoder = cached_autoencoder("mnist", images, config, quick)
    torch.manual_seed(config.seed)
    models = {"class": build(autoencoder, ClassEmbedder(ClassEmbedderConfig(10, config.text_hidden_size)), config),
              "text": build(autoencoder, text_encoder(captions, config), config)}
    out, samples = {}, {}
    for name, ldm in models.items():
        curve = []

        def callback(step, ldm=ldm, curve=curve, name=name):
            score, _ = scorer(ldm)
            curve.append({"step": step, "weights": "raw", **score})
            print(f"    {name} step {step}: {score['accuracy']:.1%}", flush=True)

        condition = {"class_labels": labels} if name == "class" else {"captions": captions}
        start = time.perf_counter()
        history = train_ldm(ldm, images, config=training(config, steps, max(1, steps // points)), callback=callback,
                            **condition)
        final, pictures = scorer(ldm, EVAL_GUIDANCE, with_kid=True)
        curve.append({"step": steps, "weights": "ema", **final})
        unguided, _ = scorer(ldm, 1.0)
        out[name] = {"steps": steps, "wall_s_shared_machine": round(history["seconds"][0], 1),
                     "training_s_including_scoring": round(time.perf_counter() - start, 1),
                     "conditioner_parameters": sum(p.numel() for p in ldm.conditioner.parameters()),
                     "curve": curve, "final": final, "final_guidance_1": unguided}
        samples[name] = pictures
        print(f"  {name}: {final['accuracy']:.1%} {final['ci95']} at guidance {EVAL_GUIDANCE}, "
              f"{unguided['accuracy']:.1%} at 1; KID {final['kid']} (real vs real {final['kid_real_vs_real']})",
              flush=True)
    return out, samples


# ---- pictures -------------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if "inpainting" in result:
        kinds = result["inpainting"]["kinds"]
        names = list(kinds)
        acc = [kinds[k]["all_attributes"]["accuracy"] for k in names]
        err = [[a - kinds[k]["all_attributes"]["ci95"][0] for a, k in zip(acc, names)],
               [kinds[k]["all_attributes"]["ci95"][1] - a for a, k in zip(acc, names)]]
        axes[0].bar(names, acc, yerr=err, capsize=4)
        for i, k in enumerate(names):
            axes[0].text(i, 0.03, f"{kinds[k]['psnr_outside_mask']['mean']:.1f} dB\noutside", ha="center",
                         color="white", fontsize=8)
        axes[0].set(ylim=(0, 1), ylabel="all four attributes right (ShapesChecker)",
                    title=f"inpainting, n = {kinds[names[0]]['all_attributes']['n']} per prompt kind")
    if "super_resolution" in result:
        datasets = list(result["super_resolution"])
        width = 0.25
        for j, name in enumerate(("bicubic", "model", "autoencoder")):
            values = [result["super_resolution"][d]["psnr"][name]["mean"] for d in datasets]
            axes[1].bar([i + (j - 1) * width for i in range(len(datasets))], values, width, label=name)
        axes[1].set_xticks(range(len(datasets)), datasets)
        axes[1].set(ylabel="PSNR against the ground truth (dB)", title="super-resolution 8x8 -> 32x32")
        axes[1].legend(fontsize=8)
    if "class_vs_text" in result:
        for name, run in result["class_vs_text"].items():
            xs = [p["step"] for p in run["curve"]]
            ys = [p["accuracy"] for p in run["curve"]]
            err = [[y - p["ci95"][0] for y, p in zip(ys, run["curve"])],
                   [p["ci95"][1] - y for y, p in zip(ys, run["curve"])]]
            axes[2].errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{name}-conditioned")
        n = next(iter(result["class_vs_text"].values()))["final"]["n"]
        axes[2].set(ylim=(0, 1), xlabel="training steps (last point: EMA weights)",
                    ylabel=f"prompt accuracy (n = {n}, 95% Wilson)", title=f"MNIST, guidance {EVAL_GUIDANCE}")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(examples: dict, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    if "inpainting" in examples:
        e = examples["inpainting"]
        shown = e["original"] * (1 - e["mask"]) + 0.5 * e["mask"]
        rows += [("original", e["original"]), ("masked (grey = repaint)", shown), ("result", e["result"])]
    for dataset in ("mnist", "shapes"):
        if f"sr_{dataset}" in examples:
            e = examples[f"sr_{dataset}"]
            low = F.interpolate(e["low"], scale_factor=4, mode="nearest")
            rows += [(f"{dataset} 8x8 input", low), ("bicubic", e["bicubic"]), ("model", e["model"]),
                     ("ground truth", e["truth"])]
    if not rows:
        return
    columns = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 1.35 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                image = images[c].permute(1, 2, 0).clamp(0, 1).numpy()
                ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1)
            if c == 0:
                ax.set_title(label, fontsize=7, loc="left")
    if "inpainting" in examples:
        for c, prompt in enumerate(examples["inpainting"]["prompts"][:columns]):
            axes[2][c].set_title(prompt.replace(" at the", "\nat the").replace(" in the", "\nin the"), fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps of every model")
    parser.add_argument("--parts", nargs="+", default=["inpainting", "sr", "class"],
                        choices=["inpainting", "sr", "class"])
    parser.add_argument("--points", type=int, default=4, help="scores along the class / text training curves")
    parser.add_argument("--quick", action="store_true", help="seconds: checks that the script runs")
    parser.add_argument("--results", default=None, help="folder for the .json and .png (default benchmarks/results)")
    args = parser.parse_args(argv)
    config = DemoConfig.smoke() if args.quick else DemoConfig()
    steps = 4 if args.quick else args.steps
    folder = Path(args.results) if args.results else RESULTS
    stem = "conditioning" + ("_quick" if args.quick else "")
    path = folder / f"{stem}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}  # a part run alone keeps the others
    result.update({"machine": machine(), "settings": {**vars(args), "eval_steps": EVAL_STEPS, "sampler": "euler",
                                                      "objective": "flow"}})
    examples = {}

    def save():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")

    if "inpainting" in args.parts:
        result["inpainting"], examples["inpainting"] = run_inpainting(config, steps, args.quick)
        save()
    scorer = DigitScorer(args.quick) if ("sr" in args.parts or "class" in args.parts) else None
    if "sr" in args.parts:
        result["super_resolution"] = {}
        for dataset in ("mnist", "shapes"):
            result["super_resolution"][dataset], examples[f"sr_{dataset}"] = run_super_resolution(
                dataset, config, steps, args.quick, scorer if dataset == "mnist" else None)
            save()
    if "class" in args.parts:
        result["class_vs_text"], _ = run_class_vs_text(config, steps, args.quick, scorer, args.points)
        save()
    result["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    save()
    plot(result, folder / f"{stem}.png")
    plot_examples(examples, folder / f"{stem}_examples.png")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
