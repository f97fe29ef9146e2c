"""The exercises of notebooks 05 (DDPM on pixels) and 07 (samplers), beyond the generic checks of
test_exercises.py: each solution equals minildm's own code where the check compares with the solution or swaps
a sampler's noise, the exercises with a custom run reject generic wrong answers, and the "debug this" loop
starts broken in the student notebook."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minildm import exercises
from minildm.ema import EMAModel
from minildm.exercises import pixel_diffusion, samplers
from minildm.exercises.student import student_notebook
from minildm.samplers import DDIMSampler, DDPMSampler
from minildm.schedule import NoiseSchedule

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
SCHEDULE = NoiseSchedule()


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- the solutions are minildm's code ------------------------------------------------------------------------


@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_step_is_ddpm_samplers_step_with_its_own_noise(t):
    # The check swaps the sampler's noise for the case's; here the sampler draws it, and the solution gets the same.
    sampler = DDPMSampler(SCHEDULE)
    sampler.set_timesteps(1000)
    eps, x_t = _randn(2, 3, 4, 5, seed=1), _randn(2, 3, 4, 5, seed=2)
    expected = sampler.step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = exercises.solution("ddpm_step")(eps, t, x_t, noise, SCHEDULE.alphas_cumprod)
    torch.testing.assert_close(got, expected)


def test_ddpm_posterior_variance_is_ddpm_samplers_at_every_timestep():
    sampler = DDPMSampler(SCHEDULE)
    sampler.set_timesteps(1000)
    x = _randn(1, 1, 2, 2)
    posterior = exercises.solution("ddpm_posterior")
    got = [posterior(x, x, t, SCHEDULE.alphas_cumprod)[1].item() for t in range(1000)]
    np.testing.assert_allclose(got, [sampler.variance(t) for t in range(1000)], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_ddim_samplers_step_with_its_own_noise(eta):
    for set_alpha_to_one in (False, True):
        sampler = DDIMSampler(SCHEDULE, eta=eta, set_alpha_to_one=set_alpha_to_one)
        sampler.set_timesteps(10)
        eps, x_t = _randn(2, 3, 4, 5, seed=1), _randn(2, 3, 4, 5, seed=2)
        for t in (901, 501, 1):  # the last: ᾱ_prev = ᾱ_0, or 1
            prev = sampler.previous_timestep(t)
            alpha_bar_prev = SCHEDULE.alphas_cumprod[prev] if prev >= 0 else torch.tensor(
                sampler.final_alpha_cumprod, dtype=torch.float64)
            expected = sampler.step(eps, t, x_t, generator=torch.Generator().manual_seed(3)).prev_sample
            noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            got = exercises.solution("ddim_step")(eps, x_t, SCHEDULE.alphas_cumprod[t], alpha_bar_prev, eta, noise)
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_inference_timesteps_is_set_timesteps_for_every_n(spacing):
    solution = exercises.solution("inference_timesteps")
    for T in (1000, 37):
        for n in range(1, T + 1):
            offset = 1 if spacing != "leading" or (n - 1) * (T // n) + 1 < T else 0
            sampler = DDIMSampler(NoiseSchedule(num_train_timesteps=T), timestep_spacing=spacing, steps_offset=offset)
            sampler.set_timesteps(n)
            assert torch.equal(solution(n, T, spacing, offset), sampler.timesteps), (T, n)


@pytest.mark.parametrize("spacing, n", [("leading", 10), ("trailing", 7), ("linspace", 6)])
def test_ddim_sample_is_ddim_samplers_loop_and_ends_on_x0(spacing, n):
    sampler = DDIMSampler(SCHEDULE, timestep_spacing=spacing, set_alpha_to_one=True)
    sampler.set_timesteps(n)
    x0, eps = _randn(2, 1, 6, 5, seed=4), _randn(2, 1, 6, 5, seed=5)
    model = samplers.PerfectNoiseModel(eps)
    x_T = SCHEDULE.add_noise(x0, eps, int(sampler.timesteps[0]))
    x = x_T
    for t in sampler.timesteps:
        x = sampler.step(model(x, t), t, x).prev_sample
    got = exercises.solution("ddim_sample")(model, x_T, sampler.timesteps.tolist(), SCHEDULE.alphas_cumprod)
    torch.testing.assert_close(got, x)
    torch.testing.assert_close(got, x0)  # a perfect model: η = 0 DDIM lands on x_0
    broken = samplers._broken_ddim_sample(model, x_T, sampler.timesteps.tolist(), SCHEDULE.alphas_cumprod)
    assert (broken - x0).abs().max() > 0.02  # the symptom the task names: the last image is still noisy


def test_diffusion_loss_is_latent_training_loss_with_the_same_draws():
    model = pixel_diffusion.tiny_pixel_model()
    x0 = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = list(pixel_diffusion.CAPTIONS)
    timesteps, noise, dropped = model.draw_training_noise(x0.shape, 0.5, torch.Generator().manual_seed(1))
    assert dropped.any() and not dropped.all()
    expected = model.latent_training_loss(x0, captions, 0.5, torch.Generator().manual_seed(1))
    got = exercises.solution("diffusion_loss")(model.backbone, model.conditioner.encode, x0, captions, timesteps,
                                               noise, dropped, model.schedule.alphas_cumprod)
    torch.testing.assert_close(got, expected)


def test_training_step_reference_is_one_ema_model_over_the_steps():
    # The check's reference makes a fresh EMAModel per step; with the cases' decays (at most 2/11, EMAModel's own
    # d at its first update) that equals one EMAModel kept across the steps, as a training loop does.
    for seed in (0, 1):
        (case,) = pixel_diffusion._training_cases(seed)
        backbone = copy.deepcopy(case["backbone"])
        optimizer = pixel_diffusion.GradientDescent(backbone.parameters(), lr=0.05)
        ema = EMAModel(backbone.parameters(), decay=case["steps"][0]["decay"])
        for step in case["steps"]:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(backbone(step["x_t"], step["timesteps"], step["text_states"]),
                                                step["noise"])
            loss.backward()
            optimizer.step()
            ema.step(backbone.parameters())
        weights, shadow = pixel_diffusion.run_training_steps(exercises.solution("training_step"), case)
        torch.testing.assert_close(weights, torch.cat([p.detach().flatten() for p in backbone.parameters()]))
        torch.testing.assert_close(shadow, torch.cat([s.flatten() for s in ema.shadow_params]))


def test_training_step_solution_works_with_adamw_like_the_reference():
    (case,) = pixel_diffusion._training_cases(0)
    results = []
    for fn in (exercises.solution("training_step"), pixel_diffusion._ema_training_step):
        backbone = copy.deepcopy(case["backbone"])
        optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3)
        shadow = [p.detach().clone() for p in backbone.parameters()]
        for step in case["steps"]:
            shadow = fn(backbone, optimizer, shadow, **step)
        results.append(torch.cat([s.flatten() for s in shadow]))
    torch.testing.assert_close(results[0], results[1])


def test_frechet_distance_matches_minildm_on_real_feature_statistics():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g,
                                                                                  dtype=torch.float64)
    a, b = features[:150], features[150:] + 0.3
    stats = (a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    got = exercises.solution("frechet_distance")(*stats)
    assert got.item() == pytest.approx(samplers.minildm_frechet_distance(*stats), rel=1e-9)


# ---- checks with their own run: the generic wrong answers ----------------------------------------------------


RUN_EXERCISES = ["diffusion_loss", "training_step", "frechet_distance"]


@pytest.mark.parametrize("name", RUN_EXERCISES)
def test_exercises_with_a_run_reject_generic_wrong_answers(name, capsys):
    assert exercises.EXERCISES[name].run is not None
    solution = exercises.solution(name)

    def returns_none(*args, **kwargs):
        return None

    assert not exercises.check(name, returns_none)
    assert "returned NoneType" in capsys.readouterr().out

    if name == "training_step":
        def off(*args, **kwargs):  # the shadow 1% off (compounded over the two steps)
            return [s * 1.01 for s in solution(*args, **kwargs)]

        def a_tensor(*args, **kwargs):  # one tensor instead of the list
            return torch.cat([s.flatten() for s in solution(*args, **kwargs)])

        assert not exercises.check(name, a_tensor)
        assert "returned 1 value(s); expected 2" in capsys.readouterr().out
    else:
        def off(*args, **kwargs):
            return solution(*args, **kwargs) * 1.01

        def not_reduced(*args, **kwargs):  # a tensor instead of one number
            return solution(*args, **kwargs) * torch.ones(2, 3, dtype=torch.float64)

        assert not exercises.check(name, not_reduced)
        assert "shape (2, 3)" in capsys.readouterr().out
    assert not exercises.check(name, off)
    assert ("output 1: values differ" if name == "training_step" else "1.01 times") in capsys.readouterr().out


@pytest.mark.parametrize("name", ["diffusion_loss", "training_step"])
def test_checks_with_models_leave_the_global_random_state_alone(name):
    state = torch.random.get_rng_state()
    pixel_diffusion.tiny_pixel_model.cache_clear()
    assert exercises.check(name, exercises.solution(name), verbose=False)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", exercises.names("05_pixel_diffusion") + exercises.names("07_samplers"))
def test_a_check_is_fast_once_warm(name):
    import time

    exercises.check(name, exercises.solution(name), verbose=False)
    start = time.perf_counter()
    assert exercises.check(name, exercises.solution(name), verbose=False)
    assert time.perf_counter() - start < 0.5


# ---- the debugging exercise in the student notebook ------------------------------------------------------------


def test_the_student_notebook_starts_from_the_broken_loop(capsys):
    notebook = json.loads((NOTEBOOKS / "07_samplers.ipynb").read_text())
    stubs = {name: exercise.stub for name, exercise in exercises.EXERCISES.items() if exercise.stub is not None}
    student = student_notebook(notebook, stubs)
    cells = ["".join(cell["source"]) for cell in student["cells"] if cell["cell_type"] == "code"]
    (cell,) = [c for c in cells if "def ddim_sample(" in c]
    assert "alphas_cumprod[t - 1] if t > 0" in cell and "timesteps[i + 1]" not in cell
    namespace = {"torch": torch, "exercises": exercises}
    exec(cell, namespace)  # the student's cell runs: the check says what is wrong, then goes on with minildm's
    out = capsys.readouterr().out
    assert "✗ ddim_sample" in out and exercises.EXERCISES["ddim_sample"].mistakes[0].hint in out
    assert namespace["ddim_sample"] is exercises.solution("ddim_sample")


# ---- other correct answers pass ----------------------------------------------------------------------------------


def test_other_correct_answers_pass():
    def posterior_by_precision(x0, x_t, t, alphas_cumprod):  # Bayes' rule, with python floats
        alpha_bar_t = alphas_cumprod[t].item()
        alpha_bar_prev = alphas_cumprod[t - 1].item() if t > 0 else 1.0
        alpha = alpha_bar_t / alpha_bar_prev
        if t == 0:
            return x0, 0.0
        precision = alpha / (1 - alpha) + 1 / (1 - alpha_bar_prev)
        mean = (alpha**0.5 / (1 - alpha) * x_t + alpha_bar_prev**0.5 / (1 - alpha_bar_prev) * x0) / precision
        return mean, 1 / precision

    def step_as_algorithm_2(eps, t, x_t, noise, alphas_cumprod):  # Ho's Algorithm 2, σ_t² = β̃_t
        alpha_bar_t = alphas_cumprod[t]
        alpha_bar_prev = alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - alpha_bar_t / alpha_bar_prev
        mean = (x_t - beta / (1 - alpha_bar_t).sqrt() * eps) / (1 - beta).sqrt()
        sigma = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta).sqrt()
        return mean + sigma * noise if t > 0 else mean

    def loss_with_mse_loss(backbone, encode_text, x0, captions, timesteps, noise, dropped, alphas_cumprod):
        kept = [c if not d else "" for c, d in zip(captions, dropped)]
        alpha_bar = alphas_cumprod[timesteps][:, None, None, None]  # float64, the noisy sample cast after
        x_t = (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise).float()
        return torch.nn.functional.mse_loss(backbone(x_t, timesteps, encode_text(kept)), noise)

    def step_with_in_place_ema(backbone, optimizer, shadow, x_t, timesteps, text_states, noise, decay):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(backbone(x_t, timesteps, text_states), noise).backward()
        optimizer.step()
        with torch.no_grad():
            for average, weight in zip(shadow, backbone.parameters()):
                average.lerp_(weight, 1 - decay)
        return shadow

    def ddim_with_floats(eps, x_t, alpha_bar_t, alpha_bar_prev, eta, noise):
        a_t, a_prev = float(alpha_bar_t), float(alpha_bar_prev)
        variance = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev - variance) ** 0.5 * eps + variance**0.5 * noise

    def timesteps_from_a_list(num_inference_steps, num_train_timesteps, spacing, steps_offset):
        return torch.tensor(exercises.solution("inference_timesteps")(
            num_inference_steps, num_train_timesteps, spacing, steps_offset).tolist())

    def loop_over_pairs(model, x_T, timesteps, alphas_cumprod):
        x = x_T
        for t, prev in zip(timesteps, list(timesteps[1:]) + [None]):
            eps = model(x, t)
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[prev] if prev is not None else torch.ones_like(a_t)
            x = a_prev.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_prev).sqrt() * eps
        return x

    def frechet_as_usually_written(mu1, sigma1, mu2, sigma2):  # Tr((Σ1 Σ2)^½) from the eigenvalues of Σ1 Σ2
        eigenvalues = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0)
        return (mu1 - mu2) @ (mu1 - mu2) + sigma1.trace() + sigma2.trace() - 2 * eigenvalues.sqrt().sum()

    for name, fn in [("ddpm_posterior", posterior_by_precision), ("ddpm_step", step_as_algorithm_2),
                     ("diffusion_loss", loss_with_mse_loss), ("training_step", step_with_in_place_ema),
                     ("ddim_step", ddim_with_floats), ("inference_timesteps", timesteps_from_a_list),
                     ("ddim_sample", loop_over_pairs), ("frechet_distance", frechet_as_usually_written)]:
        assert exercises.check(name, fn, verbose=False), name
