"""Exercises of notebook 12, the VQ autoencoder: the nearest-code lookup, the straight-through estimator, and the
VQ-VAE loss's codebook and commitment terms.

Notation as in vq.py: z = z_e (B, c, h, w) the encoder's output, codebook (K, c) the codes e_1 .. e_K, k the
index of the nearest code at each position, sg the stop-gradient (.detach()), β the commitment weight. Each
solution below is the code of the notebook's solution cell (between # BEGIN SOLUTION and # END SOLUTION); each
Mistake is a wrong answer students write, with the hint it earns. minildm's own code is the reference: a
VectorQuantizer given the same codebook (its lookup, its straight-through output, its two loss terms). The
straight-through and the loss exercises are checked on their values and on their gradients, since that is
where they differ from the wrong answers: the checker backpropagates through your function and compares the
gradients that reach z and the codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..vq import VectorQuantizer
from .core import Exercise, Mistake

SOURCE = "van den Oord et al. 2017 (VQ-VAE, arXiv:1711.00937)"


def _minildm_quantizer(codebook: torch.Tensor) -> VectorQuantizer:
    """minildm's VectorQuantizer whose codebook is `codebook` itself (a Parameter: gradients reach it)."""
    with torch.random.fork_rng(devices=[]):  # building it draws an initial codebook: leave the random state alone
        quantizer = VectorQuantizer(codebook.shape[0], codebook.shape[1])
    quantizer.embedding.weight = codebook if isinstance(codebook, nn.Parameter) else nn.Parameter(codebook)
    return quantizer


def _cases(seed):
    g = torch.Generator().manual_seed(1200 + seed)
    # codes of different lengths, so that the largest dot product is not the nearest code
    first = torch.randn(7, 3, generator=g) * torch.linspace(0.3, 2.5, 7)[:, None]
    second = torch.randn(5, 2, generator=g) * torch.linspace(0.5, 2.0, 5)[:, None]
    return [{"z": torch.randn(2, 3, 4, 5, generator=g) * 1.5, "codebook": first, "beta": 0.25},
            {"z": torch.randn(1, 2, 3, 6, generator=g), "codebook": second, "beta": 0.5 + seed}]


def _lookup_cases(seed):
    return [{"z": case["z"], "codebook": case["codebook"]} for case in _cases(seed)]


# ---- the nearest code -------------------------------------------------------------------------------------------


def nearest_code(z, codebook):
    # BEGIN SOLUTION
    B, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B, c, h, w) -> (B h w, c): one vector per position
    distances = torch.cdist(flat, codebook) ** 2  # (B h w, K): ||z - e_j||² for every code j
    return distances.argmin(dim=1).view(B, h, w)  # k = argmin_j ||z - e_j||² (VQ-VAE eq. 1)
    # END SOLUTION


def _minildm_nearest_code(z, codebook):
    return _minildm_quantizer(codebook.detach().clone())(z).indices


def _lookup_mistake(kind):
    def lookup(z, codebook):
        B, c, h, w = z.shape
        flat = z.reshape(-1, c) if kind == "no permute" else z.permute(0, 2, 3, 1).reshape(-1, c)
        if kind == "dot product":
            return (flat @ codebook.T).argmax(dim=1).view(B, h, w)
        distances = torch.cdist(flat, codebook) ** 2
        return (distances.argmax(dim=1) if kind == "farthest" else distances.argmin(dim=1)).view(B, h, w)
    return lookup


NEAREST_CODE = Exercise(
    name="nearest_code", notebook="12_vq_autoencoder",
    task="nearest_code(z, codebook) -> indices (B, h, w), int64: at every position of z (B, c, h, w), the index k "
         "of the row of codebook (K, c) nearest to z's c numbers there, in squared Euclidean distance.",
    source=f"{SOURCE}, eq. (1): q(z = k | x) = 1 for k = argmin_j ||z_e(x) - e_j||²",
    solution=nearest_code, cases=_lookup_cases, reference=_minildm_nearest_code,
    mistakes=(
        Mistake("that is the farthest code: the nearest one has the smallest distance, argmin_j ||z - e_j||²",
                _lookup_mistake("farthest")),
        Mistake("z.reshape(-1, c) mixes channels and positions, since c is not the last dimension: move it last first, "
                "z.permute(0, 2, 3, 1).reshape(-1, c), so each row is one position's vector",
                _lookup_mistake("no permute")),
        Mistake("the largest dot product z·e is not the nearest code when codes differ in length: "
                "||z - e||² = ||z||² - 2 z·e + ||e||² also counts ||e||²", _lookup_mistake("dot product")),
    ),
)


# ---- the straight-through estimator -----------------------------------------------------------------------------


def straight_through(z, codebook):
    # BEGIN SOLUTION
    indices = nearest_code(z, codebook)  # (B, h, w)
    codes = codebook[indices].permute(0, 3, 1, 2)  # (B, h, w, c) -> (B, c, h, w): e_k at every position
    return z + (codes - z).detach()  # forward: e_k; backward: the gradient at z_q copied to z_e unchanged
    # END SOLUTION


def _minildm_straight_through(z, codebook):
    return _minildm_quantizer(codebook)(z).quantized


def _downstream(q):
    """A nonlinear stand-in for the decoder, so that where its gradient is taken matters."""
    weight = torch.linspace(-1.0, 1.0, q.shape[1] * q.shape[1]).view(q.shape[1], q.shape[1], 1, 1)
    return (F.conv2d(q, weight.to(q.dtype)).tanh() ** 2).sum()


def _with_gradients(fn, case, loss_of):
    """(fn's output, the gradient reaching z, the gradient reaching the codebook), zeros for no gradient."""
    z = case["z"].clone().requires_grad_(True)
    codebook = nn.Parameter(case["codebook"].clone())
    arguments = (z, codebook, case["beta"]) if "beta" in case else (z, codebook)
    out = fn(*arguments)
    if not torch.is_tensor(out):
        return out  # for the check to report
    loss = loss_of(out)
    if loss.requires_grad:
        loss.backward()
    zeros = torch.zeros_like
    return (out.detach(), z.grad if z.grad is not None else zeros(z),
            codebook.grad if codebook.grad is not None else zeros(codebook))


def _run_straight_through(fn, case):
    return _with_gradients(fn, case, _downstream)


def _straight_through_mistake(kind):
    def quantize(z, codebook):
        codes = codebook[_lookup_mistake("right")(z, codebook)].permute(0, 3, 1, 2)
        if kind == "codes":
            return codes
        if kind == "z":
            return z
        return codes + (z - z.detach())  # the value of e, z's gradient, and the codebook's too
    return quantize


STRAIGHT_THROUGH = Exercise(
    name="straight_through", notebook="12_vq_autoencoder",
    task="straight_through(z, codebook) -> z_q (B, c, h, w): the nearest code e_k at every position of z (use your "
         "nearest_code), written so that the gradient of whatever comes after reaches z unchanged and not the "
         "codebook. The checker backpropagates a nonlinear function of your z_q.",
    source=f"{SOURCE}, section 3.2: the gradient ∇_z L is copied from the decoder's input z_q to the encoder's "
           "output z_e; z_q = z_e + sg[e_k - z_e]",
    solution=straight_through, cases=_lookup_cases, reference=_minildm_straight_through, run=_run_straight_through,
    mistakes=(
        Mistake("the lookup alone (or z + (e - z) without .detach(), the same thing) gives the encoder no gradient: "
                "the argmin has none. Return z + (e - z).detach(): the value of e, the gradient of z",
                _straight_through_mistake("codes")),
        Mistake("the decoder must see the code e_k, not z_e itself: quantising is the point; z + (e - z).detach() "
                "has e's value", _straight_through_mistake("z")),
        Mistake("the decoder's gradient also reaches the codebook through e: detach the code's part, "
                "z + (e - z).detach(); in VQ-VAE only the codebook term of eq. (3) moves the codes",
                _straight_through_mistake("leaky")),
    ),
)


# ---- the VQ loss ------------------------------------------------------------------------------------------------


def vq_loss(z, codebook, beta):
    # BEGIN SOLUTION
    indices = nearest_code(z, codebook)  # (B, h, w)
    codes = codebook[indices].permute(0, 3, 1, 2)  # e_k (B, c, h, w)
    codebook_term = (z.detach() - codes).pow(2).mean()  # ||sg[z_e] - e||²: moves the codes towards z_e
    commitment_term = (z - codes.detach()).pow(2).mean()  # ||z_e - sg[e]||²: keeps the encoder near its codes
    return codebook_term + beta * commitment_term
    # END SOLUTION


def _minildm_vq_loss(z, codebook, beta):
    out = _minildm_quantizer(codebook)(z)
    return out.codebook_loss + beta * out.commitment_loss


def _run_vq_loss(fn, case):
    return _with_gradients(fn, case, lambda loss: loss)


def _loss_mistake(kind):
    def loss(z, codebook, beta):
        codes = codebook[_lookup_mistake("right")(z, codebook)].permute(0, 3, 1, 2)
        if kind == "no stop-gradient":
            return (1 + beta) * (z - codes).pow(2).mean()
        if kind == "beta swapped":
            return beta * (z.detach() - codes).pow(2).mean() + (z - codes.detach()).pow(2).mean()
        if kind == "sum":
            return (z.detach() - codes).pow(2).sum() + beta * (z - codes.detach()).pow(2).sum()
        return (z.detach() - codes).pow(2).mean() + (z - codes.detach()).pow(2).mean()  # no β
    return loss


VQ_LOSS = Exercise(
    name="vq_loss", notebook="12_vq_autoencoder",
    task="vq_loss(z, codebook, beta) -> a 0-d tensor: the codebook term plus beta times the commitment term of "
         "VQ-VAE's loss, each a mean over the elements of z (B, c, h, w), with the nearest codes of your "
         "nearest_code. The checker also compares the gradients that reach z and the codebook.",
    source=f"{SOURCE}, eq. (3): L = log p(x|z_q(x)) + ||sg[z_e(x)] - e||² + β ||z_e(x) - sg[e]||²",
    solution=vq_loss, cases=_cases, reference=_minildm_vq_loss, run=_run_vq_loss,
    mistakes=(
        Mistake("without the stop-gradients both terms pull both ways (the value is right, the gradients are not): "
                "the codebook term moves only the codes, ||sg[z] - e||², the commitment term only the encoder, "
                "β ||z - sg[e]||²", _loss_mistake("no stop-gradient")),
        Mistake("β weighs the commitment term ||z - sg[e]||², not the codebook term (taming-transformers' "
                "'legacy' loss, which diffusers keeps by default, has them the other way round)",
                _loss_mistake("beta swapped")),
        Mistake("each term is a mean over the elements (B c h w), not a sum: a sum's size would grow with the image",
                _loss_mistake("sum")),
        Mistake("the commitment term is weighted by β (0.25 in VQ-VAE): the codes should move towards the encoder "
                "faster than the encoder towards them", _loss_mistake("no beta")),
    ),
)

EXERCISES = [NEAREST_CODE, STRAIGHT_THROUGH, VQ_LOSS]  # in the notebook's order
