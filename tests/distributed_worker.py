"""Run by tests/test_distributed.py, in one process or under torchrun: train a tiny LDM and a tiny autoencoder
with its discriminator, and write what they became (and which examples each rank trained on) to OUT.

    python tests/distributed_worker.py OUT MODE      MODE: straight | crash | resume
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_ldm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from minildm import distributed  # noqa: E402
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from minildm.discriminator import PatchDiscriminator  # noqa: E402
from minildm.text import TextEncoder  # noqa: E402
from minildm.train import TrainingConfig, train_autoencoder, train_ldm  # noqa: E402

STEPS, BATCH, LR = 4, 8, 1e-3
CAPTIONS = [f"picture {i}" for i in range(16)]  # one caption per image: which rank saw which example shows


def images(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def tiny_ldm():
    ldm = make_tiny_ldm()
    torch.manual_seed(1)
    text = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1, num_heads=2)
    return type(ldm)(ldm.first_stage, ldm.backbone, ldm.schedule, text, image_size=16)


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    config = TrainingConfig(steps=STEPS, batch_size=BATCH, lr=LR, device="cpu", progress=False)
    ldm = tiny_ldm()
    seen = []  # the captions this rank trained on, step by step
    loss = ldm.diffusion_loss

    def recording_loss(latents, captions, *args, **kwargs):
        seen.append(list(captions))
        return loss(latents, captions, *args, **kwargs)

    ldm.diffusion_loss = recording_loss
    if mode == "straight":
        train_ldm(ldm, images(), CAPTIONS, config)
        torch.manual_seed(2)
        autoencoder = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4))
        discriminator = PatchDiscriminator(width=8, num_layers=2)
        train_autoencoder(autoencoder, images(), TrainingConfig.for_autoencoder(steps=STEPS, batch_size=BATCH, lr=LR,
                                                                                device="cpu", progress=False),
                          discriminator=discriminator, discriminator_start=1)
        tensors = {f"ldm.{k}": v for k, v in ldm.state_dict().items()}
        tensors.update({f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()})
        tensors.update({f"discriminator.{k}": v for k, v in discriminator.state_dict().items()})
    else:
        def crash(step):
            raise SystemExit(3)  # rank 0 dies right after the checkpoint of step 2; torchrun stops the others

        config = TrainingConfig(**{**config.__dict__, "checkpoint_dir": out / "checkpoint", "checkpoint_every": 2,
                                   "callback_every": 2, "resume": mode == "resume"})
        train_ldm(ldm, images(), CAPTIONS, config, callback=crash if mode == "crash" else None)
        tensors = {f"ldm.{k}": v for k, v in ldm.state_dict().items()}
    rank, world_size = distributed.world()
    (out / f"seen_{mode}_{world_size}_{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"{mode}_{world_size}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
