"""The student versions of the course (python -m minildm exercises student): written for every notebook,
they run to the end at the ci profile, every exercise check saying "not done yet" (a "debug this" exercise
starts from its broken code, so its check shows what is wrong instead) and the notebook going on with
minildm's reference. Each notebook runs in a kernel of its own, as nbval runs the teacher's versions."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from minildm import exercises
from minildm.exercises.student import write_student_versions

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    write_student_versions(NOTEBOOKS, out)
    return out


@pytest.mark.parametrize("notebook", sorted({e.notebook for e in exercises.EXERCISES.values()}))
def test_a_student_notebook_runs_to_the_end(student_dir, notebook, monkeypatch):
    monkeypatch.setenv("MINILDM_PROFILE", os.environ.get("MINILDM_PROFILE", "ci"))
    path = student_dir / f"{notebook}.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(student_dir)}}).execute()
    printed = "".join(output.get("text", "") for cell in nb.cells for output in cell.get("outputs", []))
    for name in exercises.names(notebook):
        if exercises.EXERCISES[name].stub is None:
            assert f"… {name}: not done yet" in printed, name
        else:
            assert f"✗ {name}:" in printed, name  # the broken code it starts from, failing
        assert f"going on with minildm's reference {name}" in printed, name
