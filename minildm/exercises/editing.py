"""Exercises of notebook 14, editing: one step of DDIM inversion, one step of a flow's Euler ODE run backwards, and
the paste of blended latent inpainting.

Notation as in editing.py: "prev" is the sampling loop's next, less noisy level, so ᾱ_prev > ᾱ_t (ᾱ_prev = 1 at
the clean end), and σ_next < σ for a flow. Inversion goes the other way, from the less noisy sample to the noisier.
Each solution below is the code of the notebook's solution cell (between # BEGIN SOLUTION and # END SOLUTION); each
Mistake is a wrong answer students write, with the hint it earns. minildm's own code is the reference:
editing.ddim_inverse_step, editing.euler_inverse_step, editing.blend with FlowMatchSchedule.add_noise.
"""

from __future__ import annotations

import torch

from .. import editing as minildm_editing
from ..flow import FlowMatchSchedule
from ..samplers import FlowMatchEulerSampler
from ..schedule import NoiseSchedule
from .core import Exercise, Mistake

SOURCE_DDIM = "Song et al. 2020 (arXiv:2010.02502), eq. 12 with η = 0, solved for x_t (DDIM inversion; eq. 13's ODE)"
SOURCE_MOKADY = "Mokady et al. 2022 (arXiv:2211.09794), sec. 3 (DDIM inversion)"
SOURCE_BLENDED = "Avrahami et al. 2023 (arXiv:2206.02779), Blended Latent Diffusion, Algorithm 1"
ALPHAS_CUMPROD = NoiseSchedule().alphas_cumprod  # Stable Diffusion's scaled_linear schedule, float64


def _samples(seed: int, count: int, shape=(3, 4, 5, 2)):
    g = torch.Generator().manual_seed(1400 + seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


# ---- one DDIM inversion step ------------------------------------------------------------------------------------


def ddim_inversion_step(eps, sample, alpha_bar_t, alpha_bar_prev):
    # BEGIN SOLUTION
    pred_original_sample = (sample - (1 - alpha_bar_prev) ** 0.5 * eps) / alpha_bar_prev ** 0.5  # x̂_0 from z_prev
    return alpha_bar_t ** 0.5 * pred_original_sample + (1 - alpha_bar_t) ** 0.5 * eps  # the same x̂_0, ε at ᾱ_t
    # END SOLUTION


def _ddim_cases(seed):
    eps, sample = _samples(seed, 2)
    other_eps, other_sample = _samples(seed + 10, 2, shape=(2, 3, 4, 6))
    bars = ALPHAS_CUMPROD.tolist()
    pairs = [(bars[19], 1.0),  # the first inversion step, from the clean latents (set_alpha_to_one)
             (bars[999], bars[979]),  # the last, to the noisiest timestep
             (bars[500 + 100 * seed], bars[480 + 100 * seed]),  # the middle
             (bars[300], bars[0])]  # a long step from SD's final ᾱ_0
    cases = [{"eps": eps, "sample": sample, "alpha_bar_t": t, "alpha_bar_prev": p} for t, p in pairs]
    cases.append({"eps": other_eps, "sample": other_sample, "alpha_bar_t": bars[700], "alpha_bar_prev": bars[600]})
    return cases


def _ddim_mistake(kind):
    def step(eps, sample, alpha_bar_t, alpha_bar_prev):
        a_from, a_to = (alpha_bar_t, alpha_bar_prev) if kind == "forward" else (alpha_bar_prev, alpha_bar_t)
        if kind == "no square roots":
            x0 = (sample - (1 - a_from) * eps) / a_from
            return a_to * x0 + (1 - a_to) * eps
        x0 = (sample - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
        if kind == "x0 from the wrong level":
            x0 = (sample - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
        if kind == "add noise to x0 hat":  # the training forward jump, with fresh-looking noise: the sample itself
            return a_to ** 0.5 * sample + (1 - a_to) ** 0.5 * eps
        return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps
    return step


DDIM_INVERSION_STEP = Exercise(
    name="ddim_inversion_step", notebook="14_editing",
    task="ddim_inversion_step(eps, sample, alpha_bar_t, alpha_bar_prev) -> z_t (B, C, H, W): the latents at the "
         "noisier level ᾱ_t from `sample` z_prev at the less noisy level ᾱ_prev (> ᾱ_t; 1 for clean latents), "
         "so that DDIM's deterministic step from z_t with the same ε lands on z_prev. alpha_bar_* are floats.",
    source=f"{SOURCE_DDIM}; {SOURCE_MOKADY}: x̂_0 = (z_prev - sqrt(1 - ᾱ_prev) ε) / sqrt(ᾱ_prev), "
           "z_t = sqrt(ᾱ_t) x̂_0 + sqrt(1 - ᾱ_t) ε",
    solution=ddim_inversion_step, cases=_ddim_cases, reference=minildm_editing.ddim_inverse_step,
    mistakes=(
        Mistake("this is DDIM's sampling step, from ᾱ_t to ᾱ_prev (towards the data); inversion goes the other way: "
                "x̂_0 from the sample at ᾱ_prev, then re-noised to ᾱ_t", _ddim_mistake("forward")),
        Mistake("ᾱ multiplies variances: the signal is scaled by sqrt(ᾱ) and the noise by sqrt(1 - ᾱ) (Song eq. 12)",
                _ddim_mistake("no square roots")),
        Mistake("x̂_0 must come from the sample you have, at ᾱ_prev: (z_prev - sqrt(1 - ᾱ_prev) ε) / sqrt(ᾱ_prev); "
                "ᾱ_t belongs to the z_t you are computing", _ddim_mistake("x0 from the wrong level")),
        Mistake("the sample is not x_0 (except at the very first step): take x̂_0 = (z_prev - sqrt(1 - ᾱ_prev) ε) / "
                "sqrt(ᾱ_prev) out of it first, then sqrt(ᾱ_t) x̂_0 + sqrt(1 - ᾱ_t) ε",
                _ddim_mistake("add noise to x0 hat")),
    ),
)


# ---- one Euler step of the flow, backwards -----------------------------------------------------------------------


def euler_inversion_step(velocity, sample, sigma, sigma_next):
    # BEGIN SOLUTION
    return sample + (sigma - sigma_next) * velocity  # undo x_{σ_next} = x_σ + (σ_next - σ) v: up the path to σ
    # END SOLUTION


def _euler_cases(seed):
    velocity, sample = _samples(seed, 2, shape=(2, 4, 3, 5))
    sampler = FlowMatchEulerSampler(FlowMatchSchedule(), shift=1.0 + 2 * seed)
    sampler.set_timesteps(6)
    sigmas = sampler.sigmas.tolist()  # 1 ... 0
    return [{"velocity": velocity, "sample": sample, "sigma": sigmas[k], "sigma_next": sigmas[k + 1]}
            for k in (5, 3, 0)]  # the first inversion step (from σ = 0), a middle one, the last (to σ = 1)


def _euler_mistake(kind):
    def step(velocity, sample, sigma, sigma_next):
        if kind == "forward":
            return sample + (sigma_next - sigma) * velocity
        if kind == "whole sigma":
            return sample + sigma * velocity
        return (1 - sigma) * sample + sigma * velocity  # the velocity taken for the noise ε
    return step


EULER_INVERSION_STEP = Exercise(
    name="euler_inversion_step", notebook="14_editing",
    task="euler_inversion_step(velocity, sample, sigma, sigma_next) -> x_σ (B, C, H, W): from `sample` x at "
         "σ_next (less noise) back up to σ > σ_next, with the velocity v the network gives, so that the Euler "
         "sampling step from σ with that v lands on the sample. sigma, sigma_next are floats.",
    source="Euler's step x_{σ_next} = x_σ + (σ_next - σ) v (samplers/flow_match.py) solved for x_σ: "
           "x_σ = x_{σ_next} + (σ - σ_next) v; the flow's ODE run backwards, as DDIM inversion (Song et al. eq. 13)",
    solution=euler_inversion_step, cases=_euler_cases, reference=minildm_editing.euler_inverse_step,
    mistakes=(
        Mistake("this is the sampling step, which walks towards the data (σ falls); inversion walks up the path: "
                "x_σ = x_{σ_next} + (σ - σ_next) v", _euler_mistake("forward")),
        Mistake("one step covers only σ - σ_next, not the whole σ: x + σ v jumps from the data all the way to σ",
                _euler_mistake("whole sigma")),
        Mistake("the velocity is not the noise: v = ε - x_0 is the path's direction, and the step moves the sample "
                "along it by σ - σ_next, x_σ = x_{σ_next} + (σ - σ_next) v", _euler_mistake("as noise")),
    ),
)


# ---- the paste of blended latent inpainting ----------------------------------------------------------------------


def blend_known_region(latents, original_latents, noise, mask, sigma):
    # BEGIN SOLUTION
    known = (1 - sigma) * original_latents + sigma * noise  # the original, noised to this step's σ
    return mask * latents + (1 - mask) * known  # mask 1 = repaint: keep the model's latents there
    # END SOLUTION


def _blend_cases(seed):
    latents, original, noise = _samples(seed, 3, shape=(2, 4, 6, 5))
    g = torch.Generator().manual_seed(1500 + seed)
    mask = (torch.rand(2, 1, 6, 5, generator=g) > 0.5).double()  # (B, 1, h, w): one mask for every channel
    return [{"latents": latents, "original_latents": original, "noise": noise, "mask": mask, "sigma": sigma}
            for sigma in (0.0, 0.37 + 0.2 * seed, 1.0)]


def _minildm_blend(latents, original_latents, noise, mask, sigma):
    known = FlowMatchSchedule().add_noise(original_latents, noise, float(sigma))
    return minildm_editing.blend(latents, known, mask)


def _blend_mistake(kind):
    def blend(latents, original_latents, noise, mask, sigma):
        known = (1 - sigma) * original_latents + sigma * noise
        if kind == "clean":
            known = original_latents
        if kind == "diffusion path":
            known = (1 - sigma) ** 0.5 * original_latents + sigma ** 0.5 * noise
        if kind == "flipped":
            return (1 - mask) * latents + mask * known
        return mask * latents + (1 - mask) * known
    return blend


BLEND_KNOWN_REGION = Exercise(
    name="blend_known_region", notebook="14_editing",
    task="blend_known_region(latents, original_latents, noise, mask, sigma) -> (B, c, h, w): after a sampler step "
         "that reached σ, keep the model's latents where mask is 1 (repaint) and put the original latents, noised "
         "to σ along the flow's path with `noise`, where mask is 0. mask is (B, 1, h, w) of 0s and 1s.",
    source=f"{SOURCE_BLENDED}: z ← m ⊙ z + (1 - m) ⊙ z_bg(σ), with z_bg(σ) = (1 - σ) z_0 + σ ε on a flow's path",
    solution=blend_known_region, cases=_blend_cases, reference=_minildm_blend,
    mistakes=(
        Mistake("the mask is the other way round: 1 marks what to repaint (diffusers' mask_image), so the model's "
                "latents stay where mask = 1 and the original goes where mask = 0", _blend_mistake("flipped")),
        Mistake("the original must be noised to the step's σ before it is pasted: clean latents next to noisy ones "
                "do not fit together, and the model never saw such a mix", _blend_mistake("clean")),
        Mistake("a flow's path is straight: (1 - σ) z_0 + σ ε, without square roots (those are diffusion's "
                "sqrt(ᾱ) and sqrt(1 - ᾱ))", _blend_mistake("diffusion path")),
    ),
)


EXERCISES = [DDIM_INVERSION_STEP, EULER_INVERSION_STEP, BLEND_KNOWN_REGION]  # in the notebook's order
