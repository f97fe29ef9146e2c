"""Conditioning by concatenation: a spatially aligned condition beside z_t, as extra input channels of the backbone.

The LDM paper conditions in two ways (Rombach et al. 2022, section 3.3): cross-attention for prompts and
classes, and, for inputs that are images themselves, concatenation with z_t along the channels ("for
spatially aligned conditioning information ... we concatenate with the input of ε_θ"; its super-resolution
model, section 4.4, and its inpainting model, section 4.5). The backbone then takes c + extra channels in and
still predicts c channels out:

    ε_θ([z_t, y_spatial], t, τ_θ(prompt))        [ , ] = torch.cat(..., dim=1)

Two conditions, each knowing its extra channels, building its input from the arguments diffusers uses
(`image=`, `mask_image=`) and drawing a training condition from the training batch itself:

    InpaintingCondition  Stable Diffusion's inpainting model (diffusers' StableDiffusionInpaintPipeline):
                         [z_t, m↓, E(x ⊙ (1 - m))·scaling_factor], the mask first, then the masked image's
                         latents: 1 + c extra channels. m = 1 marks the region to repaint; m↓ is m at latent
                         size, by nearest-neighbour downsampling (diffusers' F.interpolate default), i.e.
                         m[:, :, ::f, ::f]; masked pixels are set to 0 in [-1, 1] (grey) before E.
    LowResCondition      super-resolution: the low-resolution image x↓ (B, C, H/s, W/s) in [-1, 1], at latent
                         size (h, w): as it is when H/s = h (the paper's SR model: 64 -> 256 with f = 4, its
                         low-res image is the latent size); space-to-depth (pixel_unshuffle) when larger,
                         bicubic upsampling when smaller.

Both are plain objects without weights (the backbone learns what to do with the channels); a model folder
stores their config_dict under "concat_conditioning" (model_folder.py). Images come in as diffusers' do:
(B, C, H, W) floats in [0, 1], masks (B, 1, H, W) of 0s and 1s. Depends on torch only.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F


def _check_unit_images(value, name: str, channels: int | None = None) -> None:
    """Raise TypeError unless `value` is a floating-point tensor, ValueError unless it is (B, channels, H, W)
    in [0, 1]."""
    if not torch.is_tensor(value) or not value.is_floating_point():
        got = f"a {value.dtype} tensor" if torch.is_tensor(value) else type(value).__name__
        raise TypeError(f"{name} must be a floating-point tensor (B, C, H, W) in [0, 1], got {got}")
    if value.ndim != 4 or 0 in value.shape or (channels is not None and value.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        raise ValueError(f"{name} must have shape {want} with B, H, W >= 1, got {tuple(value.shape)}")
    if value.device.type != "meta" and (value.min() < 0 or value.max() > 1):
        raise ValueError(f"{name} must hold values in [0, 1] (diffusers' convention, not [-1, 1]), got values from "
                         f"{value.min().item():.3g} to {value.max().item():.3g}")


def check_mask(mask_image, image: torch.Tensor) -> None:
    """Raise TypeError / ValueError unless `mask_image` is (B, 1, H, W) of 0s and 1s, the size of `image`
    (B, C, H, W); a batch of 1 of either is shared by the other's."""
    if not torch.is_tensor(mask_image) or mask_image.dtype == torch.bool or mask_image.is_complex():
        got = f"a {mask_image.dtype} tensor" if torch.is_tensor(mask_image) else type(mask_image).__name__
        raise TypeError(f"mask_image must be a float tensor (B, 1, H, W) of 0s and 1s, got {got}")
    B, _, H, W = image.shape
    if mask_image.ndim != 4 or mask_image.shape[1] != 1 or tuple(mask_image.shape[2:]) != (H, W) \
            or (mask_image.shape[0] not in (1, B) and B != 1):
        raise ValueError(f"mask_image must have shape ({B}, 1, {H}, {W}) like image (one channel, 1 = repaint), "
                         f"got {tuple(mask_image.shape)}")
    if not ((mask_image == 0) | (mask_image == 1)).all():
        raise ValueError("mask_image must hold only 0 (keep) and 1 (repaint); threshold a soft mask first, e.g. "
                         "(mask > 0.5).float()")


class InpaintingCondition:
    """Stable Diffusion's inpainting input: the mask at latent size and the masked image's latents, 1 + c channels.

    model_input(first_stage, latent_size, image, mask_image) -> (B, 1 + c, h, w): channel 0 is the mask m↓,
    channels 1 .. c the scaled latents of x ⊙ (1 - m), in the order of diffusers' StableDiffusionInpaintPipeline
    (which concatenates [z_t, mask, masked_image_latents]). image (B, C, H, W) in [0, 1], mask_image (B, 1, H, W)
    in {0, 1}, 1 = the region to repaint (diffusers' convention); a batch of 1 is shared by all.

    Training masks (draw_training_input): with probability `rectangle_probability` a rectangle whose sides are
    25% to 75% of the image's, else two brush strokes of four segments each (LaMa-style free-form masks, Suvorov
    et al. 2022, which the LDM paper's inpainting model trains on, section 4.5 and appendix E.2.2).
    """

    kind = "inpainting"

    def __init__(self, rectangle_probability: float = 0.5):
        if not isinstance(rectangle_probability, numbers.Real) or not 0 <= rectangle_probability <= 1:
            raise ValueError(f"rectangle_probability must be in [0, 1], got {rectangle_probability!r}")
        self.rectangle_probability = float(rectangle_probability)

    def extra_channels(self, first_stage) -> int:
        return 1 + first_stage.latent_channels  # the mask, then the masked image's latents

    def output_size(self, image: torch.Tensor) -> tuple[int, int]:
        """(H, W) of the images this condition makes from `image`: the image's own size."""
        return tuple(image.shape[2:])

    def check_inputs(self, image, mask_image, image_channels: int) -> None:
        """Raise ValueError if either is missing, TypeError / ValueError if either is of the wrong kind."""
        if image is None or mask_image is None:
            raise ValueError("this inpainting model needs image= (B, C, H, W) in [0, 1] and mask_image= (B, 1, H, W) "
                             f"with 1 where to repaint; got image={'given' if image is not None else None}, "
                             f"mask_image={'given' if mask_image is not None else None}")
        _check_unit_images(image, "image", image_channels)
        check_mask(mask_image, image)

    @torch.no_grad()
    def model_input(self, first_stage, latent_size: tuple[int, int], image: torch.Tensor | None = None,
                    mask_image: torch.Tensor | None = None) -> torch.Tensor:
        """[m↓, scaling_factor · E(x ⊙ (1 - m))], (B, 1 + c, h, w), on image's device in the first stage's dtype."""
        self.check_inputs(image, mask_image, first_stage.in_channels)
        f = first_stage.downsampling_factor
        if (image.shape[2] // f, image.shape[3] // f) != tuple(latent_size) or image.shape[2] % f \
                or image.shape[3] % f:
            raise ValueError(f"image must be {latent_size[0] * f}x{latent_size[1] * f} pixels for latents of "
                             f"{latent_size[0]}x{latent_size[1]} (f={f}), got {tuple(image.shape[2:])}")
        batch = max(len(image), len(mask_image))  # a batch of 1 of either is shared
        image = image.expand(batch, -1, -1, -1)
        mask = mask_image.expand(batch, -1, -1, -1).to(image.dtype)  # (B, 1, H, W)
        masked_image = (image * 2 - 1) * (1 - mask)  # [0, 1] -> [-1, 1]; the region to repaint becomes 0 (grey)
        dtype = next(first_stage.parameters(), image).dtype  # PixelSpace has no weights
        masked_latents = first_stage.encode(masked_image.to(dtype)).mode() * first_stage.scaling_factor  # (B, c, h, w)
        small_mask = F.interpolate(mask, size=tuple(latent_size), mode="nearest")  # (B, 1, h, w): m[:, :, ::f, ::f]
        return torch.cat([small_mask.to(masked_latents.dtype), masked_latents], dim=1)  # (B, 1 + c, h, w)

    def draw_training_input(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """A training condition from a batch images (B, C, H, W) in [-1, 1]: {"image": in [0, 1], "mask_image":
        random masks (B, 1, H, W) in {0, 1}}, the masks drawn on the CPU from `generator`."""
        B, _, H, W = images.shape
        masks = random_masks(B, H, W, self.rectangle_probability, generator)
        return {"image": ((images + 1) / 2).clamp(0, 1), "mask_image": masks.to(images.device, images.dtype)}

    def config_dict(self) -> dict:
        return {"rectangle_probability": self.rectangle_probability}

    @classmethod
    def from_config_dict(cls, config: dict) -> InpaintingCondition:
        return cls(**config)

    def __repr__(self) -> str:
        return f"InpaintingCondition(rectangle_probability={self.rectangle_probability})"


def random_masks(batch_size: int, height: int, width: int, rectangle_probability: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Training masks (B, 1, H, W) float32 in {0, 1} (1 = repaint), drawn on the CPU from `generator`: per sample a
    rectangle (probability `rectangle_probability`, sides 25% to 75% of the image's) or two brush strokes of four
    segments each, 8% to 20% of the image's side wide. Every sample draws both, so the draws do not depend on
    which is kept."""
    B = batch_size
    ys = (torch.arange(height) + 0.5) / height  # pixel centres, as fractions of the side
    xs = (torch.arange(width) + 0.5) / width
    # rectangles: sides in [0.25, 0.75], placed anywhere they fit
    sides = 0.25 + 0.5 * torch.rand(B, 2, generator=generator)  # (B, 2): height, width
    corner = torch.rand(B, 2, generator=generator) * (1 - sides)  # (B, 2): top, left
    inside_y = (ys[None, :] >= corner[:, :1]) & (ys[None, :] < corner[:, :1] + sides[:, :1])  # (B, H)
    inside_x = (xs[None, :] >= corner[:, 1:]) & (xs[None, :] < corner[:, 1:] + sides[:, 1:])  # (B, W)
    rectangles = inside_y[:, :, None] & inside_x[:, None, :]  # (B, H, W)
    # brush strokes: 2 random walks of 4 segments, each segment 0.15 to 0.4 long
    strokes, segments = 2, 4
    start = torch.rand(B, strokes, 1, 2, generator=generator)  # (B, S, 1, 2) points (x, y)
    angles = 2 * math.pi * torch.rand(B, strokes, segments, generator=generator)
    lengths = 0.15 + 0.25 * torch.rand(B, strokes, segments, generator=generator)
    steps = torch.stack([angles.cos(), angles.sin()], dim=-1) * lengths[..., None]  # (B, S, K, 2)
    points = torch.cat([start, start + steps.cumsum(dim=2)], dim=2).clamp(0, 1)  # (B, S, K + 1, 2)
    a, b = points[:, :, :-1].reshape(B, -1, 2), points[:, :, 1:].reshape(B, -1, 2)  # (B, S·K, 2) segment ends
    half_width = (0.04 + 0.06 * torch.rand(B, 1, generator=generator))[:, :, None]  # (B, 1, 1)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, 1, -1, 2)  # (1, 1, HW, 2) (x, y)
    ab = (b - a)[:, :, None]  # (B, S·K, 1, 2)
    along = ((grid - a[:, :, None]) * ab).sum(-1) / ab.pow(2).sum(-1).clamp(min=1e-12)  # (B, S·K, HW)
    nearest = a[:, :, None] + along.clamp(0, 1)[..., None] * ab  # the segment's point nearest each pixel
    distance = (grid - nearest).norm(dim=-1)  # (B, S·K, HW)
    brushed = (distance <= half_width).any(dim=1).reshape(B, height, width)  # (B, H, W)
    use_rectangle = torch.rand(B, generator=generator) < rectangle_probability  # (B,)
    masks = torch.where(use_rectangle[:, None, None], rectangles, brushed)
    return masks[:, None].float()  # (B, 1, H, W)


class LowResCondition:
    """Super-resolution: the image at 1/`scale` of the output's size, brought to latent size, C · k² channels.

    model_input(first_stage, latent_size, image) -> (B, C · k², h, w) with image (B, C, H/s, W/s) in [0, 1] the
    low-resolution input (diffusers' StableDiffusionUpscalePipeline calls it `image` too), mapped to [-1, 1]:
    concatenated as it is when it has the latents' size (k = 1, the LDM paper's SR models, section 4.4),
    rearranged space-to-depth when it is k times larger, bicubic-upsampled when smaller (k = 1).
    Training (draw_training_input): each training image, box-filtered down by `scale` (area averaging).
    """

    kind = "low_res"

    def __init__(self, scale: int = 4):
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 2:
            raise ValueError(f"scale must be an integer >= 2 (the output is scale times the input's size), got "
                             f"{scale!r}")
        self.scale = scale

    def _space_to_depth(self, first_stage) -> int:
        """k: how many low-res pixels per latent pixel along a side (1 if the low-res image is no larger)."""
        f = first_stage.downsampling_factor
        return f // self.scale if f > self.scale and f % self.scale == 0 else 1

    def extra_channels(self, first_stage) -> int:
        return first_stage.in_channels * self._space_to_depth(first_stage) ** 2

    def output_size(self, image: torch.Tensor) -> tuple[int, int]:
        """(H, W) of the images this condition makes from a low-resolution `image`: scale times its size."""
        return (image.shape[2] * self.scale, image.shape[3] * self.scale)

    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> (B, C, H/scale, W/scale) by area averaging (any range; H, W multiples of scale)."""
        if images.shape[2] % self.scale or images.shape[3] % self.scale:
            raise ValueError(f"images must be multiples of scale={self.scale} in size, got {tuple(images.shape[2:])}")
        return F.avg_pool2d(images, self.scale)  # (B, C, H, W) -> (B, C, H/s, W/s)

    def check_inputs(self, image, mask_image, image_channels: int) -> None:
        if image is None:
            raise ValueError(f"this super-resolution model needs image=, the low-resolution image "
                             f"(B, C, H/{self.scale}, W/{self.scale}) in [0, 1]")
        if mask_image is not None:
            raise ValueError("mask_image= is for an inpainting model; this one does super-resolution (image= only)")
        _check_unit_images(image, "image", image_channels)

    @torch.no_grad()
    def model_input(self, first_stage, latent_size: tuple[int, int], image: torch.Tensor | None = None,
                    mask_image: torch.Tensor | None = None) -> torch.Tensor:
        """The low-res image at latent size, (B, C · k², h, w), in [-1, 1]."""
        self.check_inputs(image, mask_image, first_stage.in_channels)
        h, w = latent_size
        f = first_stage.downsampling_factor
        expected = (h * f // self.scale, w * f // self.scale)
        if tuple(image.shape[2:]) != expected:
            raise ValueError(f"image must be the {expected[0]}x{expected[1]} low-resolution input of a "
                             f"{h * f}x{w * f} output (scale {self.scale}), got {tuple(image.shape[2:])}")
        low_res = image * 2 - 1  # [0, 1] -> [-1, 1]
        k = self._space_to_depth(first_stage)
        if k > 1:
            return F.pixel_unshuffle(low_res, k)  # (B, C, k·h, k·w) -> (B, C·k², h, w)
        if expected != (h, w):
            return F.interpolate(low_res, size=(h, w), mode="bicubic", align_corners=False)  # (B, C, h, w)
        return low_res  # already (B, C, h, w)

    def draw_training_input(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """{"image": the batch (B, C, H, W) in [-1, 1] downsampled by scale, in [0, 1]} (no randomness)."""
        return {"image": ((self.downsample(images) + 1) / 2).clamp(0, 1)}

    def config_dict(self) -> dict:
        return {"scale": self.scale}

    @classmethod
    def from_config_dict(cls, config: dict) -> LowResCondition:
        return cls(**config)

    def __repr__(self) -> str:
        return f"LowResCondition(scale={self.scale})"


CONCAT_CONDITIONS = {"InpaintingCondition": InpaintingCondition, "LowResCondition": LowResCondition}
