"""VQModel: the LDM paper's vector-quantised first stage (Rombach et al. 2022, section 3.1 and appendix G).

The paper regularises its autoencoder's latent space in one of two ways: a small KL term (AutoencoderKL,
autoencoder.py) or "a vector quantization layer within the decoder. This model can be interpreted as a
VQGAN but with the quantization layer absorbed by the decoder" (section 3.1). The encoder and decoder are
AutoencoderKL's; between them sits a codebook of K vectors e_1 .. e_K of c numbers each, and every latent
position is replaced by its nearest code. Absorbed into the decoder means: `encode` returns the latents
*before* quantisation, z_e = E(x), the diffusion model is trained on (and samples) those, and `decode`
quantises and then decodes. A sample that lands between codes is snapped to one by the decoder.

VQ-VAE (van den Oord et al. 2017, arXiv:1711.00937), eqs. (1)-(3):

    k = argmin_j ||z_e - e_j||²,   z_q = e_k                                   (eqs. 1-2, at each position)
    L = log p(x | z_q)  +  ||sg[z_e] - e_k||²  +  β ||z_e - sg[e_k]||²         (eq. 3)

sg is the stop-gradient: the codebook term moves the codes towards the encoder's outputs, the commitment
term (weight β, 0.25 in VQ-VAE) keeps the encoder close to its codes. The argmin has no gradient; the
straight-through estimator (section 3.2) passes the decoder's gradient at z_q on to z_e unchanged:
z_q = z_e + sg[e_k - z_e] (forward: e_k; backward: the identity). As in autoencoder.py, log p(x | z_q)
is an L1 + L2 reconstruction error, and every term is a mean per element.

EMA codebook (VQ-VAE appendix A.1, eqs. (6)-(8); Razavi et al. 2019): instead of the codebook term, each
code follows the running mean of the encoder outputs assigned to it,

    N_i <- γ N_i + (1 - γ) n_i,    m_i <- γ m_i + (1 - γ) Σ_{j: k_j = i} z_e,j,    e_i = m_i / N_i

with n_i this batch's count of code i and N_i Laplace-smoothed, (N_i + ε) / (n + K ε) · n with n = Σ N_i
(as Sonnet's VectorQuantizerEMA), so a code nobody picks never divides by zero. N_i starts at 1 and m_i at
e_i, so e_i = m_i / N_i holds from the first step.

Dead codes: a code that no encoder output picks gets neither a gradient nor an EMA update, so it stays
unused; on small data most of a codebook can die this way. `restart_dead_codes` replaces every code unused
for `dead_code_steps` training steps by an encoder output drawn at random from the current batch (the
"random restarts" of Dhariwal et al. 2020, Jukebox). Under torchrun the counts and sums are added over
the processes before they are used, and restarts draw from the whole batch's encoder outputs, so every copy
keeps the same codebook, the one a single process would.
The EMA statistics and the usage counters are buffers: they are saved with the weights, and so with the
training state (training_state.py), and a resumed run continues bit for bit.

Codebook usage: perplexity exp(H(p)) with p_i = n_i / Σ n the share of the batch's positions given code i
(K when all are used alike, 1 when one code takes all), and the number of dead codes.

Notation: c latent channels = the codes' width, K = num_vq_embeddings, f downsampling factor. Names follow
diffusers' VQModel (quant_conv, quantize.embedding, post_quant_conv, decode(force_not_quantize=...)).
Depends on autoencoder.py (Encoder, Decoder), pixel_space.py (PointMass), distributed.py and checkpoint.py.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .autoencoder import AutoencoderConfig, Decoder, Encoder
from .checkpoint import load_module, save_module
from .checks import check_generator, check_images, check_like_weights
from .pixel_space import PointMass


@dataclass
class VQModelConfig(AutoencoderConfig):
    """AutoencoderConfig's encoder and decoder, and the codebook. Raises ValueError for a setting out of range."""

    num_vq_embeddings: int = 256  # K, the number of codes (diffusers' name)
    beta: float = 0.25  # β, the commitment term's weight (VQ-VAE eq. 3)
    codebook_ema_decay: float = 0.0  # γ of the EMA codebook (e.g. 0.99); 0: the codebook term trains it
    dead_code_steps: int = 100  # a code no position picked for this many training steps counts as dead ...
    restart_dead_codes: bool = False  # ... and is replaced by a random encoder output of the batch when True

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_vq_embeddings", "dead_code_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.beta, numbers.Real) or isinstance(self.beta, bool) or not 0 <= self.beta < math.inf:
            raise ValueError(f"beta (the commitment weight) must be a finite number >= 0, got {self.beta!r}")
        decay = self.codebook_ema_decay
        if not isinstance(decay, numbers.Real) or isinstance(decay, bool) or not 0 <= decay < 1:
            raise ValueError(f"codebook_ema_decay must be in [0, 1) (0 = the codebook learns by its loss term), "
                             f"got {decay!r}")
        if not isinstance(self.restart_dead_codes, bool):
            raise ValueError(f"restart_dead_codes must be True or False, got {self.restart_dead_codes!r}")

    @classmethod
    def for_factor(cls, f: int, in_channels: int = 3, latent_channels: int = 4, width: int = 32,
                   norm_num_groups: int = 16, layers_per_block: int = 1, **codebook) -> VQModelConfig:
        """AutoencoderConfig.for_factor's encoder and decoder; `codebook` sets the fields above by keyword."""
        base = super().for_factor(f, in_channels, latent_channels, width, norm_num_groups, layers_per_block)
        return replace(base, **codebook)


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(H(p)) = exp(-Σ p_i log p_i) with p_i = counts_i / Σ counts (0 log 0 = 0): a 0-d tensor in [1, K].
    counts (K,): how many positions picked each code. Raises ValueError if no position was counted."""
    total = counts.sum()
    if not total > 0:
        raise ValueError("counts must hold at least one assignment to measure the perplexity")
    p = counts.double() / total
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum()
    return entropy.exp().to(counts.dtype if counts.is_floating_point() else torch.float32)


@dataclass
class VectorQuantizerOutput:
    quantized: torch.Tensor  # (B, c, h, w): z_q = z_e + sg[e_k - z_e], e_k forward and z_e's gradient backward
    indices: torch.Tensor  # (B, h, w) int64: k at each position
    codebook_loss: torch.Tensor  # 0-d: mean of (sg[z_e] - e_k)², the codebook's term of eq. (3)
    commitment_loss: torch.Tensor  # 0-d: mean of (z_e - sg[e_k])², times β in eq. (3)


class VectorQuantizer(nn.Module):
    """The codebook (K, c) and the nearest-code lookup. forward() only looks up; update() (training) counts the
    codes used and, as configured, moves an EMA codebook and restarts dead codes."""

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25, ema_decay: float = 0.0,
                 dead_code_steps: int = 100, restart_dead_codes: bool = False, epsilon: float = 1e-5):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.beta = num_embeddings, embedding_dim, beta
        self.ema_decay, self.epsilon = ema_decay, epsilon
        self.dead_code_steps, self.restart_dead_codes = dead_code_steps, restart_dead_codes
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)  # the codebook e, (K, c)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)  # as taming / diffusers
        if ema_decay > 0:
            # An EMA codebook is moved by update(), never by the optimizer: its weight is state (a buffer) under
            # the same name, so a training loop that unfreezes every parameter leaves it alone.
            weight = self.embedding.weight.detach().clone()
            del self.embedding.weight
            self.embedding.register_buffer("weight", weight)
            self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))  # N_i
            self.register_buffer("ema_embed_sum", weight.clone())  # m_i, (K, c)
        self.register_buffer("steps_unused", torch.zeros(num_embeddings, dtype=torch.long))  # per code
        self.restarted = 0  # how many codes the last update() restarted (for the training log)

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0

    def nearest_code(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (M, c) -> the index (M,) of the nearest code in squared Euclidean distance (VQ-VAE eq. 1)."""
        with torch.no_grad():
            z, e = flat.float(), self.embedding.weight.float()
            # ||z - e||² = ||z||² - 2 z·e + ||e||², without the (M, K, c) tensor of differences
            distances = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.T + e.pow(2).sum(1)  # (M, K)
            return distances.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> VectorQuantizerOutput:
        """z (B, c, h, w), the encoder's output z_e -> VectorQuantizerOutput (eqs. 1-3 and the straight-through
        estimator)."""
        B, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B, c, h, w) -> (B h w, c)
        indices = self.nearest_code(flat)  # (B h w,)
        codes = self.embedding(indices).view(B, h, w, c).permute(0, 3, 1, 2).to(z.dtype)  # -> e_k (B, c, h, w)
        codebook_loss = (z.detach() - codes).pow(2).mean()  # ||sg[z_e] - e||²: only the codes move
        commitment_loss = (z - codes.detach()).pow(2).mean()  # ||z_e - sg[e]||²: only the encoder moves
        quantized = z + (codes - z).detach()  # straight through: the value of e_k, the gradient of z_e
        return VectorQuantizerOutput(quantized, indices.view(B, h, w), codebook_loss, commitment_loss)

    @torch.no_grad()
    def update(self, z: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """After a training step's lookup: z (B, c, h, w) and its indices (B, h, w). Counts each code's use over
        all processes, moves an EMA codebook (eqs. 6-8), ages and (if configured) restarts dead codes with
        encoder outputs of this batch drawn with `generator`. Returns the counts (K,), float32, over all
        processes."""
        K = self.num_embeddings
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (M, c)
        one_hot = F.one_hot(indices.reshape(-1), K).float()  # (M, K)
        world_size = distributed.world()[1]
        stats = one_hot.sum(0)  # n_i (K,)
        if self.uses_ema:
            stats = torch.cat([stats[:, None], one_hot.T @ flat], dim=1)  # (K, 1 + c): n_i and Σ_{j: k_j = i} z_e,j
        stats = distributed.average(stats) * world_size  # summed over the processes: the whole batch's
        counts = stats[:, 0] if self.uses_ema else stats  # (K,)
        if self.uses_ema:
            gamma = self.ema_decay
            self.ema_cluster_size.mul_(gamma).add_((1 - gamma) * counts.to(self.ema_cluster_size.dtype))  # eq. 6
            self.ema_embed_sum.mul_(gamma).add_((1 - gamma) * stats[:, 1:].to(self.ema_embed_sum.dtype))  # eq. 7
            n = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + self.epsilon) / (n + K * self.epsilon) * n  # Laplace smoothing
            self.embedding.weight.copy_(self.ema_embed_sum / smoothed[:, None])  # eq. 8: e_i = m_i / N_i
        self.steps_unused.copy_(torch.where(counts > 0, torch.zeros_like(self.steps_unused), self.steps_unused + 1))
        dead = self.steps_unused >= self.dead_code_steps
        self.restarted = 0
        if self.restart_dead_codes and bool(dead.any()):
            # Every rank has the same `dead` (the counts are summed), the whole batch's encoder outputs, and draws
            # the same numbers: the same new codes on every process, and the same as one process would choose.
            whole = distributed.gather(flat)  # (M · world size, c)
            pick = torch.randint(0, len(whole), (int(dead.sum()),), generator=generator)
            new = whole[pick.to(whole.device)]  # (n_dead, c)
            self.embedding.weight[dead] = new.to(self.embedding.weight.dtype)
            if self.uses_ema:
                self.ema_cluster_size[dead] = 1.0
                self.ema_embed_sum[dead] = new.to(self.ema_embed_sum.dtype)
            self.steps_unused[dead] = 0
            self.restarted = int(dead.sum())
        return counts

    def dead_codes(self) -> int:
        """How many codes no position picked in the last dead_code_steps training steps."""
        return int((self.steps_unused >= self.dead_code_steps).sum())

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, beta={self.beta}, "
                f"ema_decay={self.ema_decay}, restart_dead_codes={self.restart_dead_codes}")


class VQModel(nn.Module):
    """A first stage (interfaces.FirstStage) with a vector-quantised latent space: images (B, C, H, W) in [-1, 1]
    <-> pre-quantisation latents (B, c, H/f, W/f); `decode` quantises them first (LDM section 3.1)."""

    def __init__(self, config: VQModelConfig | None = None):
        super().__init__()
        self.config = config if config is not None else VQModelConfig()
        c = self.config
        if not isinstance(c, VQModelConfig):
            raise TypeError(f"config must be a VQModelConfig, got {type(c).__name__}")
        self.encoder = Encoder(c, double_z=False)  # one value per latent: the encoder is deterministic
        self.quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)
        self.quantize = VectorQuantizer(c.num_vq_embeddings, c.latent_channels, c.beta, c.codebook_ema_decay,
                                        c.dead_code_steps, c.restart_dead_codes)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)
        self.decoder = Decoder(c)

    # The first-stage slot (interfaces.FirstStage), as AutoencoderKL fills it.
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def config_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_config_dict(cls, config: dict) -> VQModel:
        return cls(VQModelConfig(**config))

    def encode(self, x: torch.Tensor) -> PointMass:
        """x (B, C, H, W) in [-1, 1] -> a point mass (std zeros) at the pre-quantisation latents z_e
        (B, c, H/f, W/f), unscaled. Raises TypeError for a non-tensor or a dtype unlike the weights', ValueError
        for a wrong shape, H or W not a multiple of f, or another device."""
        c = self.config
        check_images(x, "x", c.in_channels, c.downsampling_factor)
        check_like_weights(x, "x", self.quant_conv.weight, "images")
        return PointMass(self.quant_conv(self.encoder(x)))

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Unscaled latents (B, c, h, w) -> images (B, C, h*f, w*f), roughly in [-1, 1] (not clamped): each position
        snapped to its nearest code first, unless force_not_quantize (diffusers' name) decodes them as they are."""
        check_images(latents, "latents", self.config.latent_channels, what="latents")
        check_like_weights(latents, "latents", self.quant_conv.weight, "latents")
        quantized = latents if force_not_quantize else self.quantize(latents).quantized
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction D(q(E(x))) of images x (B, C, H, W)."""
        return self.decode(self.encode(x).mean)

    def training_loss(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Eq. (3) of VQ-VAE with autoencoder.py's L1 + L2 reconstruction: L1 + L2 + codebook + β · commitment,
        each a mean per element (the codebook term left out for an EMA codebook, which update() moves instead).
        Then, in training mode, the codebook's update (VectorQuantizer.update, restarts drawn from `generator`).

        x (B, C, H, W) in [-1, 1]. Returns (loss, reconstruction, parts) with parts "reconstruction" (the L1
        term alone, comparable with AutoencoderKL's), "codebook", "commitment", "perplexity" (of this batch's
        codes, all processes together), "dead_codes" (after this step's restarts) and, with restart_dead_codes,
        "restarted_codes" (this step's), each a 0-d tensor."""
        check_generator(generator)
        z = self.encode(x).mean  # z_e (B, c, h, w)
        out = self.quantize(z)
        reconstruction = self.decoder(self.post_quant_conv(out.quantized))
        error = x - reconstruction
        l1 = error.abs().mean()
        loss = l1 + error.pow(2).mean() + self.config.beta * out.commitment_loss
        if not self.quantize.uses_ema:
            loss = loss + out.codebook_loss
        if self.training:
            counts = self.quantize.update(z, out.indices, generator)
        else:
            counts = F.one_hot(out.indices.reshape(-1), self.config.num_vq_embeddings).sum(0).float()
        parts = {"reconstruction": l1.detach(), "codebook": out.codebook_loss.detach(),
                 "commitment": out.commitment_loss.detach(), "perplexity": codebook_perplexity(counts),
                 "dead_codes": torch.tensor(float(self.quantize.dead_codes()), device=l1.device)}
        if self.config.restart_dead_codes:
            parts["restarted_codes"] = torch.tensor(float(self.quantize.restarted if self.training else 0),
                                                    device=l1.device)
        return loss, reconstruction, parts

    @torch.no_grad()
    def estimate_scaling_factor(self, images: torch.Tensor, batch_size: int = 256,
                                generator: torch.Generator | None = None) -> float:
        """1 / std of the pre-quantisation latents over `images` (LDM sections 4.3.2 and D.1: the diffusion model
        works on them); sets config.scaling_factor and returns it. `generator` is unused (the encoder is
        deterministic), taken for AutoencoderKL's signature."""
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        latents = torch.cat([self.encode(batch).mean for batch in batches])  # (N, c, h, w)
        self.config.scaling_factor = float(1.0 / latents.flatten().float().std())
        return self.config.scaling_factor

    def save(self, directory: str | os.PathLike) -> None:
        """vq_model.safetensors (weights, codebook and its EMA state and usage counters) + vq_model.json."""
        save_module(self, self.config, directory, "vq_model")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> VQModel:
        return load_module(cls, VQModelConfig, directory, "vq_model")
