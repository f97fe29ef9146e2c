"""An exponential moving average (EMA) of a model's weights, the copy diffusion models sample with.

    θ_ema <- d θ_ema + (1 - d) θ,   d = min(decay, (1 + n) / (10 + n)) at the n-th update

Diffusion training is noisy (each step sees one random t per image), and the average of the weights over
the last ~1 / (1 - decay) steps samples better than the last weights themselves (Ho et al. 2020,
appendix B, used decay 0.9999; Song & Ermon 2020, "Improved techniques", section 3.5, explain why). The
warm-up (1 + n) / (10 + n) lets a short run benefit: with a fixed 0.999, the first thousand steps would
be dominated by the random initial weights. Names follow diffusers' EMAModel (step, copy_to,
shadow_params, optimization_step, state_dict).

Depends on torch only.
"""

from __future__ import annotations

import numbers

import torch


class EMAModel:
    """The moving average of `parameters`; `step(parameters)` after each optimizer step, `copy_to` at the end."""

    def __init__(self, parameters, decay: float = 0.999):
        if not isinstance(decay, numbers.Real) or not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.optimization_step = 0
        self.shadow_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def step(self, parameters) -> None:
        self.optimization_step += 1
        n = self.optimization_step
        d = min(self.decay, (1 + n) / (10 + n))  # the warm-up: 2/11 at the first update, `decay` from n ~ 10^4
        for shadow, p in zip(self.shadow_params, parameters):
            shadow.lerp_(p.detach(), 1.0 - d)  # shadow + (1 - d)(p - shadow) = d shadow + (1 - d) p

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        """Write the averaged weights into `parameters`."""
        for shadow, p in zip(self.shadow_params, parameters):
            p.copy_(shadow)

    def state_dict(self) -> dict:
        """{"decay", "optimization_step", "shadow_params": [tensors]}: everything load_state_dict restores."""
        return {"decay": self.decay, "optimization_step": self.optimization_step,
                "shadow_params": [s.detach().clone() for s in self.shadow_params]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(), checking that it has one tensor of the right shape per parameter."""
        shadow = state["shadow_params"]
        shapes = [tuple(s.shape) for s in self.shadow_params]
        if [tuple(s.shape) for s in shadow] != shapes:
            raise ValueError(f"the EMA state holds {len(shadow)} tensors of other shapes than this model's "
                             f"{len(self.shadow_params)} parameters")
        self.decay = float(state["decay"])
        self.optimization_step = int(state["optimization_step"])
        self.shadow_params = [s.to(like.device, like.dtype, copy=True) for s, like in zip(shadow, self.shadow_params)]

    def __repr__(self) -> str:
        count = sum(s.numel() for s in self.shadow_params)
        return f"EMAModel(decay={self.decay}, optimization_step={self.optimization_step}, {count:,} weights)"
