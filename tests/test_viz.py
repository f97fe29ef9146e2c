"""Tests for minildm/viz.py: pixel values, grid placement, figure contents, GIF files, errors."""

from __future__ import annotations

import io
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from minildm import viz


def image_axes(fig):
    """The axes of `fig` that show at least one image (colorbars and empty cells do not count)."""
    return [ax for ax in fig.axes if ax.images]


def assert_renders(fig):
    """Drawing the figure to PNG must work headless; returns the PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    return buffer.getvalue()


class FakeSchedule:
    """The duck type viz expects: alphas_cumprod and add_noise (DDPM eq. 4), recording its calls."""

    def __init__(self, steps: int = 1000):
        betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.calls = []

    def add_noise(self, x0, noise, timesteps):
        self.calls.append(timesteps.tolist())
        alpha_bar = self.alphas_cumprod[timesteps].to(x0.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


# ----------------------------------------------------------------------------- to_pil and make_grid


def test_to_pil_rgb_known_pixels_and_clamping():
    image = torch.zeros(3, 2, 4)
    image[0, 0, 0] = 1.0  # pure red at (row 0, col 0)
    image[1, 1, 3] = 0.5  # 0.5 * 255 = 127.5 rounds to 128
    image[2, 0, 1] = 2.0  # clamped to 1 -> 255
    image[:, 1, 0] = -1.0  # clamped to 0
    picture = viz.to_pil(image)
    assert picture.mode == "RGB" and picture.size == (4, 2)  # PIL size is (width, height)
    assert picture.getpixel((0, 0)) == (255, 0, 0)
    assert picture.getpixel((3, 1)) == (0, 128, 0)
    assert picture.getpixel((1, 0)) == (0, 0, 255)
    assert picture.getpixel((0, 1)) == (0, 0, 0)


def test_to_pil_gray_and_batch():
    batch = torch.full((2, 1, 5, 3), 0.2)  # 0.2 * 255 = 51
    pictures = viz.to_pil(batch)
    assert isinstance(pictures, list) and len(pictures) == 2
    assert all(p.mode == "L" and p.size == (3, 5) for p in pictures)
    assert np.asarray(pictures[0]).tolist() == [[51] * 3] * 5


def test_make_grid_shape_placement_and_padding():
    batch, channels, height, width, padding = 5, 3, 4, 6, 2
    images = torch.arange(1, batch + 1, dtype=torch.float32).view(batch, 1, 1, 1) / 10
    images = images.expand(batch, channels, height, width)  # image k is filled with (k + 1) / 10
    grid = viz.make_grid(images, nrow=3, padding=padding, pad_value=0.9)
    # By hand: 3 columns, 2 rows; each cell is (4 + 2) x (6 + 2), plus one padding at the far edge.
    assert grid.shape == (3, 2 * 6 + 2, 3 * 8 + 2)
    # Image 4 (index 4) is at row 1, column 1: top = 1 * 6 + 2 = 8, left = 1 * 8 + 2 = 10.
    assert torch.all(grid[:, 8:12, 10:16] == 0.5)
    assert torch.all(grid[:, 2:6, 2:8] == 0.1)  # image 0 at (2, 2)
    # Padding: the top rows, the gap between columns, and the unused last cell are pad_value.
    assert torch.all(grid[:, :2, :] == 0.9)
    assert torch.all(grid[:, :, 8:10] == 0.9)
    assert torch.all(grid[:, 8:, 18:] == 0.9)
    # Every pixel is either an image value or padding: count the padded ones by hand.
    image_pixels = batch * height * width * channels
    assert (grid == 0.9).sum().item() == grid.numel() - image_pixels


def test_make_grid_single_image_and_dtype_follow_input():
    image = torch.zeros(1, 3, 3, dtype=torch.float64)
    grid = viz.make_grid(image, padding=1, pad_value=1.0)
    assert grid.shape == (1, 5, 5) and grid.dtype == torch.float64
    assert grid[0, 1:4, 1:4].sum() == 0 and grid.sum() == 25 - 9


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(4, 4), "shape"),
        (torch.zeros(2, 2, 3, 4, 4), "shape"),
        (torch.zeros(2, 4, 8, 8), "channels"),
    ],
)
def test_image_functions_reject_wrong_input(bad, message):
    for function in (viz.to_pil, viz.make_grid, viz.show_images):
        with pytest.raises(ValueError, match=message):
            function(bad)
        with pytest.raises(TypeError, match="float"):  # a wrong dtype is a TypeError, as everywhere in minildm
            function(torch.zeros(3, 4, 4, dtype=torch.uint8))


# ----------------------------------------------------------------------------- figures


def test_show_images_counts_titles_and_renders():
    images = torch.rand(10, 3, 8, 8)
    titles = [f"a photo of digit {i} written in a very long and wordy prompt that must wrap" for i in range(10)]
    fig = viz.show_images(images, titles=titles, ncols=4, suptitle="samples")
    assert len(image_axes(fig)) == 10
    assert len(fig.axes) == 12  # 3 rows of 4, two cells left empty
    shown_title = image_axes(fig)[0].get_title()
    assert 1 <= shown_title.count("\n") + 1 <= 2  # wrapped to at most two lines
    two_lines = viz.show_images(images[:2], titles=["asked: a red circle\nread: a blue square"] * 2, ncols=2)
    assert image_axes(two_lines)[0].get_title() == "asked: a red circle\nread: a blue square"  # both lines kept
    long = viz.show_images(images[:1], titles=["asked: " + "very " * 20 + "long\nread: short"])
    first, second = image_axes(long)[0].get_title().split("\n")
    assert first.startswith("asked: very") and first.endswith("…") and second == "read: short"
    plt.close(two_lines)
    plt.close(long)
    assert assert_renders(fig)[:4] == b"\x89PNG"
    plt.close(fig)
    with pytest.raises(ValueError, match="one title per image"):
        viz.show_images(images, titles=["only one"])


def test_figures_are_detached_from_pyplot():
    before = len(plt.get_fignums())
    fig = viz.show_images(torch.rand(2, 1, 4, 4))
    assert len(plt.get_fignums()) == before  # nothing left open in pyplot: no leaks in scripts
    plt.close(fig)


def test_show_latents_one_panel_per_channel_with_own_scale():
    latents = torch.randn(2, 4, 6, 6)
    latents[0, 2] *= 100  # a channel with a much larger range keeps its own colour scale
    fig = viz.show_latents(latents, title="z")
    panels = image_axes(fig)
    assert len(panels) == 4
    low, high = panels[2].images[0].get_clim()
    assert high - low > 50
    assert np.allclose(panels[0].images[0].get_array(), latents[0, 0].numpy())
    plt.close(fig)
    with pytest.raises(ValueError, match="latents must have shape"):
        viz.show_latents(torch.zeros(4, 4))


def test_noising_strip_uses_add_noise_and_shows_model_range_mapped_to_unit():
    schedule = FakeSchedule()
    x0 = torch.rand(3, 8, 8) * 2 - 1  # model range [-1, 1]
    timesteps = (0, 500, 999)
    fig = viz.noising_strip(schedule, x0, timesteps, generator=torch.Generator().manual_seed(0))
    assert schedule.calls == [[0], [500], [999]]
    panels = image_axes(fig)
    assert [ax.get_title() for ax in panels] == ["t=0", "t=500", "t=999"]
    # ᾱ_0 = 1 - 1e-4, so x_0 is almost the image: the panel shows (x0 + 1) / 2.
    shown = np.asarray(panels[0].images[0].get_array())  # (H, W, 3)
    assert np.allclose(shown, ((x0 + 1) / 2).permute(1, 2, 0).numpy(), atol=0.05)
    # The last panel is that same noise computed by hand, clamped for display.
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    alpha_bar = schedule.alphas_cumprod[999].float()
    expected = ((alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise[0] + 1) / 2).clamp(0, 1)
    assert np.allclose(np.asarray(panels[2].images[0].get_array()), expected.permute(1, 2, 0).numpy(), atol=1e-5)
    plt.close(fig)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        viz.noising_strip(schedule, torch.rand(3, 8, 8) * 255)


def test_plot_schedules_two_panels_one_line_per_schedule():
    fig = viz.plot_schedules({"linear": FakeSchedule(100), "short": FakeSchedule(50)})
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.lines) == 2
    alpha_line, snr_line = fig.axes[0].lines[0], fig.axes[1].lines[0]
    alpha_bar = FakeSchedule(100).alphas_cumprod.numpy()
    assert np.allclose(alpha_line.get_ydata(), alpha_bar)
    assert np.allclose(snr_line.get_ydata(), np.log(alpha_bar / (1 - alpha_bar)))
    assert_renders(fig)
    plt.close(fig)


def test_denoising_trajectory_subsamples_columns_including_ends():
    steps = 25
    xt = torch.rand(steps, 1, 6, 6)
    x0 = torch.rand(steps, 1, 6, 6)
    timesteps = list(range(960, -1, -40))  # 25 values, 960 ... 0
    fig = viz.denoising_trajectory(xt, x0, timesteps, max_columns=6)
    panels = image_axes(fig)
    assert len(panels) == 12  # 2 rows x 6 columns
    titles = [ax.get_title() for ax in panels if ax.get_title()]
    assert titles[0] == "t=960" and titles[-1] == "t=0" and len(titles) == 6
    assert np.allclose(panels[-1].images[0].get_array(), x0[-1, 0].numpy())
    plt.close(fig)
    few = viz.denoising_trajectory(xt[:3], x0[:3], timesteps[:3])
    assert len(image_axes(few)) == 6
    plt.close(few)
    with pytest.raises(ValueError, match="one timestep per image"):
        viz.denoising_trajectory(xt, x0, timesteps[:3])
    with pytest.raises(ValueError, match="same shape"):
        viz.denoising_trajectory(xt, x0[:3], timesteps)


def test_cross_attention_maps_panels_common_scale_and_shares():
    image = torch.rand(3, 16, 16)
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = 1.0  # token 0 attends to the top-left corner only: total 1
    maps[1] = 0.25  # token 1 attends everywhere equally: total 4
    tokens = ["a", "red", "circle"]  # token 2 gets nothing
    fig = viz.cross_attention_maps(image, maps, tokens, title="attention")
    panels = image_axes(fig)
    assert len(panels) == 4
    assert [ax.get_title() for ax in panels] == ["image", "a\n20%", "red\n80%", "circle\n0%"]  # shares of 5
    assert all(len(ax.images) == 1 for ax in panels)  # each map alone, no image drawn under it
    heat = np.asarray(panels[1].images[0].get_array())  # token "a", upsampled to 16 x 16
    assert heat.shape == (16, 16)
    assert heat[0, 0] > heat[8, 8] and heat[15, 15] == 0
    limits = {ax.images[0].get_clim() for ax in panels[1:]}
    assert len(limits) == 1 and limits.pop() == (0.0, pytest.approx(heat.max()))  # one scale for all tokens
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert_renders(fig)
    plt.close(fig)
    with pytest.raises(ValueError, match="one token per map"):
        viz.cross_attention_maps(image, maps, ["a", "red"])
    with pytest.raises(ValueError, match="non-negative"):
        viz.cross_attention_maps(image, -maps, tokens)
    with pytest.raises(ValueError, match=r"\(L, h, w\)"):
        viz.cross_attention_maps(image, maps[0], tokens)


def test_plot_losses_raw_and_smoothed_on_log_axis():
    losses = {"train": [1.0 / (i + 1) for i in range(200)], "val": [0.5, 0.4, 0.3], "later": []}
    fig = viz.plot_losses(losses, smooth=50)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert len(ax.lines) == 4  # raw + smoothed for the two non-empty series
    smoothed = ax.lines[1].get_ydata()
    assert len(smoothed) == 151 and np.isclose(smoothed[0], np.mean(losses["train"][:50]))
    assert len(ax.lines[3].get_ydata()) == 3  # a 3-point series is not averaged into a single point
    plt.close(fig)
    linear = viz.plot_losses({"signed": [0.5, -0.1, 0.2]})
    assert linear.axes[0].get_yscale() == "linear"
    plt.close(linear)


# ----------------------------------------------------------------------------- GIF


def test_save_gif_frames_size_and_no_temporary_left(tmp_path):
    steps = 4
    frames = torch.stack([torch.full((3, 3, 8, 8), step / (steps - 1)) for step in range(steps)])  # (T, B, C, H, W)
    path = viz.save_gif(frames, tmp_path / "out" / "sampling.gif", nrow=3)
    assert path.exists() and path.stat().st_mode & 0o044 == 0o044  # readable by others, unlike mkstemp's
    assert os.listdir(path.parent) == ["sampling.gif"]  # the temporary file was renamed away
    with Image.open(path) as gif:
        assert gif.n_frames == steps
        # One grid is 3 * (8 + 2) + 2 = 32 pixels wide, upscaled 8x to reach 256; 12 high -> 96.
        assert gif.size == (256, 96)
        assert gif.info.get("loop") == 0
        gif.seek(steps - 1)
        assert gif.info["duration"] == 1000


def test_save_gif_single_image_frames_and_bad_rank(tmp_path):
    frames = torch.rand(3, 1, 32, 32)  # (T, C, H, W)
    path = viz.save_gif(frames, tmp_path / "one.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.size == (256, 256)
    with pytest.raises(ValueError, match="shape"):
        viz.save_gif(torch.rand(32, 32), tmp_path / "bad.gif")
    assert sorted(os.listdir(tmp_path)) == ["one.gif"]
