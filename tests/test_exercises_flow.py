"""The exercises of notebook 10 (flow matching), beyond the generic checks of test_exercises.py: each checker accepts
its solution and other correct answers and rejects every listed mistake with its hint, and more wrong answers; the
solutions are minildm's code (FlowMatchSchedule, time_shift, the Euler and Heun samplers' loops); the hints' claims
hold; the notebook's exercises go through otter's format."""

import json
from pathlib import Path

import pytest
import torch

from minildm import FlowMatchEulerSampler, FlowMatchHeunSampler, FlowMatchSchedule, exercises, time_shift
from minildm.exercises import flow_matching
from minildm.exercises.otter import otter_master

NOTEBOOK = "10_flow_matching"
NAMES = exercises.names(NOTEBOOK)
NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
SCHEDULE = FlowMatchSchedule()


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mistake(name, fragment):
    """The Mistake of exercise `name` whose hint holds `fragment`."""
    (mistake,) = [m for m in exercises.EXERCISES[name].mistakes if fragment in m.hint]
    return mistake.fn


def test_the_notebook_has_its_four_exercises():
    assert NAMES == ["flow_path", "time_shift", "euler_step", "heun_step"]


# ---- more wrong answers ------------------------------------------------------------------------------------------


def test_more_wrong_answers_are_rejected(capsys):
    def path_only(x0, noise, sigmas):  # the point, without its velocity
        return exercises.solution("flow_path")(x0, noise, sigmas)[0]

    assert not exercises.check("flow_path", path_only)
    assert "returned 1 value(s); expected 2" in capsys.readouterr().out

    def unreshaped_sigmas(x0, noise, sigmas):  # (B,) against (B, C, H, W): broadcasts along the last axis, or fails
        return (1 - sigmas) * x0 + sigmas * noise, noise - x0

    assert not exercises.check("flow_path", unreshaped_sigmas)
    assert "your code raised RuntimeError" in capsys.readouterr().out

    def shifted_twice(sigmas, shift):
        return time_shift(time_shift(sigmas, shift), shift)

    assert not exercises.check("time_shift", shifted_twice)
    assert "values differ" in capsys.readouterr().out

    def euler_at_sigma_next(velocity, sample, sigma, sigma_next):  # the step's length from the wrong end
        return sample - sigma_next * velocity

    assert not exercises.check("euler_step", euler_at_sigma_next)
    assert "✗ euler_step" in capsys.readouterr().out

    def heun_with_timesteps(velocity_fn, sample, sigma, sigma_next):  # the network's units, σ · T, for the field
        return exercises.solution("heun_step")(lambda x, s: velocity_fn(x, s * 1000), sample, sigma, sigma_next)

    assert not exercises.check("heun_step", heun_with_timesteps)
    assert "✗ heun_step" in capsys.readouterr().out

    def heun_as_euler_twice(velocity_fn, sample, sigma, sigma_next):  # two half steps of Euler: 2 calls, first order
        middle = (sigma + sigma_next) / 2
        half = sample + (middle - sigma) * velocity_fn(sample, sigma)
        return half + (sigma_next - middle) * velocity_fn(half, middle)

    assert not exercises.check("heun_step", heun_as_euler_twice)
    capsys.readouterr()


def test_other_correct_answers_pass():
    def path_with_lerp(x0, noise, sigmas):
        weight = sigmas[:, None, None, None]
        return torch.lerp(x0, noise, weight), noise - x0

    def shift_by_odds(sigmas, shift):  # σ' / (1 - σ') = shift · σ / (1 - σ): the odds of noise times the shift
        return 1 / (1 + (1 / sigmas - 1) / shift)  # σ = 0: 1 / (1 + inf) = 0

    def euler_through_the_line(velocity, sample, sigma, sigma_next):  # the line's two ends, mixed at σ_next
        x0_hat = sample - sigma * velocity
        noise_hat = sample + (1 - sigma) * velocity
        return (1 - sigma_next) * x0_hat + sigma_next * noise_hat

    def heun_as_mean_of_two_eulers(velocity_fn, sample, sigma, sigma_next):
        dt = sigma_next - sigma
        guess = sample + dt * velocity_fn(sample, sigma)
        if sigma_next == 0:
            return guess
        return (guess + sample + dt * velocity_fn(guess, sigma_next)) / 2

    for name, fn in [("flow_path", path_with_lerp), ("time_shift", shift_by_odds),
                     ("euler_step", euler_through_the_line), ("heun_step", heun_as_mean_of_two_eulers)]:
        assert exercises.check(name, fn, verbose=False), name


# ---- the solutions are minildm's code ----------------------------------------------------------------------------


def test_flow_path_is_the_schedules_path_and_velocity_in_float32():
    x0, noise = _randn(3, 4, 2, 5, seed=1, dtype=torch.float32), _randn(3, 4, 2, 5, seed=2, dtype=torch.float32)
    sigmas = SCHEDULE.sample_sigmas(3, torch.Generator().manual_seed(3))
    x_sigma, velocity = exercises.solution("flow_path")(x0, noise, sigmas)
    torch.testing.assert_close(x_sigma, SCHEDULE.add_noise(x0, noise, sigmas))
    torch.testing.assert_close(velocity, SCHEDULE.get_velocity(x0, noise))
    # x̂_0 = x_σ - σ v walks the line back to the data (FlowMatchSchedule.predict_x0)
    torch.testing.assert_close(SCHEDULE.predict_x0(x_sigma, velocity, sigmas), x0)


@pytest.mark.parametrize("shift", [0.3, 1.0, 3.0, 7.5])
def test_time_shift_is_minildms_and_keeps_the_ends(shift):
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    shifted = exercises.solution("time_shift")(grid, shift)
    torch.testing.assert_close(shifted, time_shift(grid, shift))
    assert shifted[0] == 0 and shifted[-1].item() == pytest.approx(1, abs=1e-15)
    if shift > 1:  # towards the noise
        assert (shifted[1:-1] > grid[1:-1]).all()


def _hand_loop(step, sampler_class, n, shift, x_start, velocity_fn):
    """The sampler's loop, and the same ODE by hand with `step`: (the sampler's x, the hand's x, calls by hand)."""
    sampler = sampler_class(SCHEDULE, shift=shift)
    sampler.set_timesteps(n)
    x = x_start
    for t in sampler.timesteps:
        x = sampler.step(velocity_fn(x, t.item() / SCHEDULE.num_train_timesteps), t, x).prev_sample
    grid = FlowMatchEulerSampler(SCHEDULE, shift=shift)
    grid.set_timesteps(n)
    calls = []

    def counted(x, sigma):
        calls.append(sigma)
        return velocity_fn(x, sigma)

    mine = x_start
    for sigma, sigma_next in zip(grid.sigmas[:-1].tolist(), grid.sigmas[1:].tolist()):
        mine = step(counted, mine, sigma, sigma_next)
    return x, mine, len(calls)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_euler_and_heun_steps_in_a_loop_are_minildms_samplers(n, shift):
    x_start = _randn(2, 3, 4, 5, seed=4)
    velocity_fn = flow_matching.ToyVelocity()
    euler = exercises.solution("euler_step")

    def euler_step(fn, x, sigma, sigma_next):
        return euler(fn(x, sigma), x, sigma, sigma_next)

    # (the sampler's model sees σ back from the float32 timestep σ · T: a difference in the 8th digit)
    expected, mine, calls = _hand_loop(euler_step, FlowMatchEulerSampler, n, shift, x_start, velocity_fn)
    torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-6)
    assert calls == n
    expected, mine, calls = _hand_loop(exercises.solution("heun_step"), FlowMatchHeunSampler, n, shift, x_start,
                                       velocity_fn)
    torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-6)
    assert calls == 2 * n - 1  # the notebook's NFE count: Heun's last step stays Euler


def test_on_a_straight_path_at_constant_speed_one_step_is_exact():
    # The notebook: "On a straight path travelled at constant speed both are exact in one step."
    x0, noise = _randn(2, 3, 4, 5, seed=5), _randn(2, 3, 4, 5, seed=6)

    def constant(x, sigma):
        return noise - x0

    torch.testing.assert_close(exercises.solution("euler_step")(noise - x0, noise, 1.0, 0.0), x0)
    torch.testing.assert_close(exercises.solution("heun_step")(constant, noise, 1.0, 0.0), x0)
    torch.testing.assert_close(exercises.solution("heun_step")(constant, noise, 1.0, 0.4),
                               SCHEDULE.add_noise(x0, noise, 0.4))


def test_heun_is_closer_than_euler_to_the_exact_solution_at_equal_evaluations():
    # dx/dσ = x has the exact solution x(0) = x(1) · e^(-1): at equal evaluations, Heun's error is the smaller
    x_start = _randn(2, 3, 4, 5, seed=7)
    exact = x_start * torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    for heun_steps in (3, 5, 9):  # (2 Heun steps are one real one: the grid is 1, 1/T, 0)
        _, euler_x, euler_calls = _hand_loop(
            lambda fn, x, s, s_next: exercises.solution("euler_step")(fn(x, s), x, s, s_next),
            FlowMatchEulerSampler, 2 * heun_steps - 1, 1.0, x_start, lambda x, sigma: x)
        _, heun_x, heun_calls = _hand_loop(exercises.solution("heun_step"), FlowMatchHeunSampler, heun_steps, 1.0,
                                           x_start, lambda x, sigma: x)
        assert euler_calls == heun_calls
        assert (heun_x - exact).abs().max() < (euler_x - exact).abs().max(), heun_steps


# ---- what the hints say is true -----------------------------------------------------------------------------------


def test_the_hints_describe_their_mistakes():
    sigmas = torch.linspace(0, 1, 11, dtype=torch.float64)
    no_numerator = _mistake("time_shift", "numerator")(sigmas, 4.0)
    assert no_numerator[-1].item() == pytest.approx(1 / 4)  # "σ = 1 goes to 1 / shift"
    inverse = _mistake("time_shift", "the shift by 1 / shift")(sigmas, 4.0)
    torch.testing.assert_close(inverse, time_shift(sigmas, 1 / 4))
    assert (inverse[1:-1] < sigmas[1:-1]).all()  # "moves σ towards 0"
    denominator = _mistake("time_shift", "shift / (1 + shift)")(sigmas, 4.0)
    assert denominator[-1].item() == pytest.approx(4 / 5)

    velocity, sample = _randn(2, 3, seed=8), _randn(2, 3, seed=9)
    as_noise = _mistake("euler_step", "pure noise only at σ = 1")
    euler = exercises.solution("euler_step")
    torch.testing.assert_close(as_noise(velocity, sample, 1.0, 0.6), euler(velocity, sample, 1.0, 0.6))  # at σ = 1
    assert not torch.allclose(as_noise(velocity, sample, 0.7, 0.3), euler(velocity, sample, 0.7, 0.3))

    heun_at_the_end = _mistake("heun_step", "the last step, to σ = 0")
    heun, field = exercises.solution("heun_step"), flow_matching.ToyVelocity()
    torch.testing.assert_close(heun_at_the_end(field, sample, 0.8, 0.5), heun(field, sample, 0.8, 0.5))
    assert not torch.allclose(heun_at_the_end(field, sample, 0.3, 0.0), heun(field, sample, 0.3, 0.0))

    x0, noise = _randn(2, 3, 1, 1, seed=10), _randn(2, 3, 1, 1, seed=11)
    half = torch.full((2,), 0.5, dtype=torch.float64)
    _, displacement = _mistake("flow_path", "how far the path has come")(x0, noise, half)
    torch.testing.assert_close(displacement, SCHEDULE.add_noise(x0, noise, half) - x0)  # "σ (ε - x_0) = x_σ - x_0"


# ---- the notebook ---------------------------------------------------------------------------------------------------


def test_otter_master_fences_the_notebooks_exercises():
    notebook = json.loads((NOTEBOOKS / f"{NOTEBOOK}.ipynb").read_text())
    master = otter_master(notebook, NOTEBOOK)
    cells, names = master["cells"], []
    for i, cell in enumerate(cells):
        text = "".join(cell["source"])
        if cell["cell_type"] == "raw" and text.startswith("# BEGIN QUESTION"):
            names.append(text.split("\n")[1].removeprefix("name: "))
            task = "".join(cells[i + 1]["source"])  # the exercise's task travels inside its question
            assert cells[i + 1]["cell_type"] == "markdown" and f"`{names[-1]}`" in task, task
    assert names == NAMES


def test_the_notebook_ends_with_what_we_learned_after_its_last_picture():
    cells = json.loads((NOTEBOOKS / f"{NOTEBOOK}.ipynb").read_text())["cells"]
    assert cells[-1]["cell_type"] == "markdown" and "".join(cells[-1]["source"]).startswith("## What we learned")
    assert cells[-2]["cell_type"] == "code"
    assert any("image/png" in output.get("data", {}) for output in cells[-2]["outputs"])
