"""The exercises' checkers (minildm.exercises): every reference passes, every typical mistake is rejected
with its hint, the checker is hard to fool (1% off, transposed, None, exceptions), the notebooks' solution
cells are the package's solutions, and the student versions of the notebooks are written correctly."""

import inspect
import json
from pathlib import Path

import pytest
import torch

from minildm import exercises
from minildm.exercises.student import BEGIN, END, strip_solutions, student_notebook
from minildm.schedule import NoiseSchedule

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
NAMES = exercises.names()


def test_there_are_exercises_with_unique_names_and_sources():
    assert len(NAMES) == len(set(NAMES)) == len(exercises.EXERCISES)
    for name in NAMES:
        exercise = exercises.EXERCISES[name]
        assert (NOTEBOOKS / f"{exercise.notebook}.ipynb").is_file(), name
        assert exercise.task and exercise.source, name


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_passes(name, capsys):
    assert exercises.check(name, exercises.solution(name))
    assert f"✓ {name}: passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_a_check_leaves_the_global_random_state_alone(name):
    state = torch.random.get_rng_state()
    assert exercises.check(name, exercises.solution(name), verbose=False)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", NAMES)
def test_typical_mistakes_are_rejected_with_their_hint(name, capsys):
    exercise = exercises.EXERCISES[name]
    assert len(exercise.mistakes) >= 3, f"{name} needs at least three typical mistakes"
    for mistake in exercise.mistakes:
        assert not exercises.check(name, mistake.fn), mistake.hint
        out = capsys.readouterr().out
        assert f"✗ {name}" in out and mistake.hint in out and exercise.source in out, out
        others = [m.hint for m in exercise.mistakes if m is not mistake]
        assert not any(hint in out for hint in others), out  # its own hint, and only that one


def _scaled(fn, factor):
    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(o * factor for o in out) if isinstance(out, tuple) else out * factor
    return wrong


@pytest.mark.parametrize("name", NAMES)
def test_generic_wrong_answers_are_rejected(name, capsys):
    exercise = exercises.EXERCISES[name]
    if exercise.run is not None:  # module exercises: covered by their own mistakes
        pytest.skip("a module exercise")
    solution = exercises.solution(name)
    assert not exercises.check(name, _scaled(solution, 1.01))  # an output off by 1%
    out = capsys.readouterr().out
    assert "1.01 times" in out or "your output is torch.float" in out  # integer answers: 1.01 x makes floats

    def returns_none(*args, **kwargs):
        return None

    assert not exercises.check(name, returns_none)
    assert "returned NoneType" in capsys.readouterr().out

    def transposed(*args, **kwargs):
        out = solution(*args, **kwargs)
        return tuple(o.transpose(-1, -2) if o.ndim >= 2 else o.flip(-1) for o in out) if isinstance(out, tuple) \
            else (out.transpose(-1, -2) if out.ndim >= 2 else out.flip(-1))

    assert not exercises.check(name, transposed)
    capsys.readouterr()


def test_a_student_may_name_the_parameters_and_is_shown_their_own_line(capsys):
    def add_noise(x, eps, t, abar):  # other names, the same order: accepted
        a = abar[t].view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * eps

    assert exercises.check("add_noise", add_noise)

    def too_few(x0, noise, timesteps):
        return x0

    assert not exercises.check("add_noise", too_few)
    assert "the checker calls it as add_noise(x0, noise, timesteps, alphas_cumprod)" in capsys.readouterr().out

    def as_list(betas):
        return torch.cumprod(1 - betas, 0).tolist()

    assert not exercises.check("alphas_cumprod", as_list)
    assert "returned a list of 1000; return a tensor" in capsys.readouterr().out

    def in_float32(x0, noise, timesteps, alphas_cumprod):
        a = alphas_cumprod.float()[timesteps].view(-1, 1, 1, 1)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()) * (1 + 3e-4)  # as if rounded worse

    assert not exercises.check("add_noise", in_float32)
    assert "float32 rounding; compute in the inputs' dtype" in capsys.readouterr().out

    def ids_as_floats(*args):
        return exercises.solution("tokenize")(*args).float()

    assert not exercises.check("tokenize", ids_as_floats)
    assert "your output is torch.float32, expected torch.int64" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES[:1])
def test_unfinished_broken_and_non_functions_are_reported_not_raised(name, capsys):
    def not_done(*args, **kwargs):
        raise NotImplementedError

    def broken(*args, **kwargs):
        return 1 / 0

    assert not exercises.check(name, not_done)
    assert "not done yet" in capsys.readouterr().out
    assert not exercises.check(name, broken)
    assert "your code raised ZeroDivisionError: division by zero (line" in capsys.readouterr().out
    assert not exercises.check(name, None)
    assert "expected your function" in capsys.readouterr().out
    assert exercises.use(name, not_done) is exercises.solution(name)
    assert "going on with minildm's reference" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no exercise named 'nope'"):
        exercises.check("nope", not_done)


def test_solutions_agree_with_minildm_where_it_has_the_same_piece():
    schedule = NoiseSchedule()
    torch.testing.assert_close(exercises.solution("alphas_cumprod")(schedule.betas), schedule.alphas_cumprod)


# ---- the notebooks ----------------------------------------------------------------------------------------------


def _code_cells(notebook: str) -> list[str]:
    cells = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


@pytest.mark.parametrize("name", NAMES)
def test_the_notebook_shows_the_packages_solution_then_checks_it(name):
    # One source of truth: the solution cell is the package's solution function, character for character,
    # and the same cell then checks it.
    exercise = exercises.EXERCISES[name]
    source = inspect.getsource(exercise.solution).strip()
    cells = [cell for cell in _code_cells(exercise.notebook) if source in cell]
    assert len(cells) == 1, f"{exercise.notebook} should hold the solution of {name} in one cell"
    assert f'exercises.use("{name}", ' in cells[0] or f'exercises.check("{name}", ' in cells[0]


def test_strip_solutions_keeps_the_frame_and_stubs_the_body():
    source = (f"def f(x):\n    y = 1\n    {BEGIN}\n    return x + y\n    {END}\n\nf = exercises.use('f', f)")
    stripped = strip_solutions(source)
    assert stripped == ("def f(x):\n    y = 1\n    raise NotImplementedError(\"exercise f: your code here\")\n\n"
                        "f = exercises.use('f', f)")
    assert strip_solutions(source, {"f": "return x - y  # broken"}).splitlines()[2] == "    return x - y  # broken"
    with pytest.raises(ValueError, match="without"):
        strip_solutions(f"def f():\n    {BEGIN}\n    return 1")
    with pytest.raises(ValueError, match="without"):
        strip_solutions(f"def f():\n    {END}")


def test_student_notebooks_have_no_solutions_and_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        student = student_notebook(json.loads(path.read_text()))
        for cell in student["cells"]:
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                assert BEGIN not in source and END not in source
                assert cell["outputs"] == [] and cell["execution_count"] is None
        for name in exercises.names(path.stem):
            body = inspect.getsource(exercises.solution(name)).split(BEGIN)[1].split(END)[0].strip()
            assert body not in json.dumps(student), f"{name}'s solution is still in the student {path.name}"
