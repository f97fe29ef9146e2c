"""Pictures: image grids, latents, the forward noising process, schedules, sampling, attention, losses.

Everything here works on plain tensors, so it runs the same on a notebook's samples and in a script.
Conventions:
  - an image is a float tensor (C, H, W) with C = 1 (gray) or 3 (RGB) and values in [0, 1]; a batch
    is (B, C, H, W). Values outside [0, 1] are clamped for display. The diffusion model itself works
    in [-1, 1]; only `noising_strip` takes that range, and says so.
  - a schedule is anything with `alphas_cumprod` (ᾱ_t, shape (T,)) and
    `add_noise(x0, noise, timesteps)` returning x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε (DDPM eq. 4).

Every plotting function returns a matplotlib Figure and never calls plt.show(). The figure is made
with pyplot (so the default backend is picked: inline in Jupyter, Agg in a headless script) and then
closed at once, which detaches it from pyplot: a script that makes a thousand figures leaks none, and
a notebook shows a returned figure once instead of twice. Show it by leaving it as the last expression
of a cell, or save it with `fig.savefig("samples.png")`.

Depends on torch, matplotlib and Pillow, and of minildm only on atomic.py (save_gif's crash-safe write).
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from .atomic import atomic_write_bytes, check_path

TITLE_FONTSIZE = 7
GIF_MIN_WIDTH = 256  # pixels: a 32x32 sample upscaled 8x is big enough to see in a browser


# ----------------------------------------------------------------------------- checks and helpers


def _check_images(images, name: str, ranks: tuple[int, ...], expected: str) -> torch.Tensor:
    """Return `images` detached, after checking rank, channel count and dtype."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(images).__name__}")
    if images.ndim not in ranks:
        raise ValueError(f"{name} must have shape {expected}, got shape {tuple(images.shape)}")
    if images.shape[-3] not in (1, 3):
        raise ValueError(
            f"{name} must have 1 (gray) or 3 (RGB) channels in shape {expected}, got "
            f"{images.shape[-3]} channels in shape {tuple(images.shape)} (for latents use show_latents)"
        )
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with values in [0, 1], got dtype {images.dtype}")
    return images.detach()


def _to_numpy(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W) or (H, W, 3) float32 array clamped to [0, 1], ready for imshow."""
    image = image.float().clamp(0, 1).cpu()
    if image.shape[0] == 1:
        return image[0].numpy()  # (1, H, W) -> (H, W)
    return image.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)


def _imshow(ax, image: torch.Tensor, title: str | None = None) -> None:
    """Draw one (C, H, W) image in [0, 1] on `ax` with no ticks; gray images keep the 0..1 scale."""
    ax.imshow(_to_numpy(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    if title is not None:
        ax.set_title(title, fontsize=TITLE_FONTSIZE)


def _detached_subplots(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """plt.subplots with a (nrows, ncols) array of axes, closed at once (see the module docstring)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    plt.close(fig)
    return fig, axes


def _wrap_title(text: str, panel_width_inches: float) -> str:
    """Wrap a long prompt to at most two lines that fit over a panel, ending in '…' if cut. A title that
    already has two lines ("prompt\nreading") keeps them, each shortened to one line if it must be."""
    chars_per_line = max(8, int(panel_width_inches * 72 / (TITLE_FONTSIZE * 0.55)))  # 72 pt per inch
    parts = text.split("\n")
    if len(parts) == 2:
        return "\n".join(textwrap.shorten(part, width=chars_per_line, placeholder=" …") for part in parts)
    return "\n".join(textwrap.wrap(text, width=chars_per_line, max_lines=2, placeholder=" …"))


# ----------------------------------------------------------------------------- images and grids


def to_pil(images: torch.Tensor) -> Image.Image | list[Image.Image]:
    """(C, H, W) in [0, 1] -> one PIL image ("L" for 1 channel, "RGB" for 3); (B, C, H, W) -> a list."""
    images = _check_images(images, "images", (3, 4), "(C, H, W) or (B, C, H, W)")
    if images.ndim == 4:
        return [to_pil(image) for image in images]
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # (C, H, W) in 0..255
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0].numpy())  # (H, W) uint8 -> mode "L"
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())  # (H, W, 3) -> mode "RGB"


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile a batch (B, C, H, W) into one image (C, H', W'), `nrow` images per row, like torchvision's.

    Image k sits at row k // nrow, column k % nrow, its top-left corner at
    (row * (H + padding) + padding, column * (W + padding) + padding); everything else is pad_value.
    Unlike torchvision, a single image is padded too, and values are left as they are (no clamping).
    Device and dtype follow the input.
    """
    images = _check_images(images, "images", (3, 4), "(C, H, W) or (B, C, H, W)")
    if nrow < 1 or padding < 0:
        raise ValueError(f"make_grid needs nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    if images.ndim == 3:
        images = images[None]  # (C, H, W) -> (1, C, H, W)
    batch, channels, height, width = images.shape
    columns = min(nrow, batch)
    rows = math.ceil(batch / columns)
    cell_height, cell_width = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_height + padding, columns * cell_width + padding), pad_value)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * cell_height + padding, column * cell_width + padding
        grid[:, top : top + height, left : left + width] = image
    return grid


def show_images(
    images: torch.Tensor,
    titles: Sequence[str] | None = None,
    ncols: int = 8,
    scale: float = 1.6,
    suptitle: str | None = None,
) -> Figure:
    """A grid of images (B, C, H, W) in [0, 1], each `scale` inches wide, with optional small titles
    (a long prompt is wrapped to two lines). Used for "samples.png": prompts over their samples."""
    images = _check_images(images, "images", (3, 4), "(C, H, W) or (B, C, H, W)")
    if images.ndim == 3:
        images = images[None]  # (C, H, W) -> (1, C, H, W)
    count = images.shape[0]
    if titles is not None and len(titles) != count:
        raise ValueError(f"show_images needs one title per image: got {len(titles)} titles for {count} images")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    columns = min(ncols, count)
    rows = math.ceil(count / columns)
    title_inches = 0.3 if titles is not None else 0.0  # room for two lines of 7 pt text
    figsize = (scale * columns, (scale + title_inches) * rows + (0.4 if suptitle else 0.0))
    fig, axes = _detached_subplots(rows, columns, figsize)
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.axis("off")  # the unused cells of the last row
            continue
        title = _wrap_title(titles[index], scale) if titles is not None else None
        _imshow(ax, images[index], title)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def show_latents(latents: torch.Tensor, title: str | None = None) -> Figure:
    """One gray panel per latent channel of (C, h, w) (or the first item of (B, C, h, w)).

    Latents are not images: each channel has its own range (the autoencoder's scaling factor brings
    them near unit variance, not into [0, 1]), so each panel gets its own colour scale and colorbar.
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim not in (3, 4):
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must have shape (C, h, w) or (B, C, h, w), got {shape}")
    if latents.ndim == 4:
        latents = latents[0]  # (B, C, h, w) -> (C, h, w)
    latents = latents.detach().float().cpu()
    channels = latents.shape[0]
    fig, axes = _detached_subplots(1, channels, figsize=(2.4 * channels, 2.4 + (0.4 if title else 0.0)))
    for channel, ax in enumerate(axes[0]):
        shown = ax.imshow(latents[channel].numpy(), cmap="gray", interpolation="nearest")  # own min..max
        ax.set_title(f"channel {channel}", fontsize=8)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- diffusion


def noising_strip(
    schedule,
    x0: torch.Tensor,
    timesteps: Sequence[int] = (0, 100, 250, 500, 750, 999),
    generator: torch.Generator | None = None,
) -> Figure:
    """The forward process q(x_t | x_0) on one image: x_t = schedule.add_noise(x0, ε, t) for each t.

    x0 is (C, H, W) in the MODEL's range [-1, 1] (not [0, 1]). One ε ~ N(0, I), drawn from `generator`,
    is shared by all panels, so the strip shows the same noise growing as ᾱ_t shrinks. Each panel
    shows (x_t + 1) / 2 clamped to [0, 1], which clips the noise tails: that is display only.
    """
    x0 = _check_images(x0, "x0", (3,), "(C, H, W)")
    if x0.min() < -1.001 or x0.max() > 1.001:
        raise ValueError(
            f"x0 must be in the model's range [-1, 1] (use image * 2 - 1 on a [0, 1] image), "
            f"got values in [{x0.min().item():.3g}, {x0.max().item():.3g}]"
        )
    if not hasattr(schedule, "add_noise"):
        raise TypeError(f"schedule must have add_noise(x0, noise, timesteps), got {type(schedule).__name__}")
    noise = torch.randn(x0[None].shape, generator=generator, dtype=x0.dtype, device=x0.device)  # (1, C, H, W)
    fig, axes = _detached_subplots(1, len(timesteps), figsize=(1.6 * len(timesteps), 1.9))
    for t, ax in zip(timesteps, axes[0]):
        x_t = schedule.add_noise(x0[None], noise, torch.tensor([int(t)], device=x0.device))  # (1, C, H, W)
        _imshow(ax, (x_t[0] + 1) / 2, f"t={int(t)}")  # [-1, 1] -> [0, 1]
    return fig


def plot_schedules(schedules: Mapping[str, object]) -> Figure:
    """Compare noise schedules: ᾱ_t and log-SNR(t) = log(ᾱ_t / (1 - ᾱ_t)) against t, one line each.

    log-SNR is the clearer view: a cosine schedule spends more steps at middle SNR than a linear one.
    """
    if len(schedules) == 0:
        raise ValueError("plot_schedules needs at least one schedule, got an empty dict")
    fig, axes = _detached_subplots(1, 2, figsize=(9.0, 3.2))
    alpha_ax, snr_ax = axes[0]
    for name, schedule in schedules.items():
        alpha_bar = torch.as_tensor(schedule.alphas_cumprod).detach().double().cpu()  # ᾱ_t, (T,)
        steps = np.arange(len(alpha_bar))
        log_snr = torch.log(alpha_bar) - torch.log1p(-alpha_bar)  # log(ᾱ / (1 - ᾱ)); +inf if ᾱ = 1
        alpha_ax.plot(steps, alpha_bar.numpy(), label=name)
        snr_ax.plot(steps, log_snr.numpy(), label=name)
    alpha_ax.set(xlabel="t", ylabel=r"$\bar\alpha_t$", title=r"signal kept: $\bar\alpha_t$")
    snr_ax.set(xlabel="t", ylabel="log SNR", title=r"log SNR = $\log(\bar\alpha_t / (1 - \bar\alpha_t))$")
    for ax in (alpha_ax, snr_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def denoising_trajectory(
    xt_images: torch.Tensor,
    x0_images: torch.Tensor,
    timesteps: Sequence[int],
    max_columns: int = 10,
) -> Figure:
    """Watch one sample being denoised: the top row is x_t, the bottom row the model's predicted x0.

    xt_images and x0_images are (T, C, H, W) in [0, 1], one per sampling step, and timesteps holds the
    T step numbers. At most `max_columns` steps are shown, spread evenly, always the first and last.
    """
    xt_images = _check_images(xt_images, "xt_images", (4,), "(T, C, H, W)")
    x0_images = _check_images(x0_images, "x0_images", (4,), "(T, C, H, W)")
    if xt_images.shape != x0_images.shape:
        raise ValueError(
            f"xt_images and x0_images must have the same shape, got {tuple(xt_images.shape)} "
            f"and {tuple(x0_images.shape)}"
        )
    steps = xt_images.shape[0]
    if len(timesteps) != steps:
        raise ValueError(f"need one timestep per image: got {len(timesteps)} timesteps for {steps} images")
    if max_columns < 2 and steps > 1:
        raise ValueError(f"max_columns must be >= 2 to show the first and last step, got {max_columns}")
    count = min(steps, max_columns)
    # Spacing >= 1 between the linspace points, so rounding never picks a step twice.
    chosen = torch.linspace(0, steps - 1, count).round().long().tolist()
    fig, axes = _detached_subplots(2, count, figsize=(1.5 * count + 0.4, 3.4))
    for column, step in enumerate(chosen):
        _imshow(axes[0, column], xt_images[step], f"t={int(timesteps[step])}")
        _imshow(axes[1, column], x0_images[step])
    for row, label in enumerate(["x_t", "predicted x0"]):
        axes[row, 0].text(
            -0.08, 0.5, label, transform=axes[row, 0].transAxes, rotation=90, ha="right", va="center", fontsize=9
        )
    return fig


def save_gif(
    frames: torch.Tensor,
    path: str | os.PathLike,
    duration_ms: int = 80,
    nrow: int = 8,
    hold_last_ms: int = 1000,
) -> Path:
    """Write an animation of sampling: frames (T, B, C, H, W) or (T, C, H, W) in [0, 1].

    Each frame becomes one grid (make_grid), upscaled by a whole factor with nearest-neighbour until it
    is at least 256 pixels wide, so 32x32 samples stay crisp. The GIF loops forever and holds the last
    frame for `hold_last_ms`. Written atomically: a crash leaves the old file or none, never half a GIF.
    Returns the path written.
    """
    frames = _check_images(frames, "frames", (4, 5), "(T, C, H, W) or (T, B, C, H, W)")
    if frames.shape[0] == 0:
        raise ValueError("save_gif needs at least one frame, got T = 0")
    pictures = []
    for frame in frames:  # (B, C, H, W) or (C, H, W)
        grid = make_grid(frame, nrow=nrow, padding=2 if frame.ndim == 4 else 0)  # (C, H', W')
        picture = to_pil(grid)
        factor = max(1, math.ceil(GIF_MIN_WIDTH / picture.width))
        pictures.append(picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST))
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]

    path = check_path(path, "path")
    buffer = io.BytesIO()
    pictures[0].save(
        buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0, optimize=True
    )
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ----------------------------------------------------------------------------- attention and training


def cross_attention_maps(
    image: torch.Tensor,
    maps: torch.Tensor,
    tokens: Sequence[str],
    title: str | None = None,
    ncols: int = 8,
) -> Figure:
    """Where each prompt token looks: the image, then one panel per token with its attention map alone.

    image is (C, H, W) in [0, 1]; maps is (L, h, w), the non-negative cross-attention weight each
    pixel gives token l (usually averaged over heads and steps), at any resolution h x w: it is
    upsampled bilinearly to H x W. All maps share one colour scale, 0 to the largest value of any of them,
    with a colour bar, so a faint panel is a token that gets little attention; each panel's title gives
    the token and its share of all the attention drawn, sum(map_l) / sum(maps), in percent. The image is
    not drawn under the maps: compare positions with the first panel.
    Raises ValueError for maps that are not (L, h, w), negative, or not one per token.
    """
    image = _check_images(image, "image", (3,), "(C, H, W)")
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must have shape (L, h, w), one map per token, got {shape}")
    if len(tokens) != maps.shape[0]:
        raise ValueError(f"need one token per map: got {len(tokens)} tokens for {maps.shape[0]} maps")
    if (maps < 0).any():
        raise ValueError(f"attention maps must be non-negative, got a minimum of {maps.min().item():.3g}")
    height, width = image.shape[1:]
    maps = maps.detach().float().cpu()
    shares = maps.sum(dim=(1, 2)) / maps.sum().clamp_min(1e-12)  # (L,): each token's part of the total
    upsampled = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)
    upsampled = upsampled[:, 0]  # (L, 1, H, W) -> (L, H, W)
    vmax = max(upsampled.max().item(), 1e-12)  # one scale for every token; an all-zero set would divide by 0

    panels = 1 + len(tokens)
    columns = min(max(1, ncols), panels)
    rows = math.ceil(panels / columns)
    fig, axes = _detached_subplots(rows, columns, figsize=(1.8 * columns + 0.6, 1.9 * rows + (0.4 if title else 0)))
    flat_axes = list(axes.flat)
    _imshow(flat_axes[0], image, "image")
    shown = None
    for token, share, attention, ax in zip(tokens, shares.tolist(), upsampled, flat_axes[1:]):
        shown = ax.imshow(attention.numpy(), cmap="inferno", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.axis("off")
        ax.set_title(f"{token}\n{share:.0%}", fontsize=TITLE_FONTSIZE)
    for ax in flat_axes[panels:]:
        ax.axis("off")  # the unused cells of the last row
    if shown is not None:
        fig.colorbar(shown, ax=list(flat_axes[1:panels]), shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


def plot_losses(losses: Mapping[str, Sequence[float]], smooth: int = 50) -> Figure:
    """Training curves: each series raw (faint) and as a moving average over `smooth` points.

    The x axis is the position in each list, so series logged at different rates do not line up.
    The window shrinks to a quarter of a short series. The y axis is logarithmic, because diffusion
    losses fall fast and then creep; if any value is zero or negative a log axis would hide it, so
    the axis stays linear then. An empty series (a validation loss not logged yet) is skipped.
    """
    if len(losses) == 0:
        raise ValueError("plot_losses needs at least one named series, got an empty dict")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (1 means no smoothing), got {smooth}")
    fig, axes = _detached_subplots(1, 1, figsize=(6.4, 3.6))
    ax = axes[0, 0]
    all_positive = True
    for name, series in losses.items():
        values = torch.as_tensor(list(series), dtype=torch.float64)  # (N,)
        if len(values) == 0:
            continue
        all_positive = all_positive and bool((values > 0).all())
        (raw_line,) = ax.plot(np.arange(len(values)), values.numpy(), alpha=0.25, linewidth=0.8)
        window = max(1, min(smooth, len(values) // 4))  # a short series keeps most of its points
        totals = torch.cat([values.new_zeros(1), values.cumsum(0)])  # (N + 1,), totals[i] = sum of first i
        average = (totals[window:] - totals[:-window]) / window  # (N - window + 1,), mean of each window
        ax.plot(
            np.arange(window - 1, len(values)),
            average.numpy(),
            color=raw_line.get_color(),
            label=f"{name} (mean of {window})",
        )
    if all_positive:
        ax.set_yscale("log")
    ax.set(xlabel="logged step", ylabel="loss")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=8)
    return fig
