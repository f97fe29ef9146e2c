"""A training run's full state on disk, so that a run resumed from it continues bit for bit.

save_training_state writes one folder, replaced as a whole (atomic.atomic_directory):

    NAME.safetensors             each module's weights (autoencoder, discriminator, or backbone, conditioner)
    ema.safetensors              the EMA's shadow weights (its decay and update count go to trainer.json)
    float_copies.safetensors     the float32 copies the optimizer steps, for a bf16 / fp16 model (train.py)
    optimizer.safetensors        AdamW's moments, and the random-number generator's state after the step
    NAME_optimizer.safetensors   the moments of an extra optimizer (the discriminator's)
    trainer.json                 the step, the optimizers' param_groups, the EMA's counters, the loss history

load_training_state reads it back into the same objects. Everything is safetensors + JSON, never pickle
(checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .atomic import atomic_directory, atomic_write_json, read_json, readable_directory
from .checkpoint import check_state_dict, load_weights, save_weights, stored_dtype
from .ema import EMAModel


@dataclass
class TrainingState:
    """The objects a training loop changes, all of which a checkpoint holds."""

    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ema: EMAModel | None = None
    extra_optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    float_copies: list[torch.Tensor] | None = None


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


def _numbered(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {str(i): t for i, t in enumerate(tensors)}


def save_training_state(directory, state: TrainingState, step: int, history: dict) -> None:
    """Everything needed to continue bit for bit, after `step` steps. The folder is replaced as a whole
    (atomic.atomic_directory): a crash leaves the previous checkpoint or this one."""
    with atomic_directory(directory) as folder:
        for name, module in state.modules.items():
            save_weights(module.state_dict(), folder / f"{name}.safetensors")
        ema_state = state.ema.state_dict() if state.ema is not None else None
        if ema_state is not None:
            save_weights(_numbered(ema_state.pop("shadow_params")), folder / "ema.safetensors")
        if state.float_copies is not None:
            save_weights(_numbered(state.float_copies), folder / "float_copies.safetensors")
        tensors = _optimizer_tensors(state.optimizer)
        tensors["rng"] = state.generator.get_state()
        save_weights(tensors, folder / "optimizer.safetensors")
        for name, extra in state.extra_optimizers.items():
            save_weights(_optimizer_tensors(extra), folder / f"{name}_optimizer.safetensors")
        atomic_write_json(folder / "trainer.json", {
            "step": step, "param_groups": state.optimizer.state_dict()["param_groups"],
            "extra_param_groups": {name: extra.state_dict()["param_groups"]
                                   for name, extra in state.extra_optimizers.items()},
            "ema": ema_state, "history": history,
        })


def load_training_state(directory, state: TrainingState) -> tuple[int, dict]:
    """Restore what save_training_state wrote into `state`'s objects; returns (step, history). Raises
    FileNotFoundError for a missing file, ValueError for state that does not fit these objects."""
    directory = readable_directory(directory)
    meta = read_json(directory / "trainer.json")
    weights = {name: load_weights(directory / f"{name}.safetensors") for name in state.modules}
    for name, module in state.modules.items():  # every check before anything is changed
        saved = stored_dtype(weights[name], directory / f"{name}.safetensors")
        ours = stored_dtype(module.state_dict(), f"the {name}")
        if saved is not None and ours is not None and saved != ours:
            raise ValueError(f"the checkpoint in {directory} was saved by a run whose {name} was {saved}, but this "
                             f"{name} is {ours}: cast the model with .to({saved}) to resume, or use a new folder")
        check_state_dict(module.state_dict(), weights[name], str(directory / f"{name}.safetensors"))
    if (state.ema is None) != (meta.get("ema") is None):
        saved_with = "with" if state.ema is None else "without"
        raise ValueError(f"the checkpoint in {directory} was saved by a run {saved_with} an EMA of the weights: "
                         f"resume with the ema_decay it was saved with")
    for name in state.extra_optimizers:
        if name not in meta.get("extra_param_groups", {}):
            raise ValueError(f"the checkpoint in {directory} has no state for the {name} optimizer; it was saved "
                             f"by a run without a {name}")
    for name, module in state.modules.items():
        module.load_state_dict(weights[name])
    if state.ema is not None:
        shadow = load_weights(directory / "ema.safetensors")
        state.ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    if state.float_copies is not None:
        saved = load_weights(directory / "float_copies.safetensors")
        with torch.no_grad():
            for i, copy in enumerate(state.float_copies):
                copy.copy_(saved[str(i)])
    tensors = load_weights(directory / "optimizer.safetensors")
    state.generator.set_state(tensors.pop("rng"))
    _load_optimizer(state.optimizer, tensors, meta["param_groups"])
    for name, extra in state.extra_optimizers.items():
        _load_optimizer(extra, load_weights(directory / f"{name}_optimizer.safetensors"),
                        meta["extra_param_groups"][name])
    return meta["step"], meta["history"]
