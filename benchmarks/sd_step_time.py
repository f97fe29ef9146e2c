"""What one Stable Diffusion 1.5 step costs in minildm's own modules, at the real size (issue 16).

The networks are built from the real SD 1.5 configs (minildm.pretrained.SD15_UNET_CONFIG, SD_VAE_CONFIG and CLIP
ViT-L/14's text tower) with random weights: no download, and the cost of a forward pass does not depend on the
values of the weights. For a 512x512 image with classifier-free guidance one sampling step is one UNet call on a
batch of 2 (the prompt and ""), 64x64x4 latents and 77 text tokens of width 768; the prompt is encoded once and
the VAE decodes once per image. Each is timed as the median of --repeats calls after one warm-up, under
torch.no_grad(), in float32 on the CPU (float16 on a CUDA GPU, --device cuda).

    python -m benchmarks.sd_step_time [--repeats 3] [--threads N] [--device cuda]

Writes benchmarks/results/sd_step_time.json (sd_step_time_cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minildm.autoencoder import AutoencoderKL
from minildm.clip import CLIPTextConfig, CLIPTextModel
from minildm.pretrained import (
    SD15_UNET_CONFIG,
    SD_VAE_CONFIG,
    autoencoder_config_from_diffusers,
    unet_config_from_diffusers,
)
from minildm.unet import UNet2DConditionModel

from .common import add_device_arguments, git_commit, machine, setup_device, write_result


def median_seconds(fn, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    times = []
    for i in range(repeats + 1):  # the first call is the warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(unet_config_from_diffusers(SD15_UNET_CONFIG)).to(device, dtype).eval()
    vae = AutoencoderKL(autoencoder_config_from_diffusers(SD_VAE_CONFIG)).to(device, dtype).eval()
    text = CLIPTextModel(CLIPTextConfig.sd15()).to(device, dtype).eval()
    latents = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    states = torch.randn(2, 77, 768, device=device, dtype=dtype)
    ids = torch.randint(0, 49408, (2, 77), device=device)
    with torch.no_grad():
        unet_s, unet_all = median_seconds(lambda: unet(latents, 500, states), args.repeats, device)
        text_s, text_all = median_seconds(lambda: text(ids), args.repeats, device)
        vae_s, vae_all = median_seconds(lambda: vae.decode(latents[:1]), args.repeats, device)
    parameters = {name: sum(p.numel() for p in m.parameters()) for name, m in
                  (("unet", unet), ("vae", vae), ("text_encoder", text))}
    result = {
        "what": "SD 1.5 at 512x512 in minildm's modules, random weights: seconds per call (median after a warm-up)",
        "dtype": str(dtype), "device": str(device), "repeats": args.repeats, "parameters": parameters,
        "unet_step_batch2_s": unet_s, "unet_step_batch2_all_s": unet_all,
        "text_encoder_batch2_s": text_s, "vae_decode_s": vae_s, "vae_decode_all_s": vae_all,
        "image_50_steps_s": 50 * unet_s + text_s + vae_s,
        "machine": machine(), "git": git_commit(),
    }
    path = write_result("sd_step_time", result, device)
    print(f"UNet step (batch 2, 64x64 latents): {unet_s:.2f} s; text encoder {text_s:.2f} s; VAE decode {vae_s:.2f} s;"
          f" a 50-step image about {result['image_50_steps_s'] / 60:.1f} min -> {path}")


if __name__ == "__main__":
    main()
