"""How an exercise is checked: the student's function runs on seeded tiny inputs next to minildm's own code,
and a failure says what differed and names the equation.

An Exercise holds the reference solution (the code the notebook's solution cell shows), the inputs to try
(`cases(seed)`: several timesteps including 0 and T-1, shapes whose dimensions all differ, two seeds),
minildm's own code for the same piece where it has one (`reference`), and the typical mistakes written out
(`mistakes`): when a wrong answer equals one of them, the hint says which mistake it is. Otherwise the
hint says what differed: the shape (or a transposed shape), the type, a flipped sign, a constant factor,
or the size and place of the largest difference.

Every input is made before the student's function runs and passed to it: a correct answer never depends on
the order in which minildm draws random numbers. Depends on torch only.
"""

from __future__ import annotations

import inspect
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

RTOL, ATOL = 1e-4, 1e-6  # an off-by-one t changes ᾱ_t by under 1% mid-schedule: 1e-4 still sees it


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer, written out, and the hint a student who made it gets."""

    hint: str
    fn: Callable


@dataclass(frozen=True)
class Exercise:
    name: str
    notebook: str  # the notebook that teaches it, e.g. "01_forward_process"
    task: str  # what to write, with shapes, in one or two sentences
    source: str  # the paper and equation
    solution: Callable  # the reference answer, as the notebook's solution cell writes it
    cases: Callable[[int], list[dict]]  # seed -> the inputs to try, as keyword arguments
    reference: Callable | None = None  # minildm's own code for the same piece (default: the solution)
    mistakes: tuple[Mistake, ...] = ()
    run: Callable | None = None  # run(fn, case) -> output; default fn(**case). Module exercises build a module
    rtol: float = RTOL
    atol: float = ATOL
    stub: str | None = None  # a "debug this" exercise: the broken code the student version starts from

    def output(self, fn: Callable, case: dict):
        """fn's output on one case: the case's values passed in the order of the solution's parameters, so that a
        student may name them as they like; a custom `run` decides for itself."""
        if self.run is not None:
            return self.run(fn, case)
        order = [name for name in inspect.signature(self.solution).parameters if name in case]
        return fn(*(case[name] for name in order), **{k: v for k, v in case.items() if k not in order})


# ---- comparing outputs -----------------------------------------------------------------------------------------


def _as_tensors(value):
    """An output as a tuple of tensors (a tensor, a number, or a tuple / list of them), or None."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    tensors = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (torch.Tensor, int, float)):
            return None
        tensors.append(item if torch.is_tensor(item) else torch.tensor(float(item), dtype=torch.float64))
    return tuple(tensors)


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(_describe(v) for v in value[:3])})"
    return f"{type(value).__name__} {value!r:.40}"


def _close(got, expected, rtol: float, atol: float) -> bool:
    a, b = _as_tensors(got), _as_tensors(expected)
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x.shape == y.shape and torch.allclose(x.double(), y.double(), rtol=rtol, atol=atol)
               for x, y in zip(a, b))


def difference(got, expected, rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """What differs between the student's output and the expected one, in words; None when they agree."""
    if isinstance(got, list) and not isinstance(expected, (list, tuple)):
        return f"your function returned a list of {len(got)}; return a tensor ({_describe(expected)})"
    a, b = _as_tensors(got), _as_tensors(expected)
    if a is None:
        return f"your function returned {_describe(got)}; expected {_describe(expected)}"
    if len(a) != len(b):
        return f"your function returned {len(a)} value(s); expected {len(b)} ({_describe(expected)})"
    for i, (x, y) in enumerate(zip(a, b)):
        which = f"output {i}: " if len(b) > 1 else ""
        if x.shape != y.shape:
            if x.ndim == y.ndim and x.ndim >= 2 and x.transpose(-1, -2).shape == y.shape:
                return f"{which}shape {tuple(x.shape)}, expected {tuple(y.shape)}: transposed (the last two axes)?"
            if x.numel() == y.numel():
                return (f"{which}shape {tuple(x.shape)}, expected {tuple(y.shape)}: as many values, another shape (a "
                        f"reshape, or a split along another axis?)")
            return f"{which}shape {tuple(x.shape)}, expected {tuple(y.shape)}"
        if x.is_floating_point() != y.is_floating_point() or (x.dtype == torch.bool) != (y.dtype == torch.bool):
            return f"{which}your output is {x.dtype}, expected {y.dtype}"
        low_precision = x.is_floating_point() and x.dtype != torch.float64 and y.dtype == torch.float64
        x_dtype, x, y = x.dtype, x.double(), y.double()
        if not torch.isfinite(x).all():
            return f"{which}your output holds NaN or infinity (a division by zero, or a log / sqrt of a negative?)"
        if torch.allclose(x, y, rtol=rtol, atol=atol):
            continue
        if torch.allclose(x, -y, rtol=rtol, atol=atol):
            return f"{which}the sign is flipped"
        scale = _constant_ratio(x, y)
        if scale is not None:
            return (f"{which}off by a constant factor: yours is {scale:.4g} times the expected (a square root, or a "
                    f"scale?)")
        if x.ndim >= 2 and x.shape[-1] == x.shape[-2] and torch.allclose(x.transpose(-1, -2), y, rtol=rtol, atol=atol):
            return f"{which}transposed: the last two axes are swapped"
        error = (x - y).abs()
        index = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape)) if error.ndim else ()
        relative = (error.max() / y.abs().max().clamp(min=1e-12)).item()
        precision = (" The inputs are float64 and your output is " + str(x_dtype) + ": a difference this small is "
                     "float32 rounding; compute in the inputs' dtype") if low_precision and relative < 1e-3 else ""
        return (f"{which}values differ: the largest difference is {error.max().item():.3g} at index {index} "
                f"(yours {x[index].item():.6g}, expected {y[index].item():.6g}; {100 * relative:.2g}% of the largest "
                f"value).{precision}")
    return None


def _constant_ratio(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """k when x = k y for one k != 1 (both mostly non-zero), else None."""
    mask = y.abs() > 1e-6 * y.abs().max().clamp(min=1e-30)
    if mask.sum() < 2:
        return None
    ratios = x[mask] / y[mask]
    k = ratios.median().item()
    if math.isfinite(k) and abs(k - 1) > 1e-3 and torch.allclose(ratios, torch.full_like(ratios, k), rtol=1e-4):
        return k
    return None


# ---- running a check ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    passed: bool
    message: str
    not_done: bool = False


def evaluate(exercise: Exercise, fn) -> Result:
    """Run `fn` on every case of `exercise` (two seeds) and compare it with the reference."""
    if fn is None or not callable(fn):
        return Result(False, f"expected your function (or class), got {_describe(fn)}")
    reference = exercise.reference if exercise.reference is not None else exercise.solution
    count = 0
    for seed in (0, 1):
        for case in exercise.cases(seed):
            expected = exercise.output(reference, case)
            try:
                got = exercise.output(fn, dict(case))
            except NotImplementedError:
                return Result(False, "not done yet: replace the `raise NotImplementedError` with your code",
                              not_done=True)
            except CheckerError as e:  # the checker's own finding about a module: no "your code raised"
                return Result(False, str(e))
            except Exception as e:  # the student's bug: reported, never raised
                return Result(False, f"your code raised {type(e).__name__}: {e} ({_where(e, exercise, case)})")
            problem = difference(got, expected, exercise.rtol, exercise.atol)
            if problem is not None:
                return Result(False, _hint(exercise, fn, case, got, problem))
            count += 1
    return Result(True, f"passed: {count} cases, 2 seeds")


class CheckerError(ValueError):
    """What the checker found wrong before comparing outputs (a module whose parameters are not minildm's)."""


def _where(error: Exception, exercise: Exercise, case: dict) -> str:
    """The student's line an exception came from; when it came from the call itself (a wrong number of
    arguments), how the checker called the function."""
    own = [frame for frame in traceback.extract_tb(error.__traceback__)
           if "minildm/exercises" not in frame.filename.replace("\\", "/")]
    if own:
        return f"line {own[-1].lineno}: {own[-1].line}"
    names = [n for n in inspect.signature(exercise.solution).parameters if n in case] if exercise.run is None else []
    return f"the checker calls it as {exercise.name}({', '.join(names)})" if names else "while the checker ran it"


def _hint(exercise: Exercise, fn, case: dict, got, problem: str) -> str:
    """The difference, then the typical mistake the output matches, if any, and the equation to read."""
    shown = ", ".join(f"{k}={_short(v)}" for k, v in case.items())
    lines = [f"with {shown}:", f"  {problem}"]
    for mistake in exercise.mistakes:
        try:
            if _close(got, exercise.output(mistake.fn, dict(case)), exercise.rtol, exercise.atol):
                lines.append(f"  hint: {mistake.hint}")
                break
        except Exception:  # a mistake that cannot run on this case says nothing
            continue
    lines.append(f"  see {exercise.source}")
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}" if len(value) <= 6 \
            else f"a dict of {len(value)}"
    if torch.is_tensor(value):
        return f"tensor{tuple(value.shape)}" if value.numel() > 4 else f"{value.tolist()}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"a {type(value).__name__} of {len(value)}: [{', '.join(_short(v) for v in value[:4])}, ...]"
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a numpy array
        return f"array{tuple(value.shape)}"
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:77] + "...")
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    return f"{value!r:.30}"


def run_module(cls, case: dict):
    """The output of a module exercise: build `cls(**case["init"])`, give it the weights of minildm's module
    (`case["weights"]`, a state dict: the student's parameters must have minildm's names and shapes), and call
    it on `case["inputs"]` without gradients. Raises CheckerError naming the parameters that do not match."""
    with torch.random.fork_rng(devices=[]):  # building a module draws weights: leave the notebook's random state
        module = cls(**case["init"])
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module class, got {type(module).__name__}")
    ours = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    theirs = {name: tuple(value.shape) for name, value in case["weights"].items()}
    if ours != theirs:
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        shapes = [f"{n} {ours[n]} (expected {theirs[n]})" for n in sorted(set(ours) & set(theirs))
                  if ours[n] != theirs[n]]
        parts = [f"missing {', '.join(missing[:6])}" if missing else "",
                 f"not in minildm's {', '.join(extra[:6])}" if extra else "",
                 f"other shapes: {', '.join(shapes[:4])}" if shapes else ""]
        raise CheckerError(f"with {_short(case['init'])}: your module's parameters must have minildm's names and "
                           f"shapes, so that its weights load: " + "; ".join(part for part in parts if part))
    module.to(next(iter(case["weights"].values())).dtype)  # a float64 case runs in float64
    module.load_state_dict(case["weights"])
    module.eval()
    with torch.no_grad():
        return module(**case["inputs"])


class Calls(list):
    """The inputs of several calls of one function (a list of keyword-argument dicts), shown in a check's message
    by a short description (at most 30 characters are shown) rather than by every tensor."""

    def __init__(self, calls, description: str):
        super().__init__(calls)
        self.description = description

    def __repr__(self) -> str:
        return self.description


def stack_calls(fn, case: dict):
    """The outputs of fn(**call) for each call in case["calls"], stacked into one vector: an exercise whose answer
    is one number is checked on several inputs at once, so that a constant factor or one wrong input shows.
    Anything that is not a number comes back as it is, for the check to report."""
    outputs = [fn(**call) for call in case["calls"]]
    for output in outputs:
        if isinstance(output, bool) or not (isinstance(output, (int, float)) or torch.is_tensor(output)):
            return output
        if torch.is_tensor(output) and output.numel() != 1:
            return output
    return torch.stack([torch.as_tensor(output, dtype=torch.float64).detach().reshape(()) for output in outputs])
