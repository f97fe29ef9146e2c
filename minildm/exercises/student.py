"""The student versions of the notebooks: every solution taken out, every output cleared.

A solution sits between two marker lines, as otter-grader's `otter assign` writes them:

    def add_noise(x0, noise, timesteps, alphas_cumprod):
        # BEGIN SOLUTION
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        # END SOLUTION

    add_noise = exercises.use("add_noise", add_noise)

The student version keeps the lines around the markers and puts a stub in their place, at their indentation:
`raise NotImplementedError(...)` that names the exercise, or, for a "debug this" exercise, the broken code to
repair (the exercise's `stub`). The check after it then says "not done yet" and goes on with minildm's
reference, so a student notebook runs to the end.

    python -m minildm exercises student NOTEBOOK_DIR OUT_DIR

Depends on the standard library (the notebooks are JSON) and the exercises' registry, for debug stubs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
_DEFINITION = re.compile(r"^\s*(?:def|class)\s+(\w+)")


def strip_solutions(source: str, stubs: dict[str, str] | None = None) -> str:
    """`source` (a cell's code) with each solution region replaced by a stub. The region's exercise is the
    innermost `def` / `class` above it, unless a `# EXERCISE name` comment says otherwise; `stubs` maps an
    exercise to the code a student starts from (default: raise NotImplementedError). Raises ValueError for
    unbalanced markers."""
    stubs = stubs if stubs is not None else {}
    lines, out, inside, name = source.split("\n"), [], False, None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        match = _DEFINITION.match(line)
        if match and not inside:
            name = match.group(1)
        if stripped.startswith("# EXERCISE "):
            name = stripped.removeprefix("# EXERCISE ").strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"line {number}: {BEGIN} inside another solution")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            stub = stubs.get(name, f'raise NotImplementedError("exercise {name}: your code here")')
            out.extend(indent + stub_line if stub_line else "" for stub_line in stub.split("\n"))
        elif stripped == END:
            if not inside:
                raise ValueError(f"line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without {END}")
    return "\n".join(out)


def student_notebook(notebook: dict, stubs: dict[str, str] | None = None) -> dict:
    """A copy of `notebook` (nbformat JSON) with solutions stripped and every output and count cleared."""
    notebook = json.loads(json.dumps(notebook))  # a deep copy
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if BEGIN in source:
            stripped = strip_solutions(source, stubs)
            cell["source"] = [line + "\n" for line in stripped.split("\n")[:-1]] + [stripped.split("\n")[-1]]
        cell["outputs"], cell["execution_count"] = [], None
    notebook.get("metadata", {}).pop("widgets", None)  # progress bars' state from the teacher's run
    return notebook


def write_student_versions(notebook_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the student version of every notebook in `notebook_dir` to `out_dir`; returns the paths written.
    Raises FileNotFoundError when `notebook_dir` holds no notebook."""
    from . import EXERCISES  # the debug exercises' broken code is their stub

    notebooks = sorted(Path(notebook_dir).glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {notebook_dir}")
    stubs = {name: exercise.stub for name, exercise in EXERCISES.items() if exercise.stub is not None}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        student = student_notebook(json.loads(path.read_text()), stubs)
        target = out_dir / path.name
        target.write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n")
        written.append(target)
    return written
