"""The checks models and pipelines run on the tensors they are given: one function per kind of argument,
so that one mistake gets one error type everywhere (TypeError for the wrong type or dtype, ValueError for
the wrong shape, range or device).

check_like_weights: the dtype and device of the model's own weights.

Under autocast (torch.autocast, e.g. bf16 on a GPU) layers return activations in the autocast dtype, so a
model's input may fairly arrive in that dtype too (the autoencoder's latents, fed to its decoder or to the
UNet): inside an autocast region both dtypes are accepted.

check_images: a batch of images or latents (B, C, H, W); check_device and check_generator.
explain_missing_kernels: torch's error for an op a device lacks in bf16 / fp16, said plainly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def check_text_states(encoder_hidden_states, batch_size: int, cross_attention_dim: int | None, weight: torch.Tensor,
                      model: str) -> None:
    """A backbone's text input: None for an unconditional one (cross_attention_dim None), else a (B, L, D) tensor
    with B = batch_size, L >= 1 and D = cross_attention_dim, in the weights' dtype and on their device. Raises
    TypeError / ValueError naming what was expected; `model` names the backbone ("UNet", "DiT")."""
    if cross_attention_dim is None:
        if encoder_hidden_states is not None:
            raise ValueError(f"this {model} is unconditional (cross_attention_dim=None) but got encoder_hidden_states")
        return
    if encoder_hidden_states is None:
        raise ValueError(f"this {model} is text-conditioned: pass encoder_hidden_states of shape "
                         f"(B, L, {cross_attention_dim}) (the empty prompt's for unconditional)")
    check_like_weights(encoder_hidden_states, "encoder_hidden_states", weight)
    shape = encoder_hidden_states.shape
    if len(shape) != 3 or shape[-1] != cross_attention_dim or shape[0] != batch_size or shape[1] == 0:
        raise ValueError(f"encoder_hidden_states must have shape ({batch_size}, L, {cross_attention_dim}), "
                         f"got {tuple(shape)}")


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
    check_device(value, name, weight.device)


def check_device(value: torch.Tensor, name: str, device: torch.device) -> None:
    """Raise ValueError unless the tensor `value` is on the model's `device` (inputs are never moved silently)."""
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the model is on {device}: move one of them")


def check_generator(generator) -> None:
    """Raise TypeError unless `generator` is a torch.Generator or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_images(value, name: str, channels: int, multiple_of: int = 1, what: str = "images") -> None:
    """Raise TypeError unless `value` is a floating-point tensor, and ValueError unless it is a batch
    (B, channels, H, W) with B, H, W >= 1 and H, W multiples of `multiple_of` (a first stage's factor f).
    `what` names what the batch holds ("images", "latents") in the message."""
    if not torch.is_tensor(value) or not value.is_floating_point():
        got = f"a {value.dtype} tensor" if torch.is_tensor(value) else type(value).__name__
        raise TypeError(f"{name} must be a floating-point tensor of {what} (B, {channels}, H, W), got {got}")
    if value.ndim != 4 or value.shape[1] != channels or 0 in value.shape:
        raise ValueError(f"{name} must be {what} of shape (B, {channels}, H, W) with B, H, W >= 1, "
                         f"got {tuple(value.shape)}")
    if value.shape[2] % multiple_of or value.shape[3] % multiple_of:
        raise ValueError(f"{name}: height and width must be multiples of the downsampling factor f={multiple_of}, "
                         f"got {tuple(value.shape[2:])}")


@contextmanager
def explain_missing_kernels(device: torch.device, dtype: torch.dtype):
    """Re-raise torch's '"op" not implemented for 'Half'' as an error that says what it means and what to do:
    not every device has every op in bf16 / fp16 (older CPUs and MPS lack some)."""
    try:
        yield
    except RuntimeError as e:
        if "not implemented for" not in str(e):
            raise
        raise NotImplementedError(f"torch has no {dtype} kernel on {device} for an operation this model uses ({e}); "
                                  f"run it in float32 there (model.float()), or in {dtype} on a device that has the "
                                  f"operation") from e
