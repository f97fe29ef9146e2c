"""Exercises of notebook 13, conditioning by concatenation and by class: Stable Diffusion's inpainting input (the mask
at latent size and the masked image's latents beside z_t), and the class embedding with its null class.

Notation as in concat_conditioning.py and class_embedder.py: z_t (B, c, h, w) the noisy latents, x (B, C, H, W) the
image in [0, 1], m (B, 1, H, W) the mask (1 = repaint), f the first stage's factor (h = H / f), E its encoder and s
its scaling factor; for classes, an embedding table (K + 1, D) whose last row K is the null class. Each solution is
the code of the notebook's solution cell; each Mistake is a wrong answer students write, with the hint it earns.
minildm's own code is the reference: InpaintingCondition.model_input and ClassEmbedder.encode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..autoencoder import AutoencoderConfig, AutoencoderKL
from ..class_embedder import ClassEmbedder, ClassEmbedderConfig
from ..concat_conditioning import InpaintingCondition
from .core import Exercise, Mistake

NOTEBOOK = "13_conditioning_by_concatenation"
SOURCE_LDM = "Rombach et al. 2022 (arXiv:2112.10752)"
_FIRST_STAGE = {}


def _first_stage() -> AutoencoderKL:
    """A small untrained f = 2 autoencoder in float64 (3 image channels, 2 latent channels), built once."""
    if "model" not in _FIRST_STAGE:
        with torch.random.fork_rng(devices=[]):  # a check leaves the global random state alone
            torch.manual_seed(13)
            model = AutoencoderKL(AutoencoderConfig(3, 2, (4, 4), norm_num_groups=2, scaling_factor=0.6))
        _FIRST_STAGE["model"] = model.double().eval().requires_grad_(False)
    return _FIRST_STAGE["model"]


# ---- the inpainting input ---------------------------------------------------------------------------------------


def inpainting_input(noisy_latents, image, mask_image, first_stage):
    # BEGIN SOLUTION
    f = first_stage.downsampling_factor
    small_mask = mask_image[:, :, ::f, ::f]  # (B, 1, h, w): nearest-neighbour downsampling, diffusers' choice
    masked_image = (image * 2 - 1) * (1 - mask_image)  # [0, 1] -> [-1, 1], and the region to repaint set to 0
    masked_latents = first_stage.encode(masked_image).mode() * first_stage.scaling_factor  # (B, c, h, w)
    return torch.cat([noisy_latents, small_mask, masked_latents], dim=1)  # (B, c + 1 + c, h, w): [z_t, m, E(...)]
    # END SOLUTION


def _inpainting_cases(seed):
    g = torch.Generator().manual_seed(1300 + seed)
    cases = []
    for B, H, W in ((3, 10, 14), (2, 6, 8)):
        image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
        mask = torch.zeros(B, 1, H, W, dtype=torch.float64)
        for b in range(B):  # rectangles whose edges fall inside the f x f blocks: pooling would differ from nearest
            top, left = int(torch.randint(0, H // 2, (), generator=g)), int(torch.randint(0, W // 2, (), generator=g))
            mask[b, :, top + 1: top + 1 + H // 2, left + 1: left + 2 + W // 3] = 1
        noisy = torch.randn(B, 2, H // 2, W // 2, generator=g, dtype=torch.float64)
        cases.append({"noisy_latents": noisy, "image": image, "mask_image": mask, "first_stage": _first_stage()})
    return cases


def _minildm_inpainting_input(noisy_latents, image, mask_image, first_stage):
    condition = InpaintingCondition().model_input(first_stage, tuple(noisy_latents.shape[2:]), image=image,
                                                  mask_image=mask_image)
    return torch.cat([noisy_latents, condition], dim=1)


def _inpainting_mistake(kind):
    def build(noisy_latents, image, mask_image, first_stage):
        f = first_stage.downsampling_factor
        small_mask = F.avg_pool2d(mask_image, f) if kind == "pooled mask" else mask_image[:, :, ::f, ::f]
        keep = mask_image if kind == "kept the hole" else 1 - mask_image
        x = image if kind == "no [-1, 1]" else image * 2 - 1
        masked = x if kind == "not masked" else x * keep
        scale = 1.0 if kind == "no scaling factor" else first_stage.scaling_factor
        latents = first_stage.encode(masked).mode() * scale
        if kind == "order":
            return torch.cat([noisy_latents, latents, small_mask], dim=1)
        return torch.cat([noisy_latents, small_mask, latents], dim=1)
    return build


INPAINTING_INPUT = Exercise(
    name="inpainting_input", notebook=NOTEBOOK,
    task="inpainting_input(noisy_latents, image, mask_image, first_stage) -> the inpainting backbone's input "
         "(B, c + 1 + c, h, w): z_t (noisy_latents, (B, c, h, w)), then the mask (B, 1, H, W; 1 = repaint) at "
         "latent size by nearest-neighbour downsampling (every f-th pixel), then the scaled latents "
         "s · E(x ⊙ (1 - m)).mode() of the image (B, C, H, W) in [0, 1] mapped to [-1, 1] with the region to "
         "repaint set to 0. first_stage has .encode, .downsampling_factor and .scaling_factor.",
    source=f"{SOURCE_LDM}, sections 3.3 and 4.5 (concatenation of a spatially aligned condition with z_t); the "
           "channel order of Stable Diffusion's inpainting model (diffusers' StableDiffusionInpaintPipeline: "
           "[latents, mask, masked_image_latents], masked_image = image * (mask < 0.5))",
    solution=inpainting_input, cases=_inpainting_cases, reference=_minildm_inpainting_input,
    mistakes=(
        Mistake("the image kept is the region to repaint: m = 1 marks the hole, so the known pixels are x ⊙ (1 - m)",
                _inpainting_mistake("kept the hole")),
        Mistake("the channel order is [z_t, mask, masked-image latents] (diffusers' StableDiffusionInpaintPipeline): "
                "a trained inpainting UNet reads its channels in that order", _inpainting_mistake("order")),
        Mistake("the mask is averaged over each f x f block: Stable Diffusion downsamples it by nearest neighbour "
                "(F.interpolate's default), mask[:, :, ::f, ::f], which keeps it 0 or 1", _inpainting_mistake(
                    "pooled mask")),
        Mistake("the first stage takes images in [-1, 1]: map x from [0, 1] with 2x - 1 before masking",
                _inpainting_mistake("no [-1, 1]")),
        Mistake("the latents beside z_t must be on z_t's scale: multiply E(...).mode() by first_stage.scaling_factor",
                _inpainting_mistake("no scaling factor")),
        Mistake("the whole image was encoded: the model must not see the pixels under the mask, E(x ⊙ (1 - m))",
                _inpainting_mistake("not masked")),
    ),
)


# ---- the class embedding ----------------------------------------------------------------------------------------


def class_condition(class_labels, dropped, embedding_weight):
    # BEGIN SOLUTION
    null_class = embedding_weight.shape[0] - 1  # the last row: K classes, then the null class
    rows = torch.where(dropped, null_class, class_labels)  # (B,): a dropped label becomes the null class
    return embedding_weight[rows][:, None]  # (B, D) -> (B, 1, D): one token for the cross-attention
    # END SOLUTION


def _class_cases(seed):
    g = torch.Generator().manual_seed(1310 + seed)
    cases = []
    for K, D, B in ((10, 6, 7), (3, 4, 5)):
        weight = torch.randn(K + 1, D, generator=g, dtype=torch.float64)
        labels = torch.randint(0, K, (B,), generator=g)
        labels[0] = 0  # the first class, which an off-by-one null row would collide with
        dropped = torch.rand(B, generator=g) < 0.4
        dropped[1], dropped[2] = True, False  # both kinds in every case
        cases.append({"class_labels": labels, "dropped": dropped, "embedding_weight": weight})
    return cases


def _minildm_class_condition(class_labels, dropped, embedding_weight):
    K, D = embedding_weight.shape[0] - 1, embedding_weight.shape[1]
    with torch.random.fork_rng(devices=[]):  # the embedding's random init must not move the global random state
        embedder = ClassEmbedder(ClassEmbedderConfig(K, D)).double()
    with torch.no_grad():
        embedder.embedding.weight.copy_(embedding_weight)
    names = [embedder.null_condition if drop else name
             for name, drop in zip(embedder.condition_names(class_labels), dropped.tolist())]
    return embedder.encode(names).detach()


def _class_mistake(kind):
    def lookup(class_labels, dropped, embedding_weight):
        if kind == "null first":
            rows = torch.where(dropped, 0, class_labels + 1)
        elif kind == "zeros":
            return torch.where(dropped[:, None, None], 0.0, embedding_weight[class_labels][:, None])
        elif kind == "not dropped":
            rows = class_labels
        else:  # "null at 0"
            rows = torch.where(dropped, 0, class_labels)
        return embedding_weight[rows][:, None]
    return lookup


CLASS_CONDITION = Exercise(
    name="class_condition", notebook=NOTEBOOK,
    task="class_condition(class_labels, dropped, embedding_weight) -> encoder_hidden_states (B, 1, D): the row of "
         "embedding_weight (K + 1, D) of each label (B,) int64 in [0, K), as a sequence of one token; where "
         "dropped (B,) bool is True, the null class's row K (the last) instead, as classifier-free guidance trains.",
    source=f"{SOURCE_LDM}, section 4.1 (class-conditional ImageNet models; CompVis' ClassEmbedder: an nn.Embedding "
           "whose output is one token, c[:, None]); Ho & Salimans 2022 (arXiv:2207.12598), Algorithm 1: the label "
           "replaced by the null token with probability p_uncond",
    solution=class_condition, cases=_class_cases, reference=_minildm_class_condition,
    mistakes=(
        Mistake("the null class is the last row, K = embedding_weight.shape[0] - 1, after the K classes; row 0 is "
                "class 0", _class_mistake("null at 0")),
        Mistake("the classes are rows 0 .. K - 1 as they are; the null class comes after them, at row K, not "
                "before", _class_mistake("null first")),
        Mistake("the null class is a learned row of the table (row K), not a vector of zeros: the model learns "
                "what 'no class' means", _class_mistake("zeros")),
        Mistake("a dropped label must become the null class (row K): that is how the same network learns the "
                "unconditional prediction guidance needs", _class_mistake("not dropped")),
    ),
)

EXERCISES = (INPAINTING_INPUT, CLASS_CONDITION)
