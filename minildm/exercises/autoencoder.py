"""Exercises of notebook 02, the autoencoder: the posterior q(z | x), its KL term, and the scaling factor.

Notation as in autoencoder.py: the encoder gives a mean μ and a log-variance log σ² per latent value (B, c, h, w);
σ = exp(½ log σ²). Each solution below is the code of the notebook's solution cell (between # BEGIN SOLUTION and
# END SOLUTION); each Mistake is a wrong answer students write, with the hint it earns.
"""

from __future__ import annotations

import torch

from ..autoencoder import DiagonalGaussianDistribution
from .core import Exercise, Mistake

SOURCE_LDM = "Rombach et al. 2022 (arXiv:2112.10752)"
SHAPE = (3, 4, 5, 2)  # (B, c, h, w): every size different, so a wrong axis shows


def _posterior(seed: int, shape=SHAPE):
    """μ, log σ² and ε (float64). log σ² spans about -4 .. 3, inside minildm's clamp to [-30, 20]."""
    g = torch.Generator().manual_seed(200 + seed)
    mean = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 - 0.5
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    return mean, logvar, noise


def _gaussian(mean, logvar):  # minildm's posterior, from the encoder's (B, 2c, h, w) output
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


# ---- sampling the posterior: the reparameterisation trick ---------------------------------------------------------


def reparameterize(mean, logvar, noise):
    # BEGIN SOLUTION
    std = torch.exp(0.5 * logvar)  # σ = exp(½ log σ²)
    return mean + std * noise  # z = μ + σ ε, ε ~ N(0, I): a sample that gradients can flow through
    # END SOLUTION


def _reparameterize_cases(seed):
    mean, logvar, noise = _posterior(seed)
    small_mean, small_logvar, small_noise = _posterior(10 + seed, (2, 3, 4, 1))
    return [{"mean": mean, "logvar": logvar, "noise": noise},
            {"mean": small_mean, "logvar": small_logvar, "noise": small_noise}]


REPARAMETERIZE = Exercise(
    name="reparameterize", notebook="02_autoencoder",
    task="reparameterize(mean, logvar, noise) -> z (B, c, h, w): a sample of q(z | x) = N(μ, σ²) made from the "
         "noise ε ~ N(0, I), with logvar = log σ².",
    source="Kingma & Welling 2014 (arXiv:1312.6114), section 2.4 (z = μ + σ ⊙ ε), as the LDM autoencoder samples its "
           f"posterior ({SOURCE_LDM}, section 3.1)",
    solution=reparameterize, cases=_reparameterize_cases,
    reference=lambda mean, logvar, noise: (lambda q: q.mean + q.std * noise)(_gaussian(mean, logvar)),
    mistakes=(
        Mistake("exp(logvar) is the variance σ², not the standard deviation: σ = exp(½ logvar)",
                lambda mean, logvar, noise: mean + torch.exp(logvar) * noise),
        Mistake("the noise is not scaled: z = μ + σ ε, with σ = exp(½ logvar)",
                lambda mean, logvar, noise: mean + noise),
        Mistake("logvar is log σ², not σ: the standard deviation is exp(½ logvar)",
                lambda mean, logvar, noise: mean + logvar * noise),
        Mistake("the sign of the exponent: σ = exp(+½ logvar); exp(-½ logvar) is 1 / σ",
                lambda mean, logvar, noise: mean + torch.exp(-0.5 * logvar) * noise),
    ),
)


# ---- the KL term -----------------------------------------------------------------------------------------------------


def kl_divergence(mean, logvar):
    # BEGIN SOLUTION
    per_value = mean**2 + torch.exp(logvar) - 1 - logvar  # μ² + σ² - 1 - log σ², (B, c, h, w)
    return 0.5 * per_value.sum(dim=(1, 2, 3))  # KL(N(μ, σ²) || N(0, I)) = ½ Σ_(c,h,w) (...): (B, c, h, w) -> (B,)
    # END SOLUTION


def _kl_cases(seed):
    mean, logvar, _ = _posterior(seed)
    small_mean, small_logvar, _ = _posterior(10 + seed, (2, 3, 4, 1))
    return [{"mean": mean, "logvar": logvar}, {"mean": small_mean, "logvar": small_logvar}]


KL_DIVERGENCE = Exercise(
    name="kl_divergence", notebook="02_autoencoder",
    task="kl_divergence(mean, logvar) -> KL (B,): KL(q(z | x) || N(0, I)) of each image's diagonal Gaussian, summed "
         "over its latent values (c, h, w).",
    source="Kingma & Welling 2014 (arXiv:1312.6114), appendix B: -KL = ½ Σ (1 + log σ² - μ² - σ²); the LDM "
           f"autoencoder's KL regulariser ({SOURCE_LDM}, section 3.1 and appendix G)",
    solution=kl_divergence, cases=_kl_cases,
    reference=lambda mean, logvar: _gaussian(mean, logvar).kl(),
    mistakes=(
        Mistake("the ½ is missing: KL = ½ Σ (μ² + σ² - 1 - log σ²)",
                lambda mean, logvar: (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))),
        Mistake("that is a mean over (c, h, w): the KL of independent values is their sum",
                lambda mean, logvar: 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean(dim=(1, 2, 3))),
        Mistake("the log-variance term's sign: it is - log σ² (the KL is 0 at μ = 0, σ = 1 and never negative)",
                lambda mean, logvar: 0.5 * (mean**2 + logvar.exp() - 1 + logvar).sum(dim=(1, 2, 3))),
        Mistake("summed over the batch too: return one KL per image, shape (B,)",
                lambda mean, logvar: 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum()),
        Mistake("σ² is exp(logvar), not logvar itself",
                lambda mean, logvar: 0.5 * (mean**2 + logvar - 1 - logvar).sum(dim=(1, 2, 3))),
    ),
)


# ---- the scaling factor ----------------------------------------------------------------------------------------------


def scale_latents(latents):
    # BEGIN SOLUTION
    scaling_factor = 1 / latents.std()  # s = 1 / std of all the latents (LDM sections 4.3.2, D.1; SD's: 0.18215)
    return scaling_factor * latents  # z · s has unit variance, the scale the noise schedule assumes
    # END SOLUTION


def _scale_cases(seed):
    g = torch.Generator().manual_seed(300 + seed)
    # Latents of an autoencoder: not centred, each channel with its own scale and offset. Many values, as when the
    # factor is estimated on a training batch: then dividing by N or N - 1 in the std changes it by under 1e-4.
    channel_std = torch.tensor([4.0, 6.5, 3.0, 5.0], dtype=torch.float64).view(1, 4, 1, 1)
    channel_mean = torch.tensor([0.8, -1.5, 0.3, 2.0], dtype=torch.float64).view(1, 4, 1, 1)
    latents = torch.randn((5, 4, 32, 30), generator=g, dtype=torch.float64) * channel_std + channel_mean
    narrow = torch.randn((6, 3, 40, 25), generator=g, dtype=torch.float64) * 0.2 + 0.1
    return [{"latents": latents}, {"latents": narrow}]


def _rms(latents):
    return latents.pow(2).mean().sqrt()


SCALE_LATENTS = Exercise(
    name="scale_latents", notebook="02_autoencoder",
    task="scale_latents(latents) -> z · s (B, c, h, w): the latents multiplied by the scaling factor s = 1 / std, "
         "one number for all of them, so that they have unit variance.",
    source=f"{SOURCE_LDM}, sections 4.3.2 and D.1: latents rescaled to unit standard deviation, z <- z / σ̂, with σ̂ "
           "the std of all the latent values of a training batch (the LDM code: 1 / z.flatten().std())",
    solution=scale_latents, cases=_scale_cases,  # AutoencoderKL.estimate_scaling_factor: the same s (own tests)
    mistakes=(
        Mistake("that multiplies by the std: the scaling factor is 1 / std, so that z · s has unit variance",
                lambda latents: latents * latents.std()),
        Mistake("that divides by the variance: the scaling factor is 1 / std, the square root of 1 / variance",
                lambda latents: latents / latents.var()),
        Mistake("one std per channel: the scaling factor is a single number, 1 / std of every latent value",
                lambda latents: latents / latents.std(dim=(0, 2, 3), keepdim=True)),
        Mistake("that is 1 / root-mean-square: the std subtracts the mean first, and latents are not centred",
                lambda latents: latents / _rms(latents)),
    ),
)


EXERCISES = [REPARAMETERIZE, KL_DIVERGENCE, SCALE_LATENTS]
