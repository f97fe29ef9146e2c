"""Exercises of notebook 05, DDPM on pixels: the posterior q(x_{t-1} | x_t, x_0) and the ancestral step
(Algorithm 2), the training loss with caption dropout (Algorithm 1, LDM eq. (3)), one training step with an
EMA of the weights.

Notation as in samplers/ddpm.py: ᾱ_t = alphas_cumprod[t], t = 0 .. T-1, ᾱ_{-1} = 1, β_t = 1 - ᾱ_t / ᾱ_{t-1}.
Each solution below is the code of the notebook's solution cell (between # BEGIN SOLUTION and # END SOLUTION);
each Mistake is a wrong answer students write, with the hint it earns. minildm's own code is the reference:
DDPMSampler (its variance and step, on every training timestep), LatentDiffusion.diffusion_loss of a tiny
pixel-space model, EMAModel.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from ..ema import EMAModel
from ..ldm import LatentDiffusion
from ..samplers import DDPMSampler
from ..schedule import NoiseSchedule
from ..text import TextEncoder
from ..unet import UNet2DConditionModel, UNetConfig
from .core import Calls, Exercise, Mistake, stack_calls

T = 1000
SCHEDULES = {"scaled_linear": NoiseSchedule(),  # Stable Diffusion's, the notebooks' schedule
             "linear": NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)}  # the DDPM paper's
SOURCE_HO = "Ho et al. 2020 (arXiv:2006.11239)"


def _samples(seed: int, count: int = 2, shape=(3, 2, 5, 4), dtype=torch.float64):
    """`count` standard normal tensors of `shape`, whose sizes all differ (B, C, H, W)."""
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]


def _middle_timesteps(seed: int, count: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, T - 1, (count,), generator=g).tolist()


@functools.cache
def _ddpm_sampler(schedule_name: str, prediction_type: str) -> DDPMSampler:
    """minildm's DDPM on every training timestep, T - 1 down to 0 (set_timesteps(T))."""
    sampler = DDPMSampler(SCHEDULES[schedule_name], prediction_type=prediction_type)
    sampler.set_timesteps(T)
    return sampler


def _schedule_name(alphas_cumprod) -> str:
    """Which of SCHEDULES the cases' alphas_cumprod is (the cases pass the schedules' own tensors)."""
    return next(name for name, schedule in SCHEDULES.items() if torch.equal(schedule.alphas_cumprod, alphas_cumprod))


def _sampler_step_with(noise, sampler: DDPMSampler, model_output, t: int, x_t):
    """DDPMSampler.step with the noise z it draws replaced by `noise`: the step draws z from a generator seeded
    0, so the same z is drawn again here and swapped (at t = 0 the variance is 0 and nothing is drawn)."""
    x_prev = sampler.step(model_output, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0), dtype=x_t.dtype)
    return x_prev + sampler.variance(t) ** 0.5 * (noise - z)


# ---- the posterior q(x_{t-1} | x_t, x_0) ---------------------------------------------------------------------------


def ddpm_posterior(x0, x_t, t, alphas_cumprod):
    # BEGIN SOLUTION
    alpha_bar_t = alphas_cumprod[t]  # ᾱ_t
    alpha_bar_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones_like(alpha_bar_t)  # ᾱ_{t-1}, ᾱ_{-1} = 1
    beta_t = 1 - alpha_bar_t / alpha_bar_prev  # β_t, since ᾱ_t = ᾱ_{t-1} (1 - β_t)
    mean = (alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t) * x0
            + (1 - beta_t).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t)  # μ̃_t, eq. (7)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t  # β̃_t, eq. (7)
    return mean, variance
    # END SOLUTION


def _posterior_cases(seed):
    x0, x_t = _samples(seed)
    middle = _middle_timesteps(seed, 2)
    # t = 0 first: several mistakes show only there (ᾱ_{-1} = 1)
    settings = [(0, "scaled_linear"), (T - 1, "linear"), (1, "scaled_linear"), (middle[0], "linear"),
                (middle[1], "scaled_linear"), (T - 1, "scaled_linear")]
    return [{"x0": x0, "x_t": x_t, "t": t, "alphas_cumprod": SCHEDULES[name].alphas_cumprod} for t, name in settings]


def _sampler_posterior(x0, x_t, t, alphas_cumprod):
    """DDPMSampler's: the mean its step computes (for a model that predicts x_0 itself) and its variance(t)."""
    sampler = _ddpm_sampler(_schedule_name(alphas_cumprod), "sample")
    mean = _sampler_step_with(torch.zeros_like(x_t), sampler, x0, t, x_t)  # the step without its noise
    return mean, sampler.variance(t)


def _posterior_mistake(variance="beta_tilde", swap=False, sqrt_alpha=True, x0_alpha_bar="prev", wrap=False):
    def posterior(x0, x_t, t, alphas_cumprod):
        alpha_bar_t = alphas_cumprod[t]
        alpha_bar_prev = alphas_cumprod[t - 1] if (t > 0 or wrap) else torch.ones_like(alpha_bar_t)
        beta_t = 1 - alpha_bar_t / alpha_bar_prev
        x0_coeff = (alpha_bar_prev if x0_alpha_bar == "prev" else alpha_bar_t).sqrt() * beta_t / (1 - alpha_bar_t)
        x_t_coeff = ((1 - beta_t).sqrt() if sqrt_alpha else 1) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        if swap:
            x0_coeff, x_t_coeff = x_t_coeff, x0_coeff
        beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
        return x0_coeff * x0 + x_t_coeff * x_t, beta_tilde if variance == "beta_tilde" else beta_t
    return posterior


DDPM_POSTERIOR = Exercise(
    name="ddpm_posterior", notebook="05_pixel_diffusion",
    task="ddpm_posterior(x0, x_t, t, alphas_cumprod) -> (mean μ̃_t (B, C, H, W), variance β̃_t): the forward "
         "process's posterior q(x_{t-1} | x_t, x_0) for one timestep t (an int, 0 .. T-1) of the full chain, "
         "with ᾱ_{-1} = 1 and β_t = 1 - ᾱ_t / ᾱ_{t-1}.",
    source=f"{SOURCE_HO}, eqs. (6) and (7): q(x_(t-1) | x_t, x_0) = N(μ̃_t, β̃_t I), μ̃_t = sqrt(ᾱ_(t-1)) β_t / "
           "(1 - ᾱ_t) · x_0 + sqrt(α_t) (1 - ᾱ_(t-1)) / (1 - ᾱ_t) · x_t, β̃_t = (1 - ᾱ_(t-1)) / (1 - ᾱ_t) · β_t",
    solution=ddpm_posterior, cases=_posterior_cases, reference=_sampler_posterior,
    mistakes=(
        Mistake("the variance of the wrong step: that is β_t, the forward step's variance; the posterior's is "
                "β̃_t = (1 - ᾱ_(t-1)) / (1 - ᾱ_t) · β_t (0 at t = 0)", _posterior_mistake(variance="beta")),
        Mistake("the two coefficients of the mean are swapped: x_0 gets sqrt(ᾱ_(t-1)) β_t / (1 - ᾱ_t), x_t gets "
                "sqrt(α_t) (1 - ᾱ_(t-1)) / (1 - ᾱ_t)", _posterior_mistake(swap=True)),
        Mistake("x_t's coefficient lacks sqrt(α_t) = sqrt(1 - β_t): it is sqrt(α_t) (1 - ᾱ_(t-1)) / (1 - ᾱ_t)",
                _posterior_mistake(sqrt_alpha=False)),
        Mistake("x_0's coefficient takes sqrt(ᾱ_(t-1)), the signal left one step earlier, not sqrt(ᾱ_t)",
                _posterior_mistake(x0_alpha_bar="t")),
        Mistake("at t = 0, alphas_cumprod[t - 1] is alphas_cumprod[-1], the LAST ᾱ (Python's negative index): "
                "ᾱ_(-1) must be 1, nothing noised yet", _posterior_mistake(wrap=True)),
    ),
)


# ---- one ancestral step: Algorithm 2 ----------------------------------------------------------------------------


def ddpm_step(eps, t, x_t, noise, alphas_cumprod):
    # BEGIN SOLUTION
    alpha_bar_t = alphas_cumprod[t]  # ᾱ_t
    x0_hat = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # eq. (4) solved for x_0
    mean, variance = ddpm_posterior(x0_hat, x_t, t, alphas_cumprod)  # μ̃_t(x_t, x̂_0) and β̃_t, eq. (7)
    if t == 0:
        return mean  # Algorithm 2: z = 0 at the last step
    return mean + variance**0.5 * noise  # x_{t-1} = μ̃_t + σ_t z, σ_t² = β̃_t
    # END SOLUTION


def _step_cases(seed):
    eps, x_t, noise = _samples(seed, 3)
    middle = _middle_timesteps(seed + 10, 2)
    # t = 0 first: noise added there shows only at t = 0
    settings = [(0, "scaled_linear"), (1, "linear"), (middle[0], "scaled_linear"), (T - 1, "scaled_linear"),
                (middle[1], "linear")]
    return [{"eps": eps, "t": t, "x_t": x_t, "noise": noise, "alphas_cumprod": SCHEDULES[name].alphas_cumprod}
            for t, name in settings]


def _sampler_step(eps, t, x_t, noise, alphas_cumprod):
    """DDPMSampler.step (ε-prediction, all T timesteps), with `noise` as its z."""
    return _sampler_step_with(noise, _ddpm_sampler(_schedule_name(alphas_cumprod), "epsilon"), eps, t, x_t)


def _step_mistake(sigma="beta_tilde", noise_at_0=False, x0_alpha_bar="t", algorithm_2_sqrt=True, variance=False):
    def step(eps, t, x_t, noise, alphas_cumprod):
        alpha_bar_t = alphas_cumprod[t]
        alpha_bar_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones_like(alpha_bar_t)
        beta_t = 1 - alpha_bar_t / alpha_bar_prev
        if algorithm_2_sqrt:
            used = alpha_bar_t if x0_alpha_bar == "t" else alpha_bar_prev
            x0_hat = (x_t - (1 - used).sqrt() * eps) / used.sqrt()
            mean, beta_tilde = ddpm_posterior(x0_hat, x_t, t, alphas_cumprod)
        else:  # Algorithm 2's mean, with β_t / (1 - ᾱ_t) for β_t / sqrt(1 - ᾱ_t)
            mean = (x_t - beta_t / (1 - alpha_bar_t) * eps) / (1 - beta_t).sqrt()
            beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
        if t == 0 and not noise_at_0:
            return mean
        chosen = beta_tilde if sigma == "beta_tilde" else beta_t
        return mean + (chosen if variance else chosen.sqrt()) * noise
    return step


DDPM_STEP = Exercise(
    name="ddpm_step", notebook="05_pixel_diffusion",
    task="ddpm_step(eps, t, x_t, noise, alphas_cumprod) -> x_{t-1} (B, C, H, W): one step of ancestral sampling "
         "from timestep t (an int) with the network's ε: x̂_0 from ε, then μ̃_t(x_t, x̂_0) + sqrt(β̃_t) · noise, "
         "and no noise at t = 0. (Use your ddpm_posterior.)",
    source=f"{SOURCE_HO}, Algorithm 2 with σ_t² = β̃_t (section 3.2), the mean of eq. (7) at x̂_0 = (x_t - "
           "sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t), which is eq. (11)",
    solution=ddpm_step, cases=_step_cases, reference=_sampler_step,
    mistakes=(
        Mistake("σ_t = sqrt(β_t) is the DDPM paper's other choice (section 3.2: both work about as well); "
                "minildm's DDPMSampler uses σ_t² = β̃_t = (1 - ᾱ_(t-1)) / (1 - ᾱ_t) · β_t, the posterior variance",
                _step_mistake(sigma="beta")),
        Mistake("noise is added at t = 0: the last step returns the mean, z = 0 (Algorithm 2); with σ_t² = β̃_t, "
                "which is 0 at t = 0, that happens by itself, but sqrt(β_0) is not 0",
                _step_mistake(sigma="beta", noise_at_0=True)),
        Mistake("x̂_0 from ε takes ᾱ_t, the noise level of x_t: x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t), "
                "not ᾱ_(t-1)", _step_mistake(x0_alpha_bar="prev")),
        Mistake("Algorithm 2's mean divides by sqrt(1 - ᾱ_t): (x_t - β_t / sqrt(1 - ᾱ_t) · ε) / sqrt(α_t)",
                _step_mistake(algorithm_2_sqrt=False)),
        Mistake("the noise is scaled by the variance β̃_t: z ~ N(0, I) times the standard deviation, sqrt(β̃_t)",
                _step_mistake(variance=True)),
    ),
)


# ---- the training loss with caption dropout: Algorithm 1 ----------------------------------------------------------

CAPTIONS = ("a handwritten digit zero", "a handwritten digit one", "a handwritten digit seven",
            "a handwritten digit four")


@functools.cache
def tiny_pixel_model() -> LatentDiffusion:
    """A pixel-space LatentDiffusion (first_stage None: z_0 = x_0) small enough for a check: a two-level UNet on
    2-channel images and a one-layer text encoder, float32 like the notebook's model."""
    with torch.random.fork_rng(devices=[]):  # a check must not change the notebook's random numbers
        torch.manual_seed(0)
        text_encoder = TextEncoder.from_captions(list(CAPTIONS), hidden_size=12, num_layers=1, num_heads=2)
        unet = UNet2DConditionModel(UNetConfig(in_channels=2, out_channels=2, block_out_channels=(8, 8),
                                               attention_levels=(False, True), cross_attention_dim=12,
                                               attention_head_dim=4, norm_num_groups=4))
    return LatentDiffusion(None, unet, NoiseSchedule(), text_encoder, image_size=8).eval()


def diffusion_loss(backbone, encode_text, x0, captions, timesteps, noise, dropped, alphas_cumprod):
    # BEGIN SOLUTION
    captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]  # "": no condition
    alpha_bar = alphas_cumprod[timesteps].to(x0.dtype).view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1): ᾱ_t per sample
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise  # q(x_t | x_0), Ho eq. (4)
    eps_pred = backbone(x_t, timesteps, encode_text(captions))  # ε_θ(x_t, t, τ_θ(y))
    return ((noise - eps_pred) ** 2).mean()  # LDM eq. (3): ||ε - ε_θ(x_t, t, τ_θ(y))||², averaged
    # END SOLUTION


def _loss_cases(seed):
    model = tiny_pixel_model()
    g = torch.Generator().manual_seed(200 + seed)
    B = 3
    x0 = torch.rand(B, 2, 8, 6, generator=g) * 2 - 1  # pixels in [-1, 1]
    captions = [CAPTIONS[i] for i in torch.randperm(len(CAPTIONS), generator=g)[:B].tolist()]
    calls = []
    for timesteps in ([0, 400 + 37 * seed, T - 1], torch.randint(1, T - 1, (B,), generator=g).tolist()):
        dropped = torch.tensor([True, False, seed == 1])  # at least one caption dropped, at least one kept
        calls.append({"backbone": model.backbone, "encode_text": model.conditioner.encode, "x0": x0,
                      "captions": captions, "timesteps": torch.tensor(timesteps),
                      "noise": torch.randn(x0.shape, generator=g), "dropped": dropped,
                      "alphas_cumprod": model.schedule.alphas_cumprod})
    return [{"calls": Calls(calls, "2 draws of (t, noise, dropped)")}]


def _ldm_loss(backbone, encode_text, x0, captions, timesteps, noise, dropped, alphas_cumprod):
    """LatentDiffusion.diffusion_loss of the tiny pixel model (the cases' backbone and text encoder are its own)."""
    model = tiny_pixel_model()
    assert backbone is model.backbone and torch.equal(alphas_cumprod, model.schedule.alphas_cumprod)
    return model.diffusion_loss(x0, list(captions), timesteps, noise, dropped)


def _loss_mistake(dropout=True, target="noise", offset=0, reduce="mean"):
    def loss(backbone, encode_text, x0, captions, timesteps, noise, dropped, alphas_cumprod):
        used = ["" if drop and dropout else caption for caption, drop in zip(captions, dropped.tolist())]
        alpha_bar = alphas_cumprod[timesteps - offset].to(x0.dtype).view(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        error = ((noise if target == "noise" else x0) - backbone(x_t, timesteps, encode_text(used))) ** 2
        return error.mean() if reduce == "mean" else error.sum()
    return loss


def _no_grad_stack_calls(fn, case):
    with torch.no_grad():
        return stack_calls(fn, case)


DIFFUSION_LOSS = Exercise(
    name="diffusion_loss", notebook="05_pixel_diffusion",
    task="diffusion_loss(backbone, encode_text, x0, captions, timesteps, noise, dropped, alphas_cumprod) -> the "
         "scalar loss: the captions where dropped (B,) is True replaced by \"\" (caption dropout), x_t from x0 "
         "(B, C, H, W) float32 and noise at one timestep per sample (B,), then the mean squared error between "
         "noise and backbone(x_t, timesteps, encode_text(captions)). (Cast ᾱ_t to x0's dtype.) The check runs "
         "it on two draws of (timesteps, noise, dropped).",
    source="Rombach et al. 2022 (arXiv:2112.10752), eq. (3), with Ho et al. 2020 (arXiv:2006.11239), "
           "Algorithm 1; caption dropout as in Ho & Salimans 2022 (arXiv:2207.12598), Algorithm 1",
    solution=diffusion_loss, cases=_loss_cases, reference=_ldm_loss, run=_no_grad_stack_calls,
    mistakes=(
        Mistake("the caption dropout is not applied: where dropped is True the caption must be \"\", the null "
                "condition, so that the model also learns the unconditional ε for guidance",
                _loss_mistake(dropout=False)),
        Mistake("the target is x_0: an ε-prediction model regresses the noise, ||ε - ε_θ(x_t, t, τ_θ(y))||²",
                _loss_mistake(target="x0")),
        Mistake("t is off by one in the noising: x_t takes alphas_cumprod[t], the ᾱ after step t (at t = 0, "
                "alphas_cumprod[t - 1] even wraps around to the last one)", _loss_mistake(offset=1)),
        Mistake("the squared errors are summed: the loss is their mean over every element (F.mse_loss's "
                "default)", _loss_mistake(reduce="sum")),
    ),
)


# ---- one training step, with an EMA of the weights ------------------------------------------------------------


def training_step(backbone, optimizer, shadow, x_t, timesteps, text_states, noise, decay):
    # BEGIN SOLUTION
    optimizer.zero_grad()  # else the gradients of the previous step add up with this one's
    loss = ((noise - backbone(x_t, timesteps, text_states)) ** 2).mean()  # ||ε - ε_θ(x_t, t, τ_θ(y))||²
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # θ_ema <- d θ_ema + (1 - d) θ, with the weights after this step
        return [decay * average + (1 - decay) * weight for average, weight in zip(shadow, backbone.parameters())]
    # END SOLUTION


EMA_UNET_CONFIG = UNetConfig(in_channels=2, out_channels=2, block_out_channels=(8, 8), attention_levels=(False, True),
                             cross_attention_dim=6, attention_head_dim=4, norm_num_groups=4)


def _training_cases(seed):
    g = torch.Generator().manual_seed(300 + seed)
    with torch.random.fork_rng(devices=[]):  # a check must not change the notebook's random numbers
        torch.manual_seed(seed)
        backbone = UNet2DConditionModel(EMA_UNET_CONFIG).double()  # float64, as far as the piece allows
    decay = (2 / 11, 0.1)[seed]  # EMAModel's d at its first update is 2/11: small enough to move in two steps
    steps = []
    for timesteps in ([0, 500 + seed, T - 1], torch.randint(1, T - 1, (3,), generator=g).tolist()):
        x_t, noise = (torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))
        steps.append({"x_t": x_t, "timesteps": torch.tensor(timesteps), "noise": noise, "decay": decay,
                      "text_states": torch.randn(3, 7, 6, generator=g, dtype=torch.float64)})  # (B, L, D)
    return [{"backbone": backbone, "steps": Calls(steps, "2 steps, 3 samples each")}]


class GradientDescent:
    """The optimizer of training_step's check, with torch.optim's zero_grad() and step(): θ <- θ - lr ∂L/∂θ.
    Not torch.optim.AdamW: the first torch.optim optimizer of a process imports torch._dynamo, about a second on
    its own, more than a whole check may take; what the exercise tests (zero_grad, then step, then the average)
    is the same for any optimizer."""

    def __init__(self, parameters, lr: float):
        self.parameters, self.lr = list(parameters), lr

    def zero_grad(self) -> None:
        for weight in self.parameters:
            weight.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for weight in self.parameters:
            if weight.grad is not None:
                weight -= self.lr * weight.grad


def run_training_steps(fn, case: dict):
    """The check of training_step: a fresh copy of case["backbone"], a GradientDescent optimizer (lr 0.05) and a
    shadow copy of its weights; fn for each step of case["steps"]; returns (the parameters, the shadow), each
    flattened into one vector. A shadow that is not a list of tensors like the parameters comes back as it is,
    to be reported."""
    backbone = copy.deepcopy(case["backbone"])
    optimizer = GradientDescent(backbone.parameters(), lr=0.05)
    shadow = [weight.detach().clone() for weight in backbone.parameters()]
    for step in case["steps"]:
        shadow = fn(backbone, optimizer, shadow, **step)
    shapes = [weight.shape for weight in backbone.parameters()]
    if not isinstance(shadow, (list, tuple)) or [getattr(s, "shape", None) for s in shadow] != shapes:
        return shadow
    return (torch.cat([weight.detach().flatten() for weight in backbone.parameters()]),
            torch.cat([average.detach().flatten() for average in shadow]))


def _ema_training_step(backbone, optimizer, shadow, x_t, timesteps, text_states, noise, decay):
    """minildm's pieces: the loss as LatentDiffusion.diffusion_loss computes it, and EMAModel.step. A fresh
    EMAModel starts from `shadow` (it copies it); its first update uses d = min(decay, 2/11), which is `decay`
    for the decays the cases use."""
    optimizer.zero_grad()
    F.mse_loss(backbone(x_t, timesteps, text_states), noise).backward()
    optimizer.step()
    ema = EMAModel(shadow, decay)
    ema.step(backbone.parameters())
    return ema.shadow_params


def _training_mistake(ema_first=False, swap=False, zero_grad=True, rebind=False):
    def step(backbone, optimizer, shadow, x_t, timesteps, text_states, noise, decay):
        d = 1 - decay if swap else decay
        if zero_grad:
            optimizer.zero_grad()
        ((noise - backbone(x_t, timesteps, text_states)) ** 2).mean().backward()
        with torch.no_grad():
            if ema_first:
                shadow = [d * s + (1 - d) * p for s, p in zip(shadow, backbone.parameters())]
            optimizer.step()
            if rebind:
                for s, p in zip(shadow, backbone.parameters()):
                    s = d * s + (1 - d) * p  # noqa: F841 (the mistake: a new local name, the list is unchanged)
            elif not ema_first:
                shadow = [d * s + (1 - d) * p for s, p in zip(shadow, backbone.parameters())]
        return shadow
    return step


TRAINING_STEP = Exercise(
    name="training_step", notebook="05_pixel_diffusion",
    task="training_step(backbone, optimizer, shadow, x_t, timesteps, text_states, noise, decay) -> the new shadow "
         "(a list of tensors, one per backbone.parameters()): zero the gradients, the loss ||noise - "
         "backbone(x_t, timesteps, text_states)||² averaged, backward, optimizer.step(), then θ_ema <- d θ_ema + "
         "(1 - d) θ with d = decay. The check runs two steps from fresh weights and compares the parameters and "
         "the shadow.",
    source=f"{SOURCE_HO}, Algorithm 1 and appendix B (an EMA of the parameters, decay 0.9999); minildm.ema.EMAModel",
    solution=training_step, cases=_training_cases, reference=_ema_training_step, run=run_training_steps,
    mistakes=(
        Mistake("the average is updated before optimizer.step(): it must take the weights after this step's update",
                _training_mistake(ema_first=True)),
        Mistake("d and 1 - d are swapped: the old average keeps the weight d (close to 1), the new parameters get "
                "1 - d", _training_mistake(swap=True)),
        Mistake("optimizer.zero_grad() is missing: backward() adds to .grad, so the second step used the sum of "
                "both steps' gradients", _training_mistake(zero_grad=False)),
        Mistake("the shadow never changes: `s = ...` in a for loop only rebinds the name s; return a new list "
                "(or update each tensor in place under torch.no_grad())", _training_mistake(rebind=True)),
    ),
)


EXERCISES = [DIFFUSION_LOSS, TRAINING_STEP, DDPM_POSTERIOR, DDPM_STEP]  # in the notebook's order
