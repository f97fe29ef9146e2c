"""Editing with any trained text-to-image model, no retraining: img2img, inversion, inpainting, prompt swap.

All four reuse the sampler's own steps on the model's own predictions; they differ in where the loop starts
and what is done between steps.

img2img (SDEdit, Meng et al. 2021, arXiv:2108.01073, sec. 3): noise the image's latents part of the way,
    z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε     (diffusion; Ho et al. eq. 4)
    z_σ = (1 - σ) z_0 + σ ε                   (a flow; flow.py)
and run the sampler's remaining steps. Which steps follows diffusers' get_timesteps: of n steps the last
int(n · strength) are run (StableDiffusionImg2ImgPipeline; StableDiffusion3Img2ImgPipeline for a flow, which
noises to the σ of the first step run, σ ≈ strength). strength 0 runs none: the first stage's reconstruction.

Inversion (DDIM inversion: Song et al. 2020, arXiv:2010.02502, eq. 13, the ODE run backwards; Mokady et al.
2022, arXiv:2211.09794, sec. 3): DDIM's deterministic step from t to the earlier t' (η = 0, eq. 12)

    z_t' = sqrt(ᾱ_t') x̂_0 + sqrt(1 - ᾱ_t') ε,    x̂_0 = (z_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t),   ε = ε_θ(z_t, t)

solved for z_t, with ε evaluated at z_t' instead of the unknown z_t (the step is small):

    z_t = sqrt(ᾱ_t) (z_t' - sqrt(1 - ᾱ_t') ε) / sqrt(ᾱ_t') + sqrt(1 - ᾱ_t) ε,   ε ≈ ε_θ(z_t', t)

and for a flow Euler's step x_σ' = x_σ + (σ' - σ) v_θ(x_σ, σ) run backwards: x_σ = x_σ' + (σ - σ') v_θ(x_σ', σ).
`fixed_point_iterations` k > 0 re-evaluates ε at the new z_t k times, z_t <- step⁻¹(z_t', ε_θ(z_t, t)), which
converges to the exact inverse of the sampler's step (fixed-point inversion: Pan et al. 2023,
arXiv:2309.04907, sec. 3; Garibi et al. 2024, ReNoise, arXiv:2403.14602).

Inpainting (Blended Latent Diffusion, Avrahami et al. 2023, arXiv:2206.02779, sec. 3.1, Algorithm 1): after
every step, the known region (mask 0) of the latents is replaced by the original latents noised to the level
that step reached, z ← m ⊙ z + (1 - m) ⊙ noised(z_0); m is the mask downsampled to the latent size.

Prompt swap: invert with the source prompt, regenerate from the inverted latents with the target prompt.

Images in and out are (B, C, H, W) in [0, 1]; masks (B, 1, H, W) in {0, 1}, 1 = repaint (diffusers' convention).
The images' latents are the encoder's mean (its mode), so every result is deterministic given the noise.
Depends on checks.py, flow.py and samplers/; takes a LatentDiffusion (ldm.py) as its first argument.
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .checks import check_device, check_generator, check_images
from .samplers import DDIMSampler, FlowMatchEulerSampler, FlowMatchHeunSampler, randn_tensor

RANGE_TOLERANCE = 1e-3  # how far outside [0, 1] an image may stray (rounding) before it is refused


# ---- checking the arguments --------------------------------------------------------------------------------


def check_unit_images(ldm, images, name: str = "images") -> None:
    """Raise TypeError / ValueError unless `images` is a (B, C, H, W) float tensor in [0, 1] on the model's device,
    with H, W multiples of the first stage's factor f."""
    check_images(images, name, ldm.first_stage.in_channels, ldm.first_stage.downsampling_factor)
    check_device(images, name, ldm.device)
    low, high = images.min().item(), images.max().item()
    if not (-RANGE_TOLERANCE <= low and high <= 1 + RANGE_TOLERANCE):
        raise ValueError(f"{name} must lie in [0, 1], got values from {low:.3g} to {high:.3g} (images in [-1, 1], "
                         f"the training convention, map to [0, 1] with (x + 1) / 2)")


def check_masks(masks, images) -> None:
    """Raise TypeError / ValueError unless `masks` is (B, 1, H, W) like `images`, float or bool, of 0s and 1s."""
    if not torch.is_tensor(masks) or not (masks.is_floating_point() or masks.dtype == torch.bool):
        raise TypeError(f"masks must be a float or bool tensor (B, 1, H, W) of 0 (keep) and 1 (repaint), got "
                        f"{masks.dtype if torch.is_tensor(masks) else type(masks).__name__}")
    expected = (images.shape[0], 1, *images.shape[2:])
    if tuple(masks.shape) != expected:
        raise ValueError(f"masks must have shape {expected} for images of shape {tuple(images.shape)}, got "
                         f"{tuple(masks.shape)}")
    check_device(masks, "masks", images.device)
    if not ((masks == 0) | (masks == 1)).all():
        raise ValueError("masks must hold only 0 (keep) and 1 (repaint); threshold a soft mask first, e.g. m > 0.5")


def check_strength(strength) -> float:
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0 = the image back, 1 = all the steps), "
                         f"got {strength!r}")
    return float(strength)


def _prompt_list(prompts, batch_size: int, name: str = "prompts") -> list[str]:
    """One prompt per image: a string stands for all of them."""
    if isinstance(prompts, str):
        return [prompts] * batch_size
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a list of strings, got {prompts!r:.80}")
    if len(prompts) != batch_size:
        raise ValueError(f"{name}: got {len(prompts)} prompts for {batch_size} images")
    return list(prompts)


def check_invertible(ldm, sampler) -> None:
    """Raise ValueError unless `sampler` can run backwards exactly as this module does it: deterministic DDIM
    (η = 0, no clipping) for a diffusion model, Euler for a flow."""
    what_works = ("ldm.make_sampler('euler') (FlowMatchEulerSampler)" if ldm.is_flow else
                  "ldm.make_sampler('ddim') (DDIMSampler with eta=0 and clip_sample=False)")
    reason = None
    if isinstance(sampler, FlowMatchHeunSampler):
        reason = "Heun's two-call step has no one-line inverse here"
    elif isinstance(sampler, DDIMSampler):
        if sampler.eta != 0:
            reason = f"DDIM with eta={sampler.eta} adds fresh noise at every step, which cannot be undone"
        elif sampler.clip_sample:
            reason = "clip_sample=True clamps x̂_0, which loses what the inverse step needs"
    elif not isinstance(sampler, FlowMatchEulerSampler):
        reason = (f"{type(sampler).__name__} is not a deterministic one-step ODE solver this module can invert "
                  f"(DDPM is stochastic; DPM-Solver's multistep update is not inverted here)")
    if reason is not None:
        raise ValueError(f"cannot invert with {type(sampler).__name__}: {reason}; use {what_works}")


# ---- the pieces they share ---------------------------------------------------------------------------------


@contextmanager
def _eval_mode(ldm):
    """No dropout while editing; the model's training flag back afterwards."""
    was_training = ldm.training
    ldm.eval()
    try:
        yield
    finally:
        ldm.train(was_training)


def image_latents(ldm, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] -> z_0 = scaling_factor · mode(E(2x - 1)), (B, c, h, w) in the model's dtype.
    The mode, not a sample: editing is deterministic, and the decoder was trained around the mean."""
    check_unit_images(ldm, images)
    pixels = (images * 2 - 1).to(ldm.first_stage_dtype)  # [0, 1] -> [-1, 1]
    return (ldm.first_stage.encode(pixels).mode() * ldm.first_stage.scaling_factor).to(ldm.dtype)


def reconstruct(ldm, images: torch.Tensor) -> torch.Tensor:
    """D(E(x)), what strength 0 returns: images (B, C, H, W) in [0, 1] -> (B, C, H, W) float32 in [0, 1]."""
    with torch.no_grad():
        return ldm.decode_latents(image_latents(ldm, images))


def _conditions(ldm, prompts, guidance_scale, negative_prompts=None):
    """(cond, uncond) encoder states (B, L, D); uncond is None at guidance 1, else the null condition's (or the
    negative prompts', diffusers' `negative_prompt`)."""
    if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool) or not 0 <= guidance_scale \
            < float("inf"):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")
    ldm.warn_ignored_words(prompts, stacklevel=4)
    cond = ldm.conditioner.encode(prompts)  # (B, L, D)
    if guidance_scale == 1:
        return cond, None
    negatives = negative_prompts if negative_prompts is not None else [ldm.conditioner.null_condition] * len(prompts)
    return cond, ldm.conditioner.encode(negatives)


def begin_index(num_inference_steps: int, strength: float) -> int:
    """The first of n steps img2img runs (diffusers' get_timesteps): the last int(n · strength) steps are run."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0)


def _prepare_sampler(ldm, sampler, num_inference_steps: int):
    if getattr(ldm, "concat_conditioning", None) is not None:  # its backbone also needs the concatenated input
        raise ValueError(f"editing.py edits with text-to-image models; this one concatenates a "
                         f"{type(ldm.concat_conditioning).__name__} to its input: use its generate(image=..., "
                         f"mask_image=...)")
    sampler = ldm.make_sampler() if sampler is None else sampler
    ldm.check_sampler(sampler)
    sampler.set_timesteps(num_inference_steps)  # raises for an impossible number
    return sampler


def _level_after(ldm, sampler, visit: int):
    """The noise level the sampler's `visit`-th call (0-based, counting every entry of sampler.timesteps) lands
    on: σ for a flow, the next timestep for diffusion, or None for the clean end (σ = 0 / past the last step)."""
    if ldm.is_flow:
        sigma = sampler.sigmas[visit + 1].item()
        return sigma if sigma > 0 else None
    return int(sampler.timesteps[visit + 1]) if visit + 1 < len(sampler.timesteps) else None


def noise_to(ldm, latents: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
    """z_0 noised to `level`: (1 - σ) z_0 + σ ε for a flow (σ = level), sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε for
    diffusion (t = level); level None is z_0 itself. latents, noise: (B, c, h, w)."""
    if level is None:
        return latents
    if ldm.is_flow:
        return ldm.schedule.add_noise(latents, noise, float(level))
    return ldm.schedule.add_noise(latents, noise, int(level))


def _start_level(ldm, sampler, first_visit: int):
    """The noise level of the sample the `first_visit`-th call takes: σ_i for a flow, t_i for diffusion."""
    if ldm.is_flow:
        return sampler.sigmas[first_visit].item()
    return int(sampler.timesteps[first_visit])


def denoise_from(ldm, latents, cond, uncond, sampler, first_visit: int, guidance_scale: float, generator=None,
                 after_step=None) -> torch.Tensor:
    """generate()'s loop from the `first_visit`-th entry of sampler.timesteps on (set_timesteps already called).
    after_step(visit, latents) -> latents may change the latents after every call (inpainting's paste)."""
    if first_visit > 0 and hasattr(sampler, "_step_index"):  # flow samplers count their calls (diffusers' begin_index)
        sampler._step_index = first_visit
    for visit in range(first_visit, len(sampler.timesteps)):
        t = sampler.timesteps[visit]
        model_input = sampler.scale_model_input(latents, t)
        model_output = ldm.guided_model_output(model_input, t, cond, uncond, guidance_scale)
        latents = sampler.step(model_output, t, latents, generator=generator).prev_sample
        if after_step is not None:
            latents = after_step(visit, latents)
    return latents


# ---- img2img -----------------------------------------------------------------------------------------------


def img2img(ldm, images, prompts, strength: float = 0.8, num_inference_steps: int = 50, *, sampler=None,
            guidance_scale: float = 3.0, generator: torch.Generator | None = None,
            noise: torch.Tensor | None = None) -> torch.Tensor:
    """SDEdit: images (B, C, H, W) in [0, 1] -> images (B, C, H, W) float32 in [0, 1], redrawn after `prompts`.

    strength in [0, 1]: how much of the schedule is run, diffusers' get_timesteps: the last int(n · strength) of
        the sampler's n steps, from the image's latents noised to that step's level (Meng et al. 2021, sec. 3).
        0 returns the first stage's reconstruction D(E(x)); 1 is generate() from noise the image does not show.
    sampler: any sampler generate() takes (None: ldm.make_sampler()). noise: ε (B, c, h, w) instead of drawing it
        from `generator`. Raises TypeError / ValueError for arguments of the wrong kind, naming them.
    """
    strength = check_strength(strength)
    with torch.no_grad(), _eval_mode(ldm):
        z0 = image_latents(ldm, images)  # (B, c, h, w)
        prompts = _prompt_list(prompts, len(images))
        sampler = _prepare_sampler(ldm, sampler, num_inference_steps)
        check_generator(generator)
        cond, uncond = _conditions(ldm, prompts, guidance_scale)
        first_step = begin_index(num_inference_steps, strength)
        if first_step == num_inference_steps:  # strength 0 (or below 1 / n): no step to run
            return ldm.decode_latents(z0)
        noise = _noise_like(z0, noise, generator)
        first_visit = first_step * sampler.order  # diffusers: timesteps[t_start * order:]
        latents = noise_to(ldm, z0, noise, _start_level(ldm, sampler, first_visit))
        latents = denoise_from(ldm, latents, cond, uncond, sampler, first_visit, guidance_scale, generator)
        return ldm.decode_latents(latents)


def _noise_like(z0, noise, generator):
    if noise is None:
        return randn_tensor(tuple(z0.shape), generator, z0.device).to(z0.dtype)
    check_images(noise, "noise", z0.shape[1], what="latents")
    if noise.shape != z0.shape:
        raise ValueError(f"noise must have the latents' shape {tuple(z0.shape)}, got {tuple(noise.shape)}")
    return noise.to(z0.device, z0.dtype)


# ---- inversion ---------------------------------------------------------------------------------------------


def ddim_inverse_step(eps: torch.Tensor, sample: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float):
    """DDIM's η = 0 step (Song eq. 12) solved for z_t: from `sample` z_t' at ᾱ_prev (less noise) to z_t at ᾱ_t,
        z_t = sqrt(ᾱ_t) (z_t' - sqrt(1 - ᾱ_prev) ε) / sqrt(ᾱ_prev) + sqrt(1 - ᾱ_t) ε.     eps, sample: (B, ...)"""
    pred_original_sample = (sample - (1 - alpha_bar_prev) ** 0.5 * eps) / alpha_bar_prev ** 0.5  # x̂_0
    return alpha_bar_t ** 0.5 * pred_original_sample + (1 - alpha_bar_t) ** 0.5 * eps


def euler_inverse_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: float, sigma_next: float):
    """Euler's step x_σ' = x_σ + (σ' - σ) v run backwards: from `sample` x_σ' (σ' < σ) to x_σ = x_σ' + (σ - σ') v."""
    return sample + (sigma - sigma_next) * velocity


def _inverse_step(ldm, sampler, visit: int, model_output, sample, guess):
    """The inverse of the sampler's `visit`-th step, with the model output evaluated at `guess`."""
    if ldm.is_flow:
        sigma, sigma_next = sampler.sigmas[visit].item(), sampler.sigmas[visit + 1].item()
        return euler_inverse_step(model_output, sample, sigma, sigma_next)
    t = int(sampler.timesteps[visit])
    prev_t = int(sampler.timesteps[visit + 1]) if visit + 1 < len(sampler.timesteps) else -1
    alphas_cumprod = ldm.schedule.alphas_cumprod
    alpha_bar_t = alphas_cumprod[t].item()
    alpha_bar_prev = alphas_cumprod[prev_t].item() if prev_t >= 0 else sampler.final_alpha_cumprod
    _, eps = ldm.schedule.to_x0_and_eps(model_output, guess, t, ldm.prediction_type)  # ε as the step reads it
    return ddim_inverse_step(eps, sample, alpha_bar_t, alpha_bar_prev)


def invert_latents(ldm, latents, cond, uncond, sampler, first_visit: int, guidance_scale: float,
                   fixed_point_iterations: int = 0) -> torch.Tensor:
    """Run the sampler's steps backwards from clean latents z_0 (B, c, h, w) to the level of its `first_visit`-th
    call (0: z_T); set_timesteps already called. Each step evaluates the model at the less noisy latents with the
    step's own timestep (Mokady et al. 2022), then `fixed_point_iterations` times at the new estimate."""
    for visit in reversed(range(first_visit, len(sampler.timesteps))):
        t = sampler.timesteps[visit]
        guess = latents  # z_t ≈ z_t' for the model's input
        for _ in range(1 + fixed_point_iterations):
            model_output = ldm.guided_model_output(sampler.scale_model_input(guess, t), t, cond, uncond,
                                                   guidance_scale)
            guess = _inverse_step(ldm, sampler, visit, model_output, latents, guess)
        latents = guess
    return latents


def _check_iterations(fixed_point_iterations) -> None:
    if not isinstance(fixed_point_iterations, int) or isinstance(fixed_point_iterations, bool) \
            or fixed_point_iterations < 0:
        raise ValueError(f"fixed_point_iterations must be an integer >= 0, got {fixed_point_iterations!r}")


def invert(ldm, images, prompts, num_inference_steps: int = 50, *, sampler=None, guidance_scale: float = 1.0,
           strength: float = 1.0, fixed_point_iterations: int = 0) -> torch.Tensor:
    """DDIM inversion, or a flow's Euler ODE backwards: images (B, C, H, W) in [0, 1] -> the latents (B, c, h, w)
    from which `generate(prompts, latents=..., sampler=<same>, num_inference_steps=<same>, guidance_scale=<same>)`
    draws them again (exactly in the limit of small steps; at guidance 1 best: guided inversion drifts).

    sampler: DDIMSampler with eta=0 or FlowMatchEulerSampler (None: ldm.make_sampler()); others raise ValueError.
    strength < 1 stops part of the way: the latents at the level img2img(strength=...) would start from.
    fixed_point_iterations: k extra model calls per step that refine each inverse step (see the module docstring).
    Deterministic. Raises TypeError / ValueError for arguments of the wrong kind.
    """
    strength = check_strength(strength)
    _check_iterations(fixed_point_iterations)
    with torch.no_grad(), _eval_mode(ldm):
        z0 = image_latents(ldm, images)
        prompts = _prompt_list(prompts, len(images))
        sampler = _prepare_sampler(ldm, sampler, num_inference_steps)
        check_invertible(ldm, sampler)
        cond, uncond = _conditions(ldm, prompts, guidance_scale)
        first_visit = begin_index(num_inference_steps, strength)  # order 1: one visit per step
        return invert_latents(ldm, z0, cond, uncond, sampler, first_visit, guidance_scale, fixed_point_iterations)


# ---- prompt swap -------------------------------------------------------------------------------------------


def prompt_swap(ldm, images, source_prompts, target_prompts, num_inference_steps: int = 50, *, sampler=None,
                strength: float = 1.0, guidance_scale: float = 1.0, negative_prompts=None,
                fixed_point_iterations: int = 0) -> torch.Tensor:
    """Edit by changing the prompt: invert `images` (B, C, H, W) in [0, 1] with `source_prompts` (guidance 1) to
    the level `strength` gives, then run the same steps forward with `target_prompts`. Returns (B, C, H, W)
    float32 in [0, 1].

    guidance_scale s applies to the regeneration only, against the null prompt or `negative_prompts`: with
    negative_prompts=source_prompts, ε = ε(source) + s (ε(target) - ε(source)) pushes away from what the image
    was (negative-prompt inversion's guidance, Miyake et al. 2023, arXiv:2305.16807, sec. 3.2). strength < 1 keeps
    more of the image (the first steps, which fix the layout, are not rerun). Sampler as invert().
    """
    strength = check_strength(strength)
    _check_iterations(fixed_point_iterations)
    with torch.no_grad(), _eval_mode(ldm):
        z0 = image_latents(ldm, images)
        source_prompts = _prompt_list(source_prompts, len(images), "source_prompts")
        target_prompts = _prompt_list(target_prompts, len(images), "target_prompts")
        if negative_prompts is not None:
            negative_prompts = _prompt_list(negative_prompts, len(images), "negative_prompts")
        sampler = _prepare_sampler(ldm, sampler, num_inference_steps)
        check_invertible(ldm, sampler)
        first_visit = begin_index(num_inference_steps, strength)
        if first_visit == num_inference_steps:
            return ldm.decode_latents(z0)
        source_cond, _ = _conditions(ldm, source_prompts, 1.0)
        latents = invert_latents(ldm, z0, source_cond, None, sampler, first_visit, 1.0, fixed_point_iterations)
        cond, uncond = _conditions(ldm, target_prompts, guidance_scale, negative_prompts)
        sampler.set_timesteps(num_inference_steps)
        latents = denoise_from(ldm, latents, cond, uncond, sampler, first_visit, guidance_scale)
        return ldm.decode_latents(latents)


# ---- inpainting --------------------------------------------------------------------------------------------


def latent_mask(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) -> latent masks (B, 1, H/f, W/f): a latent pixel is repainted if any of its f x f
    pixels is (max-pooling), so no latent that the known region keeps carries what the mask asked to replace."""
    return F.max_pool2d(masks.float(), kernel_size=factor)  # (B, 1, H, W) -> (B, 1, H/f, W/f)


def blend(latents: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Blended Latent Diffusion's paste (Avrahami et al. 2023, Algorithm 1): m ⊙ z + (1 - m) ⊙ z_known.
    latents, known: (B, c, h, w); mask (B, 1, h, w), 1 = repaint."""
    return mask * latents + (1 - mask) * known


def inpaint(ldm, images, masks, prompts, num_inference_steps: int = 50, *, sampler=None, strength: float = 1.0,
            guidance_scale: float = 3.0, generator: torch.Generator | None = None, paste_original: bool = False,
            noise: torch.Tensor | None = None) -> torch.Tensor:
    """Training-free inpainting: repaint where `masks` is 1 after `prompts`, keep the rest. images (B, C, H, W) in
    [0, 1], masks (B, 1, H, W) of 0 (keep) and 1 (repaint) -> (B, C, H, W) float32 in [0, 1].

    After every sampler call the known latents (latent mask 0, `latent_mask`) are replaced by the image's latents
    noised, with the starting noise, to the level that call reached, and by the latents themselves at the end
    (Avrahami et al. 2023). The decoder still mixes the two regions near the edge of the mask: paste_original=True
    then pastes the original pixels outside the mask (as diffusers' apply_overlay does when asked; off by default).
    strength < 1 starts from the image noised part of the way, as img2img. Any sampler generate() takes.
    """
    strength = check_strength(strength)
    if not isinstance(paste_original, bool):
        raise TypeError(f"paste_original must be True or False, got {paste_original!r}")
    with torch.no_grad(), _eval_mode(ldm):
        z0 = image_latents(ldm, images)
        check_masks(masks, images)
        mask = latent_mask(masks, ldm.first_stage.downsampling_factor).to(z0.dtype)  # (B, 1, h, w)
        prompts = _prompt_list(prompts, len(images))
        sampler = _prepare_sampler(ldm, sampler, num_inference_steps)
        check_generator(generator)
        cond, uncond = _conditions(ldm, prompts, guidance_scale)
        noise = _noise_like(z0, noise, generator)
        first_visit = begin_index(num_inference_steps, strength) * sampler.order
        if first_visit < len(sampler.timesteps):
            start = noise_to(ldm, z0, noise, _start_level(ldm, sampler, first_visit))

            def paste_known(visit, latents):
                return blend(latents, noise_to(ldm, z0, noise, _level_after(ldm, sampler, visit)), mask)

            latents = denoise_from(ldm, start, cond, uncond, sampler, first_visit, guidance_scale, generator,
                                   paste_known)
        else:
            latents = z0
        result = ldm.decode_latents(latents)
        if paste_original:
            keep = masks.to(result.dtype)
            result = keep * result + (1 - keep) * images.float()
        return result
