"""A training run's full state on disk, so that a run resumed from it continues bit for bit.

save_training_state writes one folder, replaced as a whole (checkpoint.atomic_directory): each module's
weights, the EMA's shadow weights, the optimizers' moments with the step's random-number state
(optimizer.safetensors, NAME_optimizer.safetensors for extra ones such as the discriminator's), and
trainer.json with the step, the optimizers' param_groups and the loss history. load_training_state reads it
back into the same objects. Everything is safetensors + JSON, never pickle (checkpoint.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .atomic import atomic_directory, atomic_write_json, read_json, readable_directory
from .checkpoint import load_module_weights, load_weights, save_weights

if TYPE_CHECKING:
    from .train import EMA


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq) as tensors named "index.key"."""
    return {f"{i}.{key}": (v if torch.is_tensor(v) else torch.tensor(v))
            for i, state in optimizer.state_dict()["state"].items() for key, v in state.items()}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups) -> None:
    state: dict = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_training_state(directory, modules: dict[str, nn.Module], optimizer, ema: EMA | None,
                        generator: torch.Generator, step: int, history: dict,
                        extra_optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
    """Everything needed to continue bit for bit: weights, EMA, optimizer moments, step, RNG state.

    `extra_optimizers` (the discriminator's) are saved as NAME_optimizer.safetensors. The folder is
    replaced as a whole (checkpoint.atomic_directory): a crash leaves the previous checkpoint or this one.
    """
    extra_optimizers = extra_optimizers if extra_optimizers is not None else {}
    with atomic_directory(directory) as folder:
        for name, module in modules.items():
            save_weights(module.state_dict(), folder / f"{name}.safetensors")
        if ema is not None:
            save_weights({str(i): s for i, s in enumerate(ema.shadow)}, folder / "ema.safetensors")
        tensors = _optimizer_tensors(optimizer)
        tensors["rng"] = generator.get_state()
        save_weights(tensors, folder / "optimizer.safetensors")
        for name, extra in extra_optimizers.items():
            save_weights(_optimizer_tensors(extra), folder / f"{name}_optimizer.safetensors")
        extra_param_groups = {name: extra.state_dict()["param_groups"] for name, extra in extra_optimizers.items()}
        atomic_write_json(folder / "trainer.json", {
            "step": step, "param_groups": optimizer.state_dict()["param_groups"],
            "extra_param_groups": extra_param_groups, "ema_updates": ema.num_updates if ema else 0, "history": history,
        })


def load_training_state(directory, modules: dict[str, nn.Module], optimizer, ema: EMA | None,
                        generator: torch.Generator,
                        extra_optimizers: dict[str, torch.optim.Optimizer] | None = None) -> tuple[int, dict]:
    """Restore what save_training_state wrote into the given objects; returns (step, history)."""
    directory = readable_directory(directory)
    meta = read_json(directory / "trainer.json")
    for name, module in modules.items():
        load_module_weights(module, directory / f"{name}.safetensors")
    if ema is not None:
        shadow = load_weights(directory / "ema.safetensors")
        ema.shadow = [shadow[str(i)].to(s.device) for i, s in enumerate(ema.shadow)]
        ema.num_updates = meta["ema_updates"]
    tensors = load_weights(directory / "optimizer.safetensors")
    generator.set_state(tensors.pop("rng"))
    _load_optimizer(optimizer, tensors, meta["param_groups"])
    for name, extra in (extra_optimizers or {}).items():
        if name not in meta.get("extra_param_groups", {}):
            raise ValueError(f"the checkpoint in {directory} has no state for the {name} optimizer; it was saved "
                             f"by a run without a {name}")
        _load_optimizer(extra, load_weights(directory / f"{name}_optimizer.safetensors"),
                        meta["extra_param_groups"][name])
    return meta["step"], meta["history"]
