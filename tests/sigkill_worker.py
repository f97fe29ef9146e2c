"""The process that tests/test_sigkill.py kills: it trains a tiny autoencoder with a checkpoint after
every step, resuming from the last one. It lives in its own module so that the fork server can import
it (with torch) once, and each killed process starts in milliseconds."""

import hashlib
import json
import threading

import torch
from tqdm.auto import tqdm

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.train import TrainingConfig, train_autoencoder

STEPS = 40


def tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(in_channels=1, latent_channels=2, block_out_channels=(4,),
                                           norm_num_groups=2))


def images() -> torch.Tensor:
    return torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1


def digest(module: torch.nn.Module) -> str:
    """A fingerprint of the weights, to compare a checkpoint with the uninterrupted run bit for bit."""
    sha = hashlib.sha256()
    for name, value in module.state_dict().items():
        sha.update(name.encode())
        sha.update(value.numpy().tobytes())
    return sha.hexdigest()


def train(checkpoint_dir: str | None, reference_path: str | None = None) -> None:
    """Train to STEPS, checkpointing every step into checkpoint_dir (resuming from it), or, without one,
    write the weights' digest after every step to reference_path."""
    torch.set_num_threads(1)  # thread count can change float sums: the same in every process
    # tqdm's default lock is a multiprocessing semaphore, which a killed process cannot give back (the
    # resource tracker would warn about it at exit); a thread lock is all one process needs.
    tqdm.set_lock(threading.RLock())
    autoencoder = tiny_autoencoder()
    digests = {0: digest(autoencoder)}

    def record(step):
        digests[step] = digest(autoencoder)

    checkpoints = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": 1, "resume": True} if checkpoint_dir else {}
    config = TrainingConfig.for_autoencoder(steps=STEPS, batch_size=2, device="cpu", progress=False,
                                            callback_every=1, **checkpoints)
    train_autoencoder(autoencoder, images(), config, callback=record if reference_path else None)
    if reference_path:
        with open(reference_path, "w") as f:
            json.dump(digests, f)
