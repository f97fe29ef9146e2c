"""Training on several processes (distributed.py): 2 processes under torchrun, each with half of every batch,
end where 1 process with the whole batch ends, for the LDM and for the autoencoder with its discriminator; the
two ranks train on disjoint halves; a checkpointed 2-process run resumes exactly; the demo runs under torchrun.
On the CPU with gloo, as CI has no GPU (NCCL on CUDA is the same code with another backend)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minildm import distributed

WORKER = Path(__file__).parent / "distributed_worker.py"
LR, STEPS = 1e-3, 4


def run(args: list[str], processes: int, timeout: float = 240) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=timeout, env=env)


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    checked(run([str(WORKER), str(out), "straight"], processes=1))
    checked(run([str(WORKER), str(out), "straight"], processes=2))
    return out


def test_two_processes_with_half_batches_equal_one_with_the_whole(runs):
    one, two = load_file(runs / "straight_1.safetensors"), load_file(runs / "straight_2.safetensors")
    assert one.keys() == two.keys() and any(k.startswith("discriminator.") for k in one)
    differences = [(one[key].double() - two[key].double()).abs().max().item() for key in one]
    # Adam moves a weight by about lr per step whatever the gradient's size: a run that trained on other
    # examples, or on only half of each batch, would differ by ~lr in most weights. Equal runs differ only in
    # the rounding of a mean taken in two halves (gradients averaged by DDP) instead of one.
    assert max(differences) < 0.05 * LR, max(differences)
    assert sum(differences) / len(differences) < 1e-3 * LR
    # And the runs did train: the weights moved by about lr per step from where they started.
    from conftest import make_tiny_ldm

    start = make_tiny_ldm().backbone.conv_in.weight
    assert (one["ldm.backbone.conv_in.weight"] - start).abs().mean() > 0.3 * LR


def test_the_ranks_train_on_disjoint_halves_of_the_same_batches(runs):
    whole = json.loads((runs / "seen_straight_1_0.json").read_text())
    halves = [json.loads((runs / f"seen_straight_2_{rank}.json").read_text()) for rank in range(2)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == STEPS
    for step in range(STEPS):
        assert len(halves[0][step]) == len(halves[1][step]) == len(whole[step]) // 2
        assert halves[0][step] + halves[1][step] == whole[step]  # rank r takes the r-th half, in order


def test_a_two_process_run_resumes_exactly(runs):
    crashed = run([str(WORKER), str(runs), "crash"], processes=2)
    assert crashed.returncode != 0  # rank 0 died after the checkpoint of step 2
    assert json.loads((runs / "checkpoint" / "trainer.json").read_text())["step"] == 2
    checked(run([str(WORKER), str(runs), "resume"], processes=2))
    resumed, straight = load_file(runs / "resume_2.safetensors"), load_file(runs / "straight_2.safetensors")
    for key, value in resumed.items():
        assert torch.equal(value, straight[key]), key


def test_the_demo_runs_under_torchrun(tmp_path):
    result = checked(run(["-m", "minildm", "demo", "--smoke", "--out", str(tmp_path / "demo")], processes=2))
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["machine"]["processes"] == 2
    assert result.stdout.count("stage 1: autoencoder") == 1  # rank 0 alone speaks and writes


def test_rank_slice_splits_a_batch_or_says_why_not(monkeypatch):
    assert distributed.rank_slice(8) == slice(0, 8)  # one process: the whole batch
    monkeypatch.setattr(distributed, "world", lambda: (1, 3))
    assert distributed.rank_slice(9) == slice(3, 6)
    with pytest.raises(ValueError, match="batch_size=8 must divide by the number of processes \\(3\\)"):
        distributed.rank_slice(8)
