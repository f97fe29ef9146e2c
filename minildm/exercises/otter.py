"""The course's notebooks in otter-grader's assignment format, for instructors who grade with otter.

`otter assign` (otter-grader, the optional `[teach]` extra) reads a master notebook in which raw cells fence
each question, its solution and its tests:

    # ASSIGNMENT CONFIG              (a raw cell, first: YAML settings)
    # BEGIN QUESTION / name: add_noise / points: 1
        the exercise's task (markdown)
    # BEGIN SOLUTION
        the solution cell, whose # BEGIN SOLUTION ... # END SOLUTION lines otter replaces with `...`
    # END SOLUTION
    # BEGIN TESTS
        assert exercises.passed("add_noise")          (a test cell: the checker, run again quietly)
    # END TESTS
    # END QUESTION

The course notebooks stay readable without those cells (the solution markers in them are already otter's);
`otter_master` adds them to a copy. Then `otter assign MASTER.ipynb OUT --no-pdfs` writes the student and
autograder versions, as tests/test_otter.py does in CI.

    python -m minildm exercises otter NOTEBOOK OUT_NOTEBOOK

Depends on the standard library and the exercises' registry.
"""

from __future__ import annotations

import json
import re

_USE = re.compile(r'exercises\.use\("(\w+)"')


def _raw(text: str) -> dict:
    lines = text.split("\n")
    return {"cell_type": "raw", "metadata": {}, "source": [line + "\n" for line in lines[:-1]] + [lines[-1]]}


def otter_master(notebook: dict, name: str) -> dict:
    """A copy of `notebook` (nbformat JSON) with otter assign's raw cells around each exercise, one point each.
    Raises ValueError when the notebook holds no exercise."""
    cells, out, found = notebook["cells"], [], 0
    config = (f"# ASSIGNMENT CONFIG\nname: {name}\ninit_cell: true\ncheck_all_cell: false\nexport_cell: false\n"
              f"generate: true\nsave_environment: false\nrun_tests: true\ntests:\n  files: true")
    out.append(_raw(config))
    for cell in cells:
        match = _USE.search("".join(cell["source"])) if cell["cell_type"] == "code" else None
        if match is None:
            out.append(cell)
            continue
        exercise = match.group(1)
        task = out.pop() if out and out[-1]["cell_type"] == "markdown" and f"`{exercise}`" in "".join(
            out[-1]["source"]) else None
        out.append(_raw(f"# BEGIN QUESTION\nname: {exercise}\npoints: 1"))
        if task is not None:
            out.append(task)
        test = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                "source": [f'assert exercises.passed("{exercise}")']}
        out.extend([_raw("# BEGIN SOLUTION"), cell, _raw("# END SOLUTION"), _raw("# BEGIN TESTS"), test,
                    _raw("# END TESTS"), _raw("# END QUESTION")])
        found += 1
    if not found:
        raise ValueError(f"notebook {name} holds no exercise (no exercises.use(...) cell)")
    return {**notebook, "cells": json.loads(json.dumps(out))}
