"""otter-grader (the optional [teach] extra): a course notebook turned into otter's master format is accepted by
`otter assign`, which runs the autograder's tests on the solutions and writes student and autograder versions.
Skipped where otter-grader is not installed (CI installs it)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from minildm import exercises
from minildm.exercises.otter import otter_master

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def test_otter_master_fences_every_exercise():
    notebook = json.loads((NOTEBOOKS / "01_forward_process.ipynb").read_text())
    master = otter_master(notebook, "01_forward_process")
    raw = ["".join(cell["source"]) for cell in master["cells"] if cell["cell_type"] == "raw"]
    assert raw[0].startswith("# ASSIGNMENT CONFIG")
    names = exercises.names("01_forward_process")
    assert [text.split("\n")[1] for text in raw if text.startswith("# BEGIN QUESTION")] == [f"name: {n}" for n in names]
    assert sum(text == "# END QUESTION" for text in raw) == len(names)
    with pytest.raises(ValueError, match="holds no exercise"):
        otter_master({"cells": []}, "empty")


@pytest.mark.skipif(shutil.which("otter") is None, reason="otter-grader is not installed (pip install -e '.[teach]')")
def test_otter_assign_accepts_a_course_notebook(tmp_path):
    master = tmp_path / "01_forward_process.ipynb"
    notebook = json.loads((NOTEBOOKS / "01_forward_process.ipynb").read_text())
    master.write_text(json.dumps(otter_master(notebook, "01_forward_process")))
    env = {**os.environ, "MINILDM_PROFILE": "ci"}
    result = subprocess.run(["otter", "assign", str(master), str(tmp_path / "out"), "--no-pdfs"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]  # otter ran the tests on the solutions
    student = (tmp_path / "out" / "student" / "01_forward_process.ipynb").read_text()
    assert "BEGIN SOLUTION" not in student and "torch.cumprod(1 - betas" not in student
    tests = sorted(p.stem for p in (tmp_path / "out" / "autograder" / "tests").glob("*.py"))
    assert tests == sorted(exercises.names("01_forward_process"))
