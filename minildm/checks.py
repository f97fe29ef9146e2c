"""The check every model runs on the tensors it is given: the dtype and device of its own weights.

Under autocast (torch.autocast, e.g. bf16 on a GPU) layers return activations in the autocast dtype, so a
model's input may fairly arrive in that dtype too (the autoencoder's latents, fed to its decoder or to the
UNet): inside an autocast region both dtypes are accepted.
"""

from __future__ import annotations

import torch


def check_like_weights(value, name: str, weight: torch.Tensor, what: str = "") -> None:
    """Raise TypeError unless `value` is a tensor of `weight`'s dtype (or, inside autocast, the autocast
    dtype), and ValueError unless it is on `weight`'s device. `what` names what `value` should hold."""
    device_type = weight.device.type
    allowed = [weight.dtype]
    if torch.is_autocast_enabled(device_type):
        allowed.append(torch.get_autocast_dtype(device_type))
    if not torch.is_tensor(value) or value.dtype not in allowed:
        got = f"a {value.dtype} tensor" if torch.is_tensor(value) else type(value).__name__
        wanted = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must be {what + ' as ' if what else ''}a {wanted} tensor like the model's weights"
                        f"{' (inside autocast)' if len(allowed) > 1 else ''}, got {got}")
    if value.device != weight.device:
        raise ValueError(f"{name} is on {value.device} but the model is on {weight.device}: move one of them")
