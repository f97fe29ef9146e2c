"""Where each word looks: cross-attention probabilities recorded while a model samples one prompt.

Every cross-attention layer computes softmax(Q K^T / sqrt(d)) (Rombach et al. 2022, section 3.3), whose
row for an image position says how much of that position's update comes from each token. Averaged over
heads, layers and sampling steps, column j of that matrix, laid out on the latent grid, is a map of where
token j acts: the word "circle" lights up the circle (Hertz et al. 2022, "Prompt-to-Prompt", fig. 4).

Layers at coarser levels of a UNet, and a DiT's patches, see a smaller grid; their maps are upsampled
bilinearly to the latent size h x w before averaging. Depends on torch; works with any model whose backbone lists its
cross-attention layers (interfaces.Backbone.cross_attention_modules) and whose conditioner names its
tokens (interfaces.Conditioner.tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _grids(h: int, w: int, levels: int = 8) -> list[tuple[int, int]]:
    """The grid sizes a backbone's levels see for an h x w latent: each stride-2 level rounds up (7 -> 4 -> 2)."""
    grids = [(h, w)]
    for _ in range(levels):
        h, w = (h + 1) // 2, (w + 1) // 2
        grids.append((h, w))
    return grids


@torch.no_grad()
def cross_attention_maps(model, prompt: str, num_inference_steps: int = 50, guidance_scale: float = 3.0,
                         generator: torch.Generator | None = None, sampler=None):
    """Sample `prompt` once with `model` (a LatentDiffusion) and record its cross-attention.

    Returns (image (C, H, W) in [0, 1], maps (L, h, w), tokens): maps[j] is the attention probability
    of token j, averaged over heads, layers and steps, at every latent position; tokens are the L labels
    of the first L positions (<bos> ... <eos>). Raises ValueError for a backbone without cross-attention.
    """
    modules = list(model.backbone.cross_attention_modules().values())
    if not modules:
        raise ValueError("this backbone has no cross-attention layers, so there is nothing to map")
    _, h, w = model.latent_shape()
    grids = {gh * gw: (gh, gw) for gh, gw in reversed(_grids(h, w))}  # positions N -> (rows, columns)
    for p in range(3, min(h, w) + 1):  # a transformer's patch grid (h/p, w/p) for a patch size the halving misses
        if h % p == 0 and w % p == 0:
            grids.setdefault(h // p * (w // p), (h // p, w // p))
    total, calls = None, 0

    def record(step_index, timestep, latents):
        nonlocal total, calls
        calls += 1
        for module in modules:
            probs = module.attention_probs[-1].mean(dim=0).float().cpu()  # conditional sample, mean of heads: (N, L)
            rows, columns = grids[probs.shape[0]]
            maps = probs.T.reshape(-1, 1, rows, columns)  # (N, L) -> (L, 1, rows, columns)
            maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # (L, h, w)
            total = maps if total is None else total + maps

    for module in modules:
        module.store_attention_probs = True
    try:
        image = model.generate([prompt], num_inference_steps, sampler=sampler, guidance_scale=guidance_scale,
                               generator=generator, callback=record)[0]
    finally:
        for module in modules:
            module.store_attention_probs = False
            module.attention_probs = None
    tokens = model.conditioner.tokens(prompt)
    return image, total[: len(tokens)] / (len(modules) * calls), tokens
