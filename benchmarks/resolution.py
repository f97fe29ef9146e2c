"""How cost grows with image size, in pixel space (f=1) and in an f=4 latent space (issue 5, item 4).

For 32, 64 and 128 px images, the same UNet design (the demo's: channels (64, 64), a spatial transformer at
the second level, cross-attention to 16 text tokens of width 128) runs either on the 3-channel pixels (f=1)
or on the 4-channel latents of the demo's f=4 autoencoder (H/4 x W/4). The data are random: the cost does
not depend on what the images show. Batch 8 throughout.

    training step  one AdamW step on the UNet (median of alternating repeats). The latent step leaves out
                   the encoder, as minildm trains: the autoencoder is frozen, so each image is encoded once
                   before training (the encoder's cost per batch is listed apart). The same step with the
                   UNet and its inputs in channels_last memory format is timed alongside.
    sampling       DDIM-50 with classifier-free guidance: 50 guided steps (one UNet call on 2 x 8 inputs
                   and the sampler's step each) and, for f=4, decoding the latents. The time is
                   50 x the median time of one step + the median time of one decode; the loop adds
                   nothing else (benchmarks/sampling.py measures generate() against its UNet calls).

The UNet's convolutions see f^2 = 16x fewer positions in latent space at every size, and its attention,
whose cost grows with the square of the positions, 256x fewer pairs; the f=1 / f=4 ratio grows with
resolution because attention's share of the pixel model's cost does.

    python -m benchmarks.resolution [--quick] [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.samplers import DDIMSampler
from minildm.schedule import NoiseSchedule
from minildm.unet import UNet2DConditionModel, UNetConfig

from .common import add_device_arguments, autocast, git_commit, machine, setup_device, time_interleaved, write_result

TEXT_LENGTH, TEXT_WIDTH = 16, 128
SAMPLING_STEPS = 50


def demo_unet(in_channels: int) -> UNet2DConditionModel:
    """The demo's UNet design (DemoConfig: channels (64, 64), attention at level 2, 16 groups)."""
    return UNet2DConditionModel(UNetConfig(in_channels=in_channels, out_channels=in_channels,
                                           block_out_channels=(64, 64), attention_levels=(False, True),
                                           cross_attention_dim=TEXT_WIDTH, norm_num_groups=16))


def training_step_fn(unet, x0, text_states, schedule, device):
    """One step of eq. (2)/(3): noise x0 at random timesteps, predict the noise, AdamW."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def step():
        t = torch.randint(0, schedule.num_train_timesteps, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        with autocast(device):
            loss = F.mse_loss(unet(schedule.add_noise(x0, noise, t), t, text_states).float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def guided_step_fn(unet, x_t, text_states, scheduler, device, guidance_scale: float = 3.0):
    """One DDIM step with classifier-free guidance, as LatentDiffusion.generate() takes it."""
    t = scheduler.timesteps[len(scheduler.timesteps) // 2]
    uncond_states = torch.zeros_like(text_states)  # stands in for the empty prompt's states

    def step():
        with torch.no_grad(), autocast(device):
            both = unet(torch.cat([x_t, x_t]), t, torch.cat([uncond_states, text_states]))  # (2B, c, h, w)
            out_uncond, out_cond = both.chunk(2)
            scheduler.step(out_uncond + guidance_scale * (out_cond - out_uncond), t, x_t)
    return step


def measure(size: int, batch_size: int, repeats: int, device) -> dict:
    generator = torch.Generator().manual_seed(size)
    schedule = NoiseSchedule()
    scheduler = DDIMSampler(schedule)
    scheduler.set_timesteps(SAMPLING_STEPS)
    images = (torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1).to(device)  # (B, 3, H, W)
    text_states = torch.randn(batch_size, TEXT_LENGTH, TEXT_WIDTH, generator=generator).to(device)
    autoencoder = AutoencoderKL(AutoencoderConfig(3, 4, (16, 32, 64), norm_num_groups=8)).to(device)  # the demo's
    with torch.no_grad():
        latents = autoencoder.encode(images).mode()  # (B, 4, H/4, W/4)

    row = {"image_size": size, "batch_size": batch_size}
    for name, x0 in (("f1", images), ("f4", latents)):
        unet = demo_unet(x0.shape[1]).to(device)
        unet_cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        steps = {"train": training_step_fn(unet, x0, text_states, schedule, device),
                 "train_channels_last": training_step_fn(unet_cl, x0.to(memory_format=torch.channels_last),
                                                         text_states, schedule, device),
                 "sampling_step": guided_step_fn(unet, torch.randn_like(x0), text_states, scheduler, device)}
        if name == "f4":
            def decode():
                with torch.no_grad(), autocast(device):
                    autoencoder.decode(latents)

            def encode():
                with torch.no_grad(), autocast(device):
                    autoencoder.encode(images)
            steps |= {"decode": decode, "encode": encode}
        times = time_interleaved(steps, repeats, warmup=1)
        row[name] = {
            "latent_shape": list(x0.shape[1:]),
            "train_step_s": times["train"],
            "train_step_channels_last_s": times["train_channels_last"],
            "sampling_step_s": times["sampling_step"],
            "sampling_s": SAMPLING_STEPS * times["sampling_step"] + times.get("decode", 0.0),
        }
        if name == "f4":
            row[name] |= {"decode_s": times["decode"], "encode_s": times["encode"]}
    row["train_ratio"] = row["f1"]["train_step_s"] / row["f4"]["train_step_s"]
    row["sampling_ratio"] = row["f1"]["sampling_s"] / row["f4"]["sampling_s"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 and 64 px, batch 2, 2 repeats: checks that it runs")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --quick)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    torch.manual_seed(0)
    sizes = (32, 64) if args.quick else (32, 64, 128)
    batch_size = args.batch_size if args.batch_size is not None else (2 if args.quick else 8)
    rows = []
    print(f"batch {batch_size}; DDIM-{SAMPLING_STEPS} sampling with guidance (2 x {batch_size} per UNet call)")
    print(f"{'size':>6}{'train f=1':>12}{'train f=4':>12}{'ratio':>8}{'sample f=1':>13}{'sample f=4':>13}{'ratio':>8}"
          f"{'  channels_last train f=1, f=4':>32}")
    for size in sizes:
        repeats = 2 if args.quick else (5 if size < 128 else 3)  # a 128 px pixel-space step takes seconds
        r = measure(size, batch_size, repeats, device)
        r["repeats"] = repeats
        rows.append(r)
        cl = [r[f]["train_step_channels_last_s"] / r[f]["train_step_s"] for f in ("f1", "f4")]
        print(f"{size:>4}px{r['f1']['train_step_s'] * 1e3:>10.0f}ms{r['f4']['train_step_s'] * 1e3:>10.0f}ms"
              f"{r['train_ratio']:>7.1f}x{r['f1']['sampling_s']:>12.2f}s{r['f4']['sampling_s']:>12.2f}s"
              f"{r['sampling_ratio']:>7.1f}x{'':>14}x{cl[0]:.2f}, x{cl[1]:.2f}", flush=True)
    result = {"batch_size": batch_size, "sampling_steps": SAMPLING_STEPS, "device": str(device),
              "unet_params": {"f1": sum(p.numel() for p in demo_unet(3).parameters()),
                              "f4": sum(p.numel() for p in demo_unet(4).parameters())},
              "rows": rows, "machine": machine(), "git": git_commit()}
    if not args.quick:
        name = "resolution" if batch_size == 8 else f"resolution_batch{batch_size}"
        print(f"wrote {write_result(name, result, device)}")
    return result


if __name__ == "__main__":
    main()
