"""The exercises of notebook 11 (fast samplers and transformers) beyond the generic checks of test_exercises.py:
each checker accepts its solution, rejects every typical mistake with its hint and one more wrong answer; the
solutions are minildm's code on more steps than the checks take (the first-order step is DDIM's, a chain of them is
DPMSolverMultistepSampler's, the rescale is NoiseSchedule's, patchify is DiT's patch embedding with copying
weights); and the notebook's exercises reach otter and the student version."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minildm import DDIMSampler, DPMSolverMultistepSampler, NoiseSchedule, exercises
from minildm.dit import unpatchify
from minildm.exercises import fast_samplers
from minildm.exercises.otter import otter_master
from minildm.exercises.student import student_notebook
from minildm.schedule import ALPHA_BAR_FLOOR

NOTEBOOK = "11_fast_samplers_and_transformers"
NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
NAMES = ["dpm_solver_first_order_step", "dpm_solver_2m_step", "rescale_zero_terminal_snr", "patchify"]


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_notebooks_exercises_are_registered_in_order():
    assert exercises.names(NOTEBOOK) == NAMES
    assert all(exercises.EXERCISES[name].notebook == NOTEBOOK for name in NAMES)


# ---- each checker: the solution, every listed mistake, and one more wrong answer ----------------------------------

def _sigma_ratio_inverted(sample, x0_pred, alpha_bar_s, alpha_bar_t):
    alpha_t = alpha_bar_t.sqrt()
    sigma_s, sigma_t = (1 - alpha_bar_s).sqrt(), (1 - alpha_bar_t).sqrt()
    h = torch.log(alpha_t / sigma_t) - torch.log(alpha_bar_s.sqrt() / sigma_s)
    return (sigma_s / sigma_t) * sample - alpha_t * torch.expm1(-h) * x0_pred


def _whole_span_as_h_previous(sample, x0_pred, previous_x0_pred, alpha_bar_previous, alpha_bar_s, alpha_bar_t):
    def half_log_snr(alpha_bar):
        return torch.log(alpha_bar.sqrt() / (1 - alpha_bar).sqrt())

    h = half_log_snr(alpha_bar_t) - half_log_snr(alpha_bar_s)
    r = (half_log_snr(alpha_bar_t) - half_log_snr(alpha_bar_previous)) / h  # λ_t - λ_{s_prev}: two steps, not one
    d = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * previous_x0_pred
    return ((1 - alpha_bar_t) / (1 - alpha_bar_s)).sqrt() * sample - alpha_bar_t.sqrt() * torch.expm1(-h) * d


def _alphas_not_betas(betas):
    return 1 - exercises.solution("rescale_zero_terminal_snr")(betas)


def _unfolded(sample, patch_size):
    return F.unfold(sample, patch_size, stride=patch_size)  # (B, C·p·p, N): not transposed, channel-first


def _patches_reversed(sample, patch_size):
    return exercises.solution("patchify")(sample, patch_size).flip(1)


@pytest.mark.parametrize("name, wrong, said", [
    ("dpm_solver_first_order_step", _sigma_ratio_inverted, "values differ"),
    ("dpm_solver_2m_step", _whole_span_as_h_previous, "values differ"),
    ("rescale_zero_terminal_snr", _alphas_not_betas, "values differ"),
    ("patchify", _unfolded, "transposed (the last two axes)?"),
    ("patchify", _patches_reversed, "values differ"),
])
def test_another_wrong_answer_is_rejected(name, wrong, said, capsys):
    assert not exercises.check(name, wrong)
    out = capsys.readouterr().out
    assert f"✗ {name}" in out and said in out, out


# ---- the solutions are minildm's code ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 10, 25])
def test_the_first_order_step_is_ddims_step_at_every_step(n):
    schedule = NoiseSchedule()
    ddim = DDIMSampler(schedule, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(n)
    x, eps = _randn(2, 3, 4, 5, seed=1), _randn(2, 3, 4, 5, seed=2)
    step = exercises.solution("dpm_solver_first_order_step")
    for t in ddim.timesteps.tolist():
        prev = ddim.previous_timestep(t)
        alpha_bar_s = schedule.alphas_cumprod[t]
        alpha_bar_t = schedule.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0_pred = schedule.predict_x0_from_eps(x, eps, t)
        torch.testing.assert_close(step(x, x0_pred, alpha_bar_s, alpha_bar_t), ddim.step(eps, t, x).prev_sample)


def _floored(schedule, t):
    return schedule.alphas_cumprod[t].clamp(min=ALPHA_BAR_FLOOR)  # the solver's ᾱ_t, never 0


def _chain_by_hand(schedule, timesteps, x, model, prediction_type):
    """DPM-Solver++(2M) from the two exercise solutions: first order, then 2M, the last step onto x̂_0."""
    first_order = exercises.solution("dpm_solver_first_order_step")
    second_order = exercises.solution("dpm_solver_2m_step")
    previous = None
    for i, t in enumerate(timesteps):
        alpha_bar_s = _floored(schedule, t)
        output = model(x, t)
        if prediction_type == "epsilon":
            x0_pred = (x - (1 - alpha_bar_s).sqrt() * output) / alpha_bar_s.sqrt()
        else:  # v = α ε - σ x_0
            x0_pred = alpha_bar_s.sqrt() * x - (1 - alpha_bar_s).sqrt() * output
        if i + 1 == len(timesteps):
            return x0_pred
        alpha_bar_t = _floored(schedule, timesteps[i + 1])
        if previous is None:
            x = first_order(x, x0_pred, alpha_bar_s, alpha_bar_t)
        else:
            x = second_order(x, x0_pred, previous[1], previous[0], alpha_bar_s, alpha_bar_t)
        previous = (alpha_bar_s, x0_pred)


def _toy_model(x, t):
    return 0.9 * torch.tanh(1.3 * x + 0.001 * float(t))


@pytest.mark.parametrize("zero_snr, prediction_type", [(False, "epsilon"), (True, "v_prediction")])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 20])
def test_a_chain_of_the_solutions_is_dpm_solvers_chain(zero_snr, prediction_type, n):
    schedule = NoiseSchedule(rescale_betas_zero_snr=zero_snr)
    sampler = DPMSolverMultistepSampler(schedule, timestep_spacing="trailing", prediction_type=prediction_type)
    sampler.set_timesteps(n)
    x = _randn(2, 4, 5, 3, seed=3)
    library = x
    for t in sampler.timesteps:
        library = sampler.step(_toy_model(library, t), t, library).prev_sample
    by_hand = _chain_by_hand(schedule, sampler.timesteps.tolist(), x, _toy_model, prediction_type)
    torch.testing.assert_close(by_hand, library)
    if n >= 3:  # from three steps on, the 2M steps make it differ from DDIM, the first-order chain
        ddim = DDIMSampler(schedule, timestep_spacing="trailing", set_alpha_to_one=True,
                           prediction_type=prediction_type)
        ddim.set_timesteps(n)
        y = x
        for t in ddim.timesteps:
            y = ddim.step(_toy_model(y, t), t, y).prev_sample
        assert (y - library).abs().max() > 1e-3


def test_the_2m_cases_are_steps_where_the_solver_is_second_order():
    # Where the checker's reference took a first-order step, a first-order answer would pass on that case.
    first_order = fast_samplers._second_order_mistake(first_order=True)
    for seed in (0, 1):
        for case in fast_samplers._second_order_cases(seed):
            expected = fast_samplers._sampler_2m_step(**case)
            torch.testing.assert_close(exercises.solution("dpm_solver_2m_step")(**case), expected)
            assert (first_order(**case) - expected).abs().max() > 1e-4


def test_the_first_order_cases_include_the_first_and_the_last_step_of_each_setting():
    cases = fast_samplers._first_order_cases(0)
    assert any(case["alpha_bar_t"] == 1.0 for case in cases)  # onto a clean x_0: σ_t = 0, λ_t = ∞
    assert any(case["alpha_bar_s"] == ALPHA_BAR_FLOOR for case in cases)  # from t = 999 on the zero-SNR schedule
    last = [i for i, case in enumerate(cases) if case["alpha_bar_t"] == 1.0]
    assert last == list(range(len(cases) - len(last), len(cases)))  # they come last: mistakes are named on finite steps


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
@pytest.mark.parametrize("T", [2, 10, 1000])
def test_rescale_is_noise_schedules_and_keeps_the_first_alpha_bar(beta_schedule, T):
    plain = NoiseSchedule(beta_schedule, num_train_timesteps=T)
    rescaled = NoiseSchedule(beta_schedule, num_train_timesteps=T, rescale_betas_zero_snr=True)
    betas = exercises.solution("rescale_zero_terminal_snr")(plain.betas)
    torch.testing.assert_close(betas, rescaled.betas)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    torch.testing.assert_close(alpha_bar[0], plain.alphas_cumprod[0])
    assert alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-15) and betas[-1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("shape, p", [((2, 4, 8, 8), 2), ((1, 4, 6, 9), 3), ((2, 4, 4, 4), 4), ((3, 4, 2, 6), 1)])
def test_patchify_is_dits_patch_embedding_with_copying_weights_and_unpatchify_inverts_it(shape, p):
    sample = _randn(*shape, seed=4)
    tokens = exercises.solution("patchify")(sample, p)
    B, C, H, W = shape
    assert tokens.shape == (B, (H // p) * (W // p), p * p * C)
    dit = fast_samplers.pixel_copying_dit(C, p).double()
    with torch.no_grad():
        torch.testing.assert_close(dit.patchify(sample), tokens)
    assert torch.equal(unpatchify(tokens, p, H // p, W // p), sample)


def test_the_patchify_check_leaves_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    assert exercises.check("patchify", exercises.solution("patchify"), verbose=False)
    assert torch.equal(torch.random.get_rng_state(), state)


# ---- the notebook: otter and the student version -------------------------------------------------------------------


def test_the_notebook_reaches_otter_and_the_student_version_without_its_solutions():
    notebook = json.loads((NOTEBOOKS / f"{NOTEBOOK}.ipynb").read_text())
    master = otter_master(notebook, NOTEBOOK)
    raw = ["".join(cell["source"]) for cell in master["cells"] if cell["cell_type"] == "raw"]
    assert [text.split("\n")[1] for text in raw if text.startswith("# BEGIN QUESTION")] == [f"name: {n}" for n in NAMES]
    questions = [i for i, cell in enumerate(master["cells"]) if "".join(cell["source"]).startswith("# BEGIN QUESTION")]
    for name, i in zip(NAMES, questions):  # the task's markdown is fenced with its question
        assert f"**Exercise `{name}`.**" in "".join(master["cells"][i + 1]["source"])
    student = json.dumps(student_notebook(notebook))
    for name in NAMES:
        assert f'raise NotImplementedError(\\"exercise {name}: your code here\\")' in student
    assert "torch.expm1(-h) * d" not in student and "x.permute(0, 2, 4, 3, 5, 1)" not in student
    last = notebook["cells"][-1]
    assert last["cell_type"] == "markdown" and "## What we learned" in "".join(last["source"])
