"""Min-SNR-γ loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", arXiv:2303.09556): timesteps compete for the same network, and the easy, low-noise ones
(large SNR) dominate the plain loss. Min-SNR-γ caps each timestep's weight at γ in the x_0 loss,

    L = E_t [ min(SNR(t), γ) · || x̂_0 - x_0 ||² ]                                   (their "Min-SNR-γ")

and, since ||x̂_0 - x_0||² = ||ε̂ - ε||² / SNR and = ||v̂ - v||² / (SNR + 1), the same loss written for
the other targets weights their plain MSE by

    ε:   min(SNR, γ) / SNR          v:   min(SNR, γ) / (SNR + 1)          x_0:  min(SNR, γ)

(diffusers' train_text_to_image.py uses the same three). With zero terminal SNR, SNR = 0 at the last
step: the ε weight is its limit as SNR -> 0, which is 1 (min(SNR, γ) = SNR there), never 0/0.
γ = 5 is the paper's default. Depends on torch only.
"""

from __future__ import annotations

import math
import numbers

import torch

LOSS_TARGETS = ("epsilon", "v_prediction", "sample")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """The Min-SNR-γ weight of each sample's MSE, for the network's `prediction_type`.

    snr: (B,) SNR(t) = ᾱ_t / (1 - ᾱ_t) >= 0 of each sample's timestep (NoiseSchedule.snr); gamma: γ > 0.
    Returns (B,) float32 weights in [0, max(1, γ)]. Raises ValueError for γ <= 0, a negative or non-finite SNR,
    or a prediction type without an SNR (the rectified flow's "flow_prediction").
    """
    if not isinstance(gamma, numbers.Real) or isinstance(gamma, bool) or not 0 < gamma < math.inf:
        raise ValueError(f"snr_gamma must be a positive finite number (the paper uses 5), got {gamma!r}")
    if prediction_type not in LOSS_TARGETS:
        raise ValueError(f"Min-SNR weighting is defined for {LOSS_TARGETS}, got prediction_type={prediction_type!r}")
    if not torch.is_tensor(snr) or not snr.is_floating_point() or snr.ndim != 1:
        raise ValueError(f"snr must be a 1-d floating-point tensor (one SNR per sample), got {snr!r:.60}")
    if (snr < 0).any() or not torch.isfinite(snr).all():
        raise ValueError("snr must be finite and >= 0")
    snr = snr.float()
    capped = snr.clamp(max=gamma)  # min(SNR, γ)
    if prediction_type == "sample":
        return capped
    if prediction_type == "v_prediction":
        return capped / (snr + 1)
    # ε: min(SNR, γ) / SNR, which is 1 wherever SNR <= γ (its SNR -> 0 limit included) and γ / SNR above
    return torch.where(snr > gamma, gamma / snr.clamp(min=gamma), torch.ones_like(snr))
