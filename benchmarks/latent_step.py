"""Latent vs pixel training step: the paper's cost argument in one number.

Two UNets of the same design and (nearly) the same parameter count, one trained on 32x32x3 pixels and
one on the 8x8x4 latents of an f=4 autoencoder, each taking one AdamW step on a batch of 64 with its
text encoder. The latent step does 16x fewer positions per convolution, and its attention sees 16x fewer
tokens. Target (issue 2): the latent step is at least 5x faster.

The latent step excludes the encoder, as minildm's training does: the autoencoder is frozen, so each
image is encoded once before training (train.encode_dataset). The encoder's cost per image is reported
too, for comparison.

    python -m benchmarks.latent_step [--quick]
"""

from __future__ import annotations

import argparse

import torch

from minildm.demo import DemoConfig, build_autoencoder, build_model
from minildm.schedule import NoiseSchedule
from minildm.shapes import ShapesDataset
from minildm.unet import UNet2DConditionModel, UNetConfig

from .common import machine, time_alternating, write_result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few repeats only: checks that it runs")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 15
    torch.manual_seed(0)

    config = DemoConfig(objective="epsilon")  # the ε-model these timings were first measured on (DDPM, DDIM)
    data = ShapesDataset(length=args.batch_size, seed=0, progress=False)
    latent_ldm = build_model(config, build_autoencoder(config), data.captions)
    # The pixel model: the same UNet design and text encoder, on 3-channel 32x32 images.
    pixel_unet = UNet2DConditionModel(UNetConfig(
        in_channels=3, out_channels=3, block_out_channels=config.unet_channels,
        attention_levels=config.unet_attention_levels, cross_attention_dim=config.text_hidden_size,
        norm_num_groups=config.unet_norm_groups))
    pixel_text = build_model(config, build_autoencoder(config), data.captions).conditioner
    schedule = NoiseSchedule()

    latents = latent_ldm.encode_images(data.images)  # (B, 4, 8, 8)
    pixels = data.images  # (B, 3, 32, 32)
    latent_params = [*latent_ldm.backbone.parameters(), *latent_ldm.conditioner.parameters()]
    pixel_params = [*pixel_unet.parameters(), *pixel_text.parameters()]
    latent_opt = torch.optim.AdamW(latent_params, 1e-4)
    pixel_opt = torch.optim.AdamW(pixel_params, 1e-4)

    def step(unet, text_encoder, optimizer, x0):
        t = torch.randint(0, 1000, (len(x0),))
        noise = torch.randn_like(x0)
        loss = (unet(schedule.add_noise(x0, noise, t), t, text_encoder.encode(data.captions)) - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def encode():
        with torch.no_grad():
            latent_ldm.first_stage.encode(pixels)

    times = time_alternating({
        "latent_step": lambda: step(latent_ldm.backbone, latent_ldm.conditioner, latent_opt, latents),
        "pixel_step": lambda: step(pixel_unet, pixel_text, pixel_opt, pixels),
        "encode_batch": encode,
    }, repeats)
    result = {
        "batch_size": args.batch_size,
        "latent_unet_params": sum(p.numel() for p in latent_ldm.backbone.parameters()),
        "pixel_unet_params": sum(p.numel() for p in pixel_unet.parameters()),
        "latent_step_s": times["latent_step"], "pixel_step_s": times["pixel_step"],
        "encode_batch_s": times["encode_batch"],
        "speedup": times["pixel_step"] / times["latent_step"],
        "speedup_if_encoding_every_step": times["pixel_step"] / (times["latent_step"] + times["encode_batch"]),
        "repeats": repeats, "machine": machine(),
    }
    print(f"{'':24}{'latent (8x8x4)':>16}{'pixel (32x32x3)':>18}")
    print(f"{'UNet parameters':24}{result['latent_unet_params']:>16,}{result['pixel_unet_params']:>18,}")
    print(f"{'training step (median)':24}{times['latent_step'] * 1e3:>14.1f}ms{times['pixel_step'] * 1e3:>16.1f}ms")
    print(f"latent step is {result['speedup']:.1f}x faster (target >= 5x); "
          f"{result['speedup_if_encoding_every_step']:.1f}x even if every batch were encoded anew")
    if not args.quick:
        print(f"wrote {write_result('latent_step', result)}")
    return result


if __name__ == "__main__":
    main()
