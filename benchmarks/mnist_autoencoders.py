"""Autoencoder quality per downsampling factor on MNIST (issue 3): f = 1, 2, 4, 8, each trained for the
same wall-clock time, then scored on test digits by reconstruction PSNR, domain FID of the
reconstructions, and the MNIST classifier's accuracy on them next to its accuracy on the real images.

    python -m benchmarks.mnist_autoencoders [--seconds 90] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.fid import dataset_classifier, fid, label_accuracy, psnr
from minildm.mnist import load_mnist
from minildm.train import TrainingConfig, train_autoencoder

from .common import machine, write_result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=75.0, help="training time per autoencoder (default 75)")
    parser.add_argument("--quick", action="store_true", help="a few steps each: checks that it runs")
    parser.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    info = machine()
    train = load_mnist("train", root=args.root, size=32, progress=False)
    test = load_mnist("test", root=args.root, size=32, progress=False)
    classifier = dataset_classifier("mnist", root=args.root, progress=not args.quick)
    # The reconstructions are compared with the very images they reconstruct: two different subsets of the
    # MNIST test set differ by more than a good autoencoder does (its halves come from different writers).
    real, labels_real = test.images[:2000], test.labels[:2000]
    rows = {}
    header = ("f", "latent", "params", "steps", "PSNR dB", "FID", "acc real", "acc rec")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (3, 10, 8, 6, 8, 7, 9, 8))))
    for f in (1, 2, 4, 8):
        torch.manual_seed(0)
        autoencoder = AutoencoderKL(AutoencoderConfig.for_factor(f, in_channels=1, width=16, norm_num_groups=8))
        history = train_autoencoder(autoencoder, train.images, TrainingConfig.for_autoencoder(
            steps=3 if args.quick else 100000, batch_size=16, lr=2e-3, max_minutes=args.seconds / 60, progress=False))
        with torch.no_grad():
            reconstructions = torch.cat([autoencoder(real[i : i + 500]) for i in range(0, len(real), 500)])
        reconstructions = reconstructions.clamp(-1, 1)
        rows[f] = {
            "latent_shape": [4, 32 // f, 32 // f], "params": sum(p.numel() for p in autoencoder.parameters()),
            "steps": history["steps"][0], "psnr_db": psnr(real, reconstructions),
            "fid": fid(real, reconstructions, classifier),  # floor: 0, the same images
            "accuracy_real": label_accuracy(real, labels_real, classifier),
            "accuracy_reconstructed": label_accuracy(reconstructions, labels_real, classifier),
        }
        r = rows[f]
        print(f"{f:>3} {'x'.join(map(str, r['latent_shape'])):>10} {r['params']:>8,} {r['steps']:>6} "
              f"{r['psnr_db']:>8.1f} {r['fid']:>7.2f} {r['accuracy_real']:>9.2%} {r['accuracy_reconstructed']:>8.2%}")
    result = {"seconds_each": args.seconds, "rows": rows, "machine": info}
    if not args.quick:
        print(f"wrote {write_result('mnist_autoencoders', result)}")
    return result


if __name__ == "__main__":
    main()
