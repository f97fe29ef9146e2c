"""Run by tests/test_vq.py, in one process or under torchrun: train a tiny VQModel with an EMA codebook and
dead-code restarts, and write its state and history to OUT/vq_{world size}.safetensors / .json.

    python tests/vq_distributed_worker.py OUT
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from minildm import distributed
from minildm.train import TrainingConfig, train_autoencoder
from minildm.vq import VQModel, VQModelConfig


def images(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(2)
    vq = VQModel(VQModelConfig(block_out_channels=(8, 16), norm_num_groups=4, num_vq_embeddings=16,
                               codebook_ema_decay=0.9, restart_dead_codes=True, dead_code_steps=2))
    history = train_autoencoder(vq, images(), TrainingConfig.for_autoencoder(steps=5, batch_size=8, lr=1e-3,
                                                                             device="cpu", progress=False))
    rank, world_size = distributed.world()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, out / f"vq_{world_size}.safetensors")
        (out / f"vq_{world_size}.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
