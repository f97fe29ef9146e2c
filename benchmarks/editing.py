"""Editing with a trained model, no retraining (issue 15): inversion, prompt swap, img2img and blended inpainting
on the demo's model (a rectified flow on ShapesDataset, 32x32, f = 4; `python -m minildm demo`).

Images: one ShapesDataset rendering per attribute combination (120), jittered (render_batch with a seeded rng),
in [0, 1]. Measures:
  - inversion: PSNR of generate(caption, latents=invert(image, caption)) against the image, over steps (guidance 1)
    and over guidance (the same guidance to invert and to regenerate; and inverted at 1, regenerated at s), next to
    the first stage's own reconstruction D(E(x)), the ceiling; also with 2 fixed-point iterations per step.
  - prompt swap: every image x each of the 3 other colours (360 cases), caption -> the caption with the colour
    word changed. "colour changed": the ShapesChecker reads the target colour; "kept": it reads the original's
    shape, size and position; IoU: the shape's mask in the edit against the original's, a mask being the pixels
    whose brightest channel is at least half the image's 99th percentile of it (the shape covers more than half
    of the pixel, whatever its colour; the same function on both images). Next to the baseline an edit must beat:
    a fresh sample of the target caption (generate, seeded), at guidance 1 and 3.
  - shape swap (circle -> square etc., 240 cases): shape changed, colour and position kept.
  - img2img strength sweep on the 360 colour cases (target caption, guidance 1 and 3): the same measures.
  - blended inpainting: mask = the shape's bounding box grown by 3 px; prompt = another colour (360) or another
    shape (240); colour / shape read, and PSNR outside the mask against the original (without pasting; pasting
    makes it infinite), next to the reconstruction's PSNR there.

    python -m benchmarks.editing [--model /work/exp/demo_model/model] [--part inversion|swap|img2img|inpaint|all]
                                 [--quick]

Writes benchmarks/results/editing.json and editing.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import torch

from benchmarks.common import RESULTS, git_commit, machine, write_result
from minildm import LatentDiffusion, editing
from minildm.metrics import ShapesChecker
from minildm.shapes import COLORS, SHAPES, all_combinations, caption, render_batch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STEPS = (1, 2, 5, 10, 20, 50)
FIXED_POINT_STEPS = (1, 2, 5, 10)
GUIDANCE = (1.0, 2.0, 3.0, 5.0, 7.5)
STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
PARTS = ("inversion", "swap", "img2img", "inpaint")


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """Mean over images of 10 log10(1 / MSE), images in [0, 1]; `where` (B, 1, H, W) limits the MSE to a region."""
    error = (a - b) ** 2
    if where is None:
        mse = error.flatten(1).mean(1)
    else:
        weight = where.expand_as(error).float()
        mse = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1)
    return (10 * torch.log10(1 / mse.clamp(min=1e-10))).mean().item()


def shape_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W) bool: brightest channel >= half the image's 99th percentile of it."""
    brightness = images.amax(dim=1)  # (B, H, W)
    peak = brightness.flatten(1).quantile(0.99, dim=1).clamp(min=0.05)  # (B,)
    return brightness >= 0.5 * peak[:, None, None]


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ma, mb = shape_mask(a), shape_mask(b)
    return (ma & mb).sum((1, 2)).float() / (ma | mb).sum((1, 2)).clamp(min=1).float()  # (B,)


class Scorer:
    def __init__(self, checker: ShapesChecker, originals: torch.Tensor, source: list, target: list, changed: str):
        self.checker, self.originals, self.source, self.target, self.changed = checker, originals, source, target, \
            changed

    def __call__(self, edited: torch.Tensor) -> dict:
        readings = self.checker.read(edited)
        kept_fields = [f for f in ("color", "shape", "size", "position") if f != self.changed]
        changed = [r is not None and getattr(r, self.changed) == getattr(t, self.changed)
                   for r, t in zip(readings, self.target)]
        kept = [r is not None and all(getattr(r, f) == getattr(s, f) for f in kept_fields)
                for r, s in zip(readings, self.source)]
        overlap = iou(edited, self.originals)
        return {f"{self.changed}_changed": float(np.mean(changed)), "others_kept": float(np.mean(kept)),
                "iou_at_least_0.8": (overlap >= 0.8).float().mean().item(), "iou_mean": overlap.mean().item(),
                "n": len(edited)}


def swap_cases(attributes, images, field: str):
    """Every image with every other value of `field`: (originals, source attributes, target attributes)."""
    values = list(COLORS) if field == "color" else list(SHAPES)
    index, targets = [], []
    for i, a in enumerate(attributes):
        for value in values:
            if value != getattr(a, field):
                index.append(i)
                targets.append(replace(a, **{field: value}))
    return images[index], [attributes[i] for i in index], targets


def setup(args):
    ldm = LatentDiffusion.load(args.model)
    checker = ShapesChecker.cached(32)
    attributes = all_combinations()
    if args.quick:
        attributes = attributes[::10]
    rng = np.random.default_rng(0)
    pixels = render_batch(attributes, 32, rng=rng)  # (N, 32, 32, 3) in [0, 1], jittered
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return ldm, checker, attributes, images


def box_masks(batch: torch.Tensor) -> torch.Tensor:
    """(B, 1, 32, 32): the bounding box of each image's shape mask, grown by 3 px on every side."""
    masks = torch.zeros(len(batch), 1, *batch.shape[2:])
    for i, inside in enumerate(shape_mask(batch)):
        ys, xs = torch.nonzero(inside, as_tuple=True)
        masks[i, 0, max(ys.min() - 3, 0):ys.max() + 4, max(xs.min() - 3, 0):xs.max() + 4] = 1
    return masks


def part_inversion(ldm, checker, attributes, images, n_steps, quick) -> dict:
    captions = [caption(a) for a in attributes]
    reconstruction = editing.reconstruct(ldm, images)
    result = {"first_stage_psnr": psnr(reconstruction, images),
              "first_stage_iou_mean": iou(reconstruction, images).mean().item(),
              "first_stage_reads_right": checker.score(reconstruction, attributes)}

    def roundtrip(steps, invert_guidance, generate_guidance, iterations=0):
        z = ldm.invert(images, captions, steps, guidance_scale=invert_guidance, fixed_point_iterations=iterations)
        back = ldm.generate(captions, steps, latents=z, guidance_scale=generate_guidance)
        return {"psnr": psnr(back, images), "psnr_vs_reconstruction": psnr(back, reconstruction),
                "latent_std": z.std().item()}

    result["inversion_over_steps"] = {str(s): roundtrip(s, 1.0, 1.0) for s in (STEPS if not quick else (1, 5))}
    result["inversion_over_steps_fixed_point_2"] = {str(s): roundtrip(s, 1.0, 1.0, 2)
                                                    for s in (FIXED_POINT_STEPS if not quick else (1, 5))}
    result["inversion_over_guidance"] = {str(g): roundtrip(n_steps, g, g) for g in GUIDANCE}
    result["inversion_at_1_regenerated_at_guidance"] = {str(g): roundtrip(n_steps, 1.0, g) for g in GUIDANCE}
    return result


def colour_cases(attributes, images):
    originals, sources, targets = swap_cases(attributes, images, "color")
    return originals, sources, targets, [caption(a) for a in sources], [caption(a) for a in targets]


def part_swap(ldm, checker, attributes, images, n_steps, quick) -> dict:
    originals, sources, targets, src_captions, tgt_captions = colour_cases(attributes, images)
    score = Scorer(checker, originals, sources, targets, "color")
    variants = {  # name -> prompt_swap keyword arguments
        "full inversion, guidance 1": {},
        "full inversion, guidance 3 (null prompt)": {"guidance_scale": 3.0},
        "full inversion, guidance 3 against the source prompt": {"guidance_scale": 3.0,
                                                                 "negative_prompts": src_captions},
        "inversion to strength 0.8, guidance 1": {"strength": 0.8},
        "inversion to strength 0.6, guidance 1": {"strength": 0.6},
        "full inversion + 2 fixed-point iterations, guidance 1": {"fixed_point_iterations": 2},
    }
    result = {"colour_cases": len(originals), "prompt_swap_colour": {
        name: score(editing.prompt_swap(ldm, originals, src_captions, tgt_captions, n_steps, **settings))
        for name, settings in variants.items()}}
    result["fresh_sample_colour"] = {
        f"guidance {g:g}": score(ldm.generate(tgt_captions, n_steps, guidance_scale=g,
                                              generator=torch.Generator().manual_seed(0))) for g in (1.0, 3.0)}
    s_originals, s_sources, s_targets = swap_cases(attributes, images, "shape")
    s_score = Scorer(checker, s_originals, s_sources, s_targets, "shape")
    s_src, s_tgt = [caption(a) for a in s_sources], [caption(a) for a in s_targets]
    result["shape_cases"] = len(s_originals)
    result["prompt_swap_shape"] = {
        "full inversion, guidance 1": s_score(editing.prompt_swap(ldm, s_originals, s_src, s_tgt, n_steps)),
        "inversion to strength 0.8, guidance 1": s_score(editing.prompt_swap(ldm, s_originals, s_src, s_tgt, n_steps,
                                                                             strength=0.8))}
    result["fresh_sample_shape"] = {"guidance 1": s_score(ldm.generate(
        s_tgt, n_steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)))}
    return result


def part_img2img(ldm, checker, attributes, images, n_steps, quick) -> dict:
    originals, sources, targets, _, tgt_captions = colour_cases(attributes, images)
    score = Scorer(checker, originals, sources, targets, "color")
    return {"img2img_colour": {f"guidance {g:g}": {str(strength): score(ldm.img2img(
        originals, tgt_captions, strength, n_steps, guidance_scale=g, generator=torch.Generator().manual_seed(0)))
        for strength in STRENGTHS} for g in (1.0, 3.0)}}


def part_inpaint(ldm, checker, attributes, images, n_steps, quick) -> dict:
    inpainting = {}
    for field in ("color", "shape"):
        originals, _, targets = swap_cases(attributes, images, field)
        prompts = [caption(a) for a in targets]
        masks = box_masks(originals)
        outside = 1 - masks
        reconstruction = editing.reconstruct(ldm, originals)
        for g in (1.0, 3.0):
            out = ldm.inpaint(originals, masks, prompts, n_steps, guidance_scale=g,
                              generator=torch.Generator().manual_seed(0))
            readings = checker.read(out)
            inpainting[f"{field}, guidance {g:g}"] = {
                f"{field}_as_asked": float(np.mean([r is not None and getattr(r, field) == getattr(t, field)
                                                    for r, t in zip(readings, targets)])),
                "all_attributes_as_asked": checker.score(out, targets)["all"],
                "psnr_outside_mask": psnr(out, originals, outside),
                "reconstruction_psnr_outside_mask": psnr(reconstruction, originals, outside),
                "mask_area_fraction": masks.mean().item(), "n": len(originals)}
    return {"blended_inpainting": inpainting}


def examples(ldm, attributes, images, n_steps) -> dict:
    """Eight colour edits spread over the cases, each way, for the figure."""
    originals, _, targets, src_captions, tgt_captions = colour_cases(attributes, images)
    pick = np.linspace(0, len(originals) - 1, 8).round().astype(int).tolist()
    originals, src, tgt = originals[pick], [src_captions[i] for i in pick], [tgt_captions[i] for i in pick]
    masks = box_masks(originals)
    return {"target": tgt, "original": originals,
            "prompt swap": editing.prompt_swap(ldm, originals, src, tgt, n_steps),
            "img2img 0.6": ldm.img2img(originals, tgt, 0.6, n_steps, generator=torch.Generator().manual_seed(0)),
            "fresh sample": ldm.generate(tgt, n_steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)),
            "mask": masks,
            "inpaint (mask)": ldm.inpaint(originals, masks, tgt, n_steps, generator=torch.Generator().manual_seed(0))}


def plot(result: dict, examples: dict, path: Path) -> None:
    fig = plt.figure(figsize=(15, 9.5))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.2], hspace=0.35, wspace=0.25)
    ax = fig.add_subplot(grid[0, 0])
    for key, style, label in (("inversion_over_steps", "o-", "invert + regenerate"),
                              ("inversion_over_steps_fixed_point_2", "s--", "with 2 fixed-point iterations")):
        ax.plot([int(s) for s in result[key]], [v["psnr"] for v in result[key].values()], style, label=label)
    ax.axhline(result["first_stage_psnr"], color="gray", ls=":", label="D(E(x)), the ceiling")
    ax.axhline(30, color="red", lw=0.8, label="target 30 dB")
    ax.set(xscale="log", xlabel="steps (Euler)", ylabel="PSNR vs the image (dB)", title="inversion, guidance 1")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 1])
    for key, style, label in (("inversion_over_guidance", "o-", "inverted and regenerated at s"),
                              ("inversion_at_1_regenerated_at_guidance", "s--", "inverted at 1, regenerated at s")):
        ax.plot([float(k) for k in result[key]], [v["psnr"] for v in result[key].values()], style, label=label)
    ax.axhline(30, color="red", lw=0.8)
    ax.set(xlabel="guidance scale s", ylabel="PSNR vs the image (dB)",
           title=f"inversion at {result['num_inference_steps']} steps")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 2])
    for name, style in (("guidance 1", "-"), ("guidance 3", "--")):
        sweep = result["img2img_colour"][name]
        strengths = [float(k) for k in sweep]
        ax.plot(strengths, [v["color_changed"] for v in sweep.values()], "o" + style, color="C0",
                label=f"colour changed, {name}")
        ax.plot(strengths, [v["iou_at_least_0.8"] for v in sweep.values()], "s" + style, color="C1",
                label=f"IoU >= 0.8, {name}")
    swap = result["prompt_swap_colour"]["full inversion, guidance 1"]
    fresh = result["fresh_sample_colour"]["guidance 1"]
    ax.plot([1.0], [swap["color_changed"]], "*", ms=14, color="C0", label="prompt swap: colour changed")
    ax.plot([1.0], [swap["iou_at_least_0.8"]], "*", ms=14, color="C1", label="prompt swap: IoU >= 0.8")
    ax.plot([1.0], [fresh["iou_at_least_0.8"]], "x", ms=10, color="k", label="fresh sample: IoU >= 0.8")
    ax.set(xlabel="img2img strength", ylabel=f"share of {result['colour_cases']} edits", ylim=(0, 1.02),
           title="img2img to another colour")
    ax.legend(fontsize=7)
    rows = ["original", "prompt swap", "img2img 0.6", "fresh sample", "mask", "inpaint (mask)"]
    sub = grid[1, :].subgridspec(len(rows), 8, wspace=0.05, hspace=0.08)
    for r, row in enumerate(rows):
        for c in range(8):
            ax = fig.add_subplot(sub[r, c])
            image = examples[row][c]
            ax.imshow(image[0] if row == "mask" else image.permute(1, 2, 0).clamp(0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row, fontsize=8, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(examples["target"][c].replace(" at the ", "\n").replace(" in the ", "\n"), fontsize=7)
    fig.suptitle("Editing the demo's flow model without retraining (image titles: the target prompt; guidance 3 for "
                 "img2img and inpainting, 1 for the rest)")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/work/exp/demo_model/model")
    parser.add_argument("--part", choices=(*PARTS, "all", "plot"), default="all",
                        help="one part at a time keeps each run a few minutes; its numbers join the json")
    parser.add_argument("--quick", action="store_true", help="12 images, 10 steps: a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    ldm, checker, attributes, images = setup(args)
    n_steps = 50 if not args.quick else 10
    name = "editing_quick" if args.quick else "editing"
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"model": str(args.model), "images": len(images), "num_inference_steps": n_steps})
    for part in (PARTS if args.part == "all" else () if args.part == "plot" else (args.part,)):
        start = time.perf_counter()
        result.update(globals()[f"part_{part}"](ldm, checker, attributes, images, n_steps, args.quick))
        result.setdefault("seconds", {})[part] = time.perf_counter() - start
        result.setdefault("machine", {})[part] = machine()
        result["commit"] = git_commit()
        write_result(name, result)
        print(f"{part}: {time.perf_counter() - start:.0f} s, wrote {path}", flush=True)
    if all(key in result for key in ("inversion_over_steps", "prompt_swap_colour", "img2img_colour",
                                     "blended_inpainting")):
        plot(result, examples(ldm, attributes, images, n_steps), RESULTS / f"{name}.png")
        print(f"wrote {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
