"""MNIST text-to-image from scratch within 15 minutes of a 2-core CPU (issue 3's target).

Trains an f = 4 autoencoder (32x32x1 padded digits <-> 8x8x4 latents) and a text-conditioned latent
diffusion model on the 60,000 training digits with captions such as "the number seven, handwritten",
all inside the budget (`--minutes`, default 15). Then, for "a handwritten digit k", k = 0..9:

  - prompt accuracy: the share of samples the MNIST classifier (fid.dataset_classifier) reads as k,
    at each guidance scale; target >= 97% at the best one. The samples come from the DDIM the recorded
    results used, Stable Diffusion's "leading" spacing with steps_offset=1 (DDIMSampler's own defaults),
    not generate()'s default ("trailing");
  - domain FID of the samples against the test set, next to the floor: test set against training set;
  - the autoencoder alone: reconstruction PSNR and domain FID on the test set, and the classifier's
    accuracy on reconstructions against real test images (target: within 1 point, the decoder keeps
    the digit).

    python -m benchmarks.mnist_ldm [--minutes 15] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.fid import dataset_classifier, fid, label_accuracy, psnr
from minildm.ldm import LatentDiffusion
from minildm.mnist import load_mnist
from minildm.samplers import DDIMSampler
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder
from minildm.train import TrainingConfig, train_autoencoder, train_ldm
from minildm.unet import UNet2DConditionModel, UNetConfig

from .common import machine, write_result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget, both stages (default 15)")
    parser.add_argument("--samples-per-digit", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="seconds, a few steps: checks that it runs")
    parser.add_argument("--root", default=None, help="folder with the MNIST IDX files (default: MINILDM_DATA, ...)")
    args = parser.parse_args(argv)
    quick = args.quick
    start = time.perf_counter()
    torch.manual_seed(0)
    info = machine()

    train = load_mnist("train", root=args.root, size=32, progress=not quick)
    test = load_mnist("test", root=args.root, size=32, progress=not quick)
    if quick:
        train.images, train.labels, train.captions = train.images[:256], train.labels[:256], train.captions[:256]
    # --quick trains a throwaway 20-step classifier in a temporary folder, never in the shared cache.
    classifier = dataset_classifier("mnist", root=args.root, cache_dir=tempfile.mkdtemp() if quick else None,
                                    steps=20 if quick else None, progress=not quick)
    generator = torch.Generator().manual_seed(0)
    real = test.images[torch.randperm(len(test.images), generator=generator)[:5000]]  # random: see fid()

    # Stage 1: the autoencoder, 30% of the budget.
    width = (8, 8, 16) if quick else (16, 32, 64)
    autoencoder = AutoencoderKL(AutoencoderConfig(1, 4, width, norm_num_groups=8))
    ae_history = train_autoencoder(autoencoder, train.images, TrainingConfig.for_autoencoder(
        steps=3 if quick else 5000, batch_size=16, lr=2e-3, max_minutes=args.minutes * 0.3, progress=not quick))
    with torch.no_grad():
        reconstructions = autoencoder(test.images[:2000]).clamp(-1, 1)
    ae = {
        "steps": ae_history["steps"][0], "seconds": ae_history["seconds"][0],
        "psnr_db": psnr(test.images[:2000], reconstructions),
        "accuracy_real": label_accuracy(test.images[:2000], test.labels[:2000], classifier),
        "accuracy_reconstructed": label_accuracy(reconstructions, test.labels[:2000], classifier),
        # against the very images reconstructed (floor 0): another subset would differ by its writers
        "fid_reconstructions": fid(test.images[:2000], reconstructions, classifier) if not quick else None,
    }
    print(f"autoencoder f=4: PSNR {ae['psnr_db']:.1f} dB, domain FID {ae['fid_reconstructions']}; classifier on "
          f"real {ae['accuracy_real']:.2%}, on reconstructions {ae['accuracy_reconstructed']:.2%}")

    # Stage 2: text-conditioned latent diffusion, 60% of the budget.
    text_encoder = TextEncoder.from_captions(train.captions, hidden_size=32 if quick else 128,
                                             num_layers=1 if quick else 2)
    unet = UNet2DConditionModel(UNetConfig(4, 4, (32, 32) if quick else (64, 64), (False, True),
                                           cross_attention_dim=text_encoder.config.hidden_size,
                                           norm_num_groups=8 if quick else 16))
    ldm = LatentDiffusion(autoencoder, unet, NoiseSchedule(), text_encoder, image_size=32)
    ldm_history = train_ldm(ldm, train.images, train.captions, TrainingConfig(
        steps=3 if quick else 10000, batch_size=64, lr=1e-3, max_minutes=args.minutes * 0.6, progress=not quick))
    train_seconds = time.perf_counter() - start

    # Evaluation: "a handwritten digit k", the same starting noise at every guidance scale.
    per_digit = 2 if quick else args.samples_per_digit
    labels = torch.arange(10).repeat_interleave(per_digit)
    prompts = [test.caption(int(k)) for k in labels]
    scores = {}
    for scale in (1.0, 3.0) if quick else (1.0, 2.0, 3.0, 5.0):
        # The recorded results' DDIM ("leading", steps_offset=1), not generate()'s default ("trailing").
        sampler = DDIMSampler(ldm.schedule, prediction_type=ldm.prediction_type)
        images = ldm.generate(prompts, 2 if quick else 25, sampler=sampler, guidance_scale=scale,
                              generator=torch.Generator().manual_seed(0)) * 2 - 1  # [0, 1] -> [-1, 1]
        scores[str(scale)] = {"prompt_accuracy": label_accuracy(images, labels, classifier),
                              "fid": fid(real, images, classifier) if len(images) > 64 else None}
        print(f"guidance {scale}: prompt accuracy {scores[str(scale)]['prompt_accuracy']:.1%}, "
              f"domain FID {scores[str(scale)]['fid']}")
    best = max(scores, key=lambda s: scores[s]["prompt_accuracy"])
    train_subset = train.images[torch.randperm(len(train.images), generator=generator)[:5000]]
    result = {
        "budget_minutes": args.minutes, "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "autoencoder": ae, "ldm": {"steps": ldm_history["steps"][0], "seconds": ldm_history["seconds"][0]},
        "scores": scores, "best_guidance_scale": float(best),
        "best_prompt_accuracy": scores[best]["prompt_accuracy"],
        "fid_floor_test_vs_train": fid(real, train_subset, classifier) if not quick else None,
        "samples_per_digit": per_digit, "machine": info,
    }
    print(f"best: guidance {best}, prompt accuracy {result['best_prompt_accuracy']:.1%} (target >= 97%); "
          f"FID floor (test vs train) {result['fid_floor_test_vs_train']}; trained in {train_seconds / 60:.1f} min")
    if not quick:
        print(f"wrote {write_result('mnist_ldm', result)}")
    return result


if __name__ == "__main__":
    main()
