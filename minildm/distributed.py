"""Where training runs: which device, and which of several processes this one is.

One process trains on `pick_device()`: CUDA, then Apple's MPS, then the CPU. Several processes train one
model together by data parallelism, started by torchrun:

    torchrun --nproc_per_node 2 -m minildm demo        # 2 processes on this machine
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m minildm demo   # and on a 2nd

torchrun gives each process RANK (0 .. WORLD_SIZE-1), LOCAL_RANK (its index on its machine) and WORLD_SIZE
in the environment; `setup()` joins them into one process group (gloo on CPUs, NCCL on GPUs, each process
on cuda:LOCAL_RANK). Every process holds the whole model; DistributedDataParallel (Li et al. 2020,
arXiv:2006.15704) averages the gradients of the processes during backward, so every copy takes the same
step. train.py makes a run independent of the number of processes: every rank draws the randomness of
the whole batch (examples, t, ε, caption dropout) from one seeded generator and computes the loss on its
own slice, `rank_slice`; the mean of the slices' gradients is the whole batch's gradient.

Depends on torch only.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) unless a process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started with others (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given; else this process's GPU under torchrun (cuda:LOCAL_RANK); else CUDA, then Apple's
    MPS, then the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but this torch has no CUDA GPU to use "
                             f"(torch {torch.__version__}); leave device unset to pick what there is")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {device} asked for, but Apple's MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if launched_by_torchrun() \
            else torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes, once (NCCL for CUDA, gloo otherwise); (rank, world_size).
    Outside torchrun, nothing to join: (0, 1)."""
    if launched_by_torchrun() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world()


def is_main_process() -> bool:
    """Rank 0 writes checkpoints, pictures and reports; the others only train."""
    return world()[0] == 0


def rank_slice(batch_size: int) -> slice:
    """This rank's part of a batch of `batch_size`: rank r of W takes [r B/W, (r + 1) B/W)."""
    rank, size = world()
    if batch_size % size:
        raise ValueError(f"batch_size={batch_size} must divide by the number of processes ({size}), so that every "
                         f"process trains on an equal part of each batch")
    share = batch_size // size
    return slice(rank * share, (rank + 1) * share)


def average(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the processes (itself in one process), the same on every rank."""
    rank, size = world()
    if size > 1:
        values = values.clone()
        dist.all_reduce(values)  # sum over the ranks
        values /= size
    return values


def gather(values: torch.Tensor) -> torch.Tensor:
    """Every process's `values` concatenated along dim 0 in rank order, on every process (itself in one process):
    the whole batch again from the ranks' slices (rank_slice)."""
    size = world()[1]
    if size == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(size)]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in one process)."""
    if world()[1] > 1:
        dist.barrier()


def average_gradients(parameters) -> None:
    """Average the gradients of `parameters` over the processes, as DistributedDataParallel does in backward
    (for a loss that goes through a module outside the DDP wrapper: the discriminator's)."""
    if world()[1] == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = average(torch.cat([g.reshape(-1) for g in grads]))  # one all-reduce for all of them
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
