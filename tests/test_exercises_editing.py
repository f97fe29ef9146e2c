"""The exercises of notebook 14 (editing), beyond the generic checks of test_exercises.py: each checker accepts its
solution and other correct answers, rejects every listed mistake with its own hint and more wrong answers; the
solutions undo minildm's sampler steps and are minildm's editing.py."""

import torch

from minildm import FlowMatchEulerSampler, FlowMatchSchedule, NoiseSchedule, editing, exercises
from minildm.samplers import DDIMSampler

NOTEBOOK = "14_editing"
NAMES = exercises.names(NOTEBOOK)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_notebook_has_its_three_exercises():
    assert NAMES == ["ddim_inversion_step", "euler_inversion_step", "blend_known_region"]

def test_more_wrong_answers_are_rejected(capsys):
    def ddim_with_eps_sign_flipped(eps, sample, alpha_bar_t, alpha_bar_prev):
        return exercises.solution("ddim_inversion_step")(-eps, sample, alpha_bar_t, alpha_bar_prev)

    assert not exercises.check("ddim_inversion_step", ddim_with_eps_sign_flipped)
    assert "✗ ddim_inversion_step" in capsys.readouterr().out

    def euler_half_step(velocity, sample, sigma, sigma_next):
        return sample + 0.5 * (sigma - sigma_next) * velocity

    assert not exercises.check("euler_inversion_step", euler_half_step)
    assert "✗ euler_inversion_step" in capsys.readouterr().out

    def blend_soft(latents, original_latents, noise, mask, sigma):  # the mask's channel dimension lost
        known = (1 - sigma) * original_latents + sigma * noise
        return mask[:, 0] * latents + (1 - mask[:, 0]) * known

    assert not exercises.check("blend_known_region", blend_soft)
    capsys.readouterr()

    def blend_noise_only(latents, original_latents, noise, mask, sigma):  # the original dropped
        return mask * latents + (1 - mask) * sigma * noise

    assert not exercises.check("blend_known_region", blend_noise_only)
    capsys.readouterr()


def test_other_correct_answers_pass():
    def ddim_through_coefficients(eps, sample, alpha_bar_t, alpha_bar_prev):  # the step as a * sample + b * eps
        ratio = (alpha_bar_t / alpha_bar_prev) ** 0.5
        return ratio * sample + ((1 - alpha_bar_t) ** 0.5 - ratio * (1 - alpha_bar_prev) ** 0.5) * eps

    def euler_through_x0(velocity, sample, sigma, sigma_next):  # back to x̂_0 along the line, then up to σ
        x0 = sample - sigma_next * velocity
        return x0 + sigma * velocity

    def blend_with_where(latents, original_latents, noise, mask, sigma):
        known = torch.lerp(original_latents, noise, sigma)
        return torch.where(mask.bool(), latents, known)

    for name, fn in [("ddim_inversion_step", ddim_through_coefficients), ("euler_inversion_step", euler_through_x0),
                     ("blend_known_region", blend_with_where)]:
        assert exercises.check(name, fn, verbose=False), name


def test_the_ddim_solution_is_undone_by_minildms_ddim_step():
    sampler = DDIMSampler(NoiseSchedule(), timestep_spacing="trailing", set_alpha_to_one=True)
    sampler.set_timesteps(8)
    bars = sampler.schedule.alphas_cumprod
    eps, sample = _randn(2, 3, 4, 5, seed=1), _randn(2, 3, 4, 5, seed=2)
    step = exercises.solution("ddim_inversion_step")
    for t, prev_t in zip(sampler.timesteps.tolist(), sampler.timesteps.tolist()[1:] + [-1]):
        prev = bars[prev_t].item() if prev_t >= 0 else 1.0
        x_t = step(eps, sample, bars[t].item(), prev)
        torch.testing.assert_close(sampler.step(eps, t, x_t).prev_sample, sample)
        torch.testing.assert_close(x_t, editing.ddim_inverse_step(eps, sample, bars[t].item(), prev))


def test_the_euler_solution_is_undone_by_minildms_euler_step():
    sampler = FlowMatchEulerSampler(FlowMatchSchedule(), shift=3.0)
    sampler.set_timesteps(5)
    velocity, sample = _randn(2, 3, 4, 5, seed=3), _randn(2, 3, 4, 5, seed=4)
    sigmas = sampler.sigmas.tolist()
    for k, t in enumerate(sampler.timesteps):
        x_sigma = exercises.solution("euler_inversion_step")(velocity, sample, sigmas[k], sigmas[k + 1])
        torch.testing.assert_close(sampler.step(velocity, t, x_sigma).prev_sample, sample)


def test_the_blend_keeps_the_noised_original_exactly_where_the_mask_is_zero():
    latents, original, noise = _randn(1, 2, 3, 3, seed=5), _randn(1, 2, 3, 3, seed=6), _randn(1, 2, 3, 3, seed=7)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    mask[..., 0, :] = 1  # repaint the top row
    out = exercises.solution("blend_known_region")(latents, original, noise, mask, 0.25)
    torch.testing.assert_close(out[..., 0, :], latents[..., 0, :])
    torch.testing.assert_close(out[..., 1:, :], 0.75 * original[..., 1:, :] + 0.25 * noise[..., 1:, :])
