"""Sampling speed: images per second of LatentDiffusion.generate(), and what generate() adds to the UNet
calls it makes (issue 5, item 3).

The model has the demo's size (DemoConfig: the f=4 autoencoder, 32x32x3 images <-> 8x8x4 latents, the
(64, 64) UNet and the text encoder), untrained: the speed does not depend on the weights. For DDIM-50 and
DDPM-1000 at batch 1 and 64, with classifier-free guidance at the demo's best scale, 3 (so each step is one
UNet call on a batch of 2B):

    images/s   B / the median time of generate()
    overhead   generate()'s time / the time of the same UNet calls alone - 1

"The same UNet calls" are the num_inference_steps calls on (2B, 4, 8, 8) latents that one generate() made,
recorded with a forward pre-hook and replayed with nothing around them. The two are timed alternately, and
the overhead is the median over rounds of the ratio within a round, minus 1: what generate() adds to its UNet
calls, that is encoding the prompts, drawing the first noise, the guidance arithmetic, the sampler's steps
and decoding the latents. Target: under 5%. That work is also timed on its own (everything_but_the_unet),
which says where an overhead comes from.

The samplers are the ones the recorded results were measured with, passed explicitly (`old_sampler`):
DDIM with Stable Diffusion's settings ("leading" spacing, steps_offset=1) and DDPM with "leading" spacing,
not generate()'s default (make_sampler(): "trailing" spacing). The spacing picks other timesteps, not other
work: a step costs the same at any t.

    python -m benchmarks.sampling [--quick] [--threads 1] [--device cuda] [--only ddpm:64 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from minildm.demo import DemoConfig, build_autoencoder, build_model
from minildm.samplers import DDIMSampler, DDPMSampler, randn_tensor
from minildm.shapes import ShapesDataset

from .common import (
    add_device_arguments,
    autocast,
    git_commit,
    interleaved_samples,
    machine,
    paired_ratios,
    setup_device,
    write_result,
)

GUIDANCE_SCALE = 3.0


def old_sampler(ldm, name: str):
    """The sampler "ddim" or "ddpm" meant when the recorded results were measured: the samplers' own defaults
    ("leading" spacing; DDIM with steps_offset=1 and set_alpha_to_one=False), not ldm.make_sampler(name)'s."""
    sampler_class = {"ddim": DDIMSampler, "ddpm": DDPMSampler}[name]
    return sampler_class(ldm.schedule, prediction_type=ldm.prediction_type)


def generate_fn(ldm, prompts: list[str], sampler: str, num_inference_steps: int, device):
    def generate():
        generator = torch.Generator().manual_seed(0)
        with autocast(device):
            # The sampler is built in the timed call, as generate() builds its default one on every call.
            ldm.generate(prompts, num_inference_steps, sampler=old_sampler(ldm, sampler),
                         guidance_scale=GUIDANCE_SCALE, generator=generator)
    return generate


def bare_unet_calls(ldm, prompts: list[str], sampler: str, num_inference_steps: int, device):
    """A function making exactly the UNet calls (ldm.backbone) one generate() makes for `prompts`, with nothing
    around them.

    A forward pre-hook records the inputs of each call during one generate(); the function replays them."""
    inputs = []

    def record(module, args):
        sample, timestep, states = args
        # Every call gets the same text states, cat([uncond, cond]): keep one, not one per step.
        inputs.append((sample, timestep, inputs[0][2] if inputs else states))

    hook = ldm.backbone.register_forward_pre_hook(record)
    try:
        generate_fn(ldm, prompts, sampler, num_inference_steps, device)()
    finally:
        hook.remove()

    def run():
        with torch.no_grad(), autocast(device):
            for sample, timestep, states in inputs:
                ldm.backbone(sample, timestep, states)
    return run


def everything_but_the_unet(ldm, prompts: list[str], sampler: str, num_inference_steps: int, device):
    """generate()'s work without its UNet calls: prompts, first noise, guidance, sampler steps, decoding."""
    scheduler = old_sampler(ldm, sampler)
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(0)
    shape = (len(prompts), *ldm.latent_shape())  # (B, c, h, w)
    both = torch.randn(2 * len(prompts), *shape[1:], device=device)  # stands in for the UNet's output

    def run():
        with torch.no_grad(), autocast(device):
            ldm.conditioner.encode(prompts)
            ldm.conditioner.encode([ldm.conditioner.null_condition] * len(prompts))
            latents = randn_tensor(shape, generator, device) * scheduler.init_noise_sigma  # z_T, as generate() draws it
            for t in scheduler.timesteps:
                out_uncond, out_cond = both.chunk(2)
                model_output = out_uncond + GUIDANCE_SCALE * (out_cond - out_uncond)
                latents = scheduler.step(model_output, t, latents, generator=generator).prev_sample
            ldm.decode_latents(latents)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, small batches: checks that it runs")
    parser.add_argument("--only", nargs="+", metavar="SAMPLER:BATCH", default=None,
                        help="run these settings only, e.g. ddpm:64 (results go to sampling_only_ddpm_64.json)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds for each setting run")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    torch.manual_seed(0)
    # (sampler, steps, batch size, repeats, warm-up calls): DDPM-1000 at batch 64 takes a minute or two a call
    if args.quick:
        settings = [("ddim", 5, 1, 2, 1), ("ddim", 5, 4, 2, 1), ("ddpm", 20, 1, 2, 1), ("ddpm", 20, 4, 2, 1)]
    else:
        settings = [("ddim", 50, 1, 21, 2), ("ddim", 50, 64, 7, 1), ("ddpm", 1000, 1, 11, 1), ("ddpm", 1000, 64, 2, 0)]
        if device.type == "cuda":  # GPU timings vary less, and a lent GPU's minutes are few
            settings = [("ddim", 50, 1, 15, 2), ("ddim", 50, 64, 15, 2),
                        ("ddpm", 1000, 1, 3, 1), ("ddpm", 1000, 64, 3, 1)]

    if args.only is not None:
        available = [f"{sampler}:{batch}" for sampler, _, batch, _, _ in settings]
        if not set(args.only) <= set(available):
            parser.error(f"--only takes SAMPLER:BATCH from {' '.join(available)}, got {' '.join(args.only)}")
        settings = [row for row, name in zip(settings, available) if name in args.only]
    if args.repeats is not None:
        settings = [(sampler, steps, batch, args.repeats, warmup) for sampler, steps, batch, _, warmup in settings]

    config = DemoConfig(objective="epsilon")  # the ε-model these timings were first measured on (DDPM, DDIM)
    data = ShapesDataset(length=max(batch for _, _, batch, _, _ in settings), seed=0, progress=False)
    ldm = build_model(config, build_autoencoder(config), data.captions).to(device).eval()
    rows = []
    for sampler, steps, batch_size, repeats, warmup in settings:
        prompts = data.captions[:batch_size]
        samples = interleaved_samples({"generate": generate_fn(ldm, prompts, sampler, steps, device),
                                       "unet_calls": bare_unet_calls(ldm, prompts, sampler, steps, device),
                                       "rest": everything_but_the_unet(ldm, prompts, sampler, steps, device)},
                                      repeats, warmup)
        times = {name: statistics.median(values) for name, values in samples.items()}
        ratios = paired_ratios(samples, "unet_calls")
        rows.append({"sampler": sampler, "num_inference_steps": steps, "batch_size": batch_size,
                     "repeats": repeats, "generate_s": times["generate"], "unet_calls_s": times["unet_calls"],
                     "everything_but_the_unet_s": times["rest"], "images_per_s": batch_size / times["generate"],
                     "overhead": ratios["generate"] - 1, "everything_but_the_unet_share": ratios["rest"]})
        r = rows[-1]
        print(f"{sampler.upper()}-{steps:<5} batch {batch_size:>3}: {r['images_per_s']:8.2f} images/s "
              f"({r['generate_s']:.3f} s a call), overhead over the bare UNet calls {100 * r['overhead']:+.1f}% "
              f"(the work around them alone: {100 * ratios['rest']:.1f}%)", flush=True)
    result = {"guidance_scale": GUIDANCE_SCALE, "device": str(device),
              "unet_params": sum(p.numel() for p in ldm.backbone.parameters()),
              "latent_shape": list(ldm.latent_shape()), "rows": rows, "machine": machine(), "git": git_commit()}
    worst = max(rows, key=lambda r: r["overhead"])
    print(f"largest overhead: {100 * worst['overhead']:+.1f}% ({worst['sampler'].upper()}-"
          f"{worst['num_inference_steps']}, batch {worst['batch_size']}; target < 5%)")
    if not args.quick:
        name = "sampling" if args.only is None else "sampling_only_" + "_".join(i.replace(":", "_") for i in args.only)
        print(f"wrote {write_result(name, result, device)}")
    return result


if __name__ == "__main__":
    main()
