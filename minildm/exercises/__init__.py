"""Exercises that check themselves: the student writes a piece of diffusion by hand, minildm checks it.

    from minildm import exercises

    def add_noise(x0, noise, timesteps, alphas_cumprod):
        ...                                            # your code
    exercises.check("add_noise", add_noise)            # prints a pass, or what differed and the equation
    add_noise = exercises.use("add_noise", add_noise)  # the same check; if it fails, minildm's answer

`names()` lists the exercises (of one notebook, if given), `describe(name)` says what to write, and
`solution(name)` returns the reference answer, which is the code between `# BEGIN SOLUTION` and
`# END SOLUTION` in the notebook that teaches it. A check runs on seeded tiny inputs on the CPU, well under
a second, over several timesteps (0 and T-1 included), shapes whose sizes all differ, and two seeds.

One module per notebook holds its exercises (forward_process.py for 01_forward_process, ...); core.py is
the checking; student.py writes the student versions of the notebooks.
"""

from __future__ import annotations

from collections.abc import Callable

from . import (
    attention,
    autoencoder,
    conditioning,
    editing,
    fast_samplers,
    flow_matching,
    forward_process,
    latent_diffusion,
    pixel_diffusion,
    samplers,
    text_to_image,
    unet,
    vq,
)
from .core import Exercise, Mistake, evaluate

__all__ = ["Exercise", "Mistake", "EXERCISES", "check", "describe", "names", "passed", "solution", "use"]

_NOTEBOOKS = (forward_process, autoencoder, attention, unet, pixel_diffusion, latent_diffusion, samplers,
              text_to_image, flow_matching, fast_samplers, vq, conditioning, editing)  # in the course's order
EXERCISES: dict[str, Exercise] = {exercise.name: exercise for module in _NOTEBOOKS for exercise in module.EXERCISES}


def _exercise(name: str) -> Exercise:
    if not isinstance(name, str) or name not in EXERCISES:
        raise ValueError(f"no exercise named {name!r}; exercises.names() lists them: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def names(notebook: str | None = None) -> list[str]:
    """The exercises' names, in the course's order; only those of `notebook` ("01_forward_process") if given."""
    return [name for name, exercise in EXERCISES.items() if notebook is None or exercise.notebook == notebook]


def describe(name: str) -> str:
    """What to write for exercise `name`, and its source (paper and equation)."""
    exercise = _exercise(name)
    return f"{name} ({exercise.notebook}): {exercise.task}\nsource: {exercise.source}"


def solution(name: str) -> Callable:
    """The reference answer of exercise `name`: the notebook's solution cell, as minildm ships it."""
    return _exercise(name).solution


def check(name: str, fn: Callable, verbose: bool = True) -> bool:
    """Run `fn` (your function, or class for a module exercise) against the reference; True if it passes.

    Prints "✓ NAME: passed", or "✗ NAME: " and what differed (shape, sign, a constant factor, the largest
    difference), the typical mistake it matches if any, and the equation; a function that raises
    NotImplementedError is "not done yet". Never raises for the student's code: its exceptions are reported.
    Raises ValueError only for an unknown exercise name.
    """
    result = evaluate(_exercise(name), fn)
    if verbose:
        mark = "✓" if result.passed else ("…" if result.not_done else "✗")
        print(f"{mark} {name}: {result.message}")
    return result.passed


_submitted: dict[str, Callable] = {}  # the student's own function of each exercise, as use() last saw it


def use(name: str, fn: Callable) -> Callable:
    """check(name, fn), then the function to go on with: yours if it passed, else minildm's reference (and it
    says so), so that the rest of a notebook runs either way. Your function is kept for passed(name)."""
    _submitted[_exercise(name).name] = fn
    if check(name, fn):
        return fn
    print(f"  (going on with minildm's reference {name} until yours passes)")
    return solution(name)


def passed(name: str) -> bool:
    """Whether the function last given to use(name, ...) passes, checked again quietly: what a grader asks
    (otter-grader's tests call it), since use() itself hands on the reference when yours fails."""
    return name in _submitted and check(name, _submitted[name], verbose=False)
