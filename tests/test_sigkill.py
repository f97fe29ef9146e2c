"""SIGKILL a training process many times while it writes checkpoints: every time, the checkpoint folder
still holds one whole checkpoint, the old one or the new one, bit-identical to the uninterrupted run at
its step; and resuming through all the kills ends exactly where the uninterrupted run ends.

The killed processes are forked from a multiprocessing fork server that has imported torch once, so
each one starts in milliseconds rather than seconds. The kill delays come from a seeded generator; where
in its work a delay catches the process still depends on the machine's speed.
"""

import json
import multiprocessing
import os
import random
import signal
import sys
import time

import pytest
import sigkill_worker
import torch

from minildm.atomic import readable_directory
from minildm.training_state import TrainingState, load_training_state

KILLS = 25


def fork_server():
    context = multiprocessing.get_context("forkserver")
    # The server imports these once, so that each child starts at once (sigkill_worker itself is small, and
    # not on the server's path before Python 3.12).
    context.set_forkserver_preload(["minildm.train", "torch._dynamo"])  # AdamW imports torch._dynamo
    return context


def run(context, *args, kill_after=None):
    process = context.Process(target=sigkill_worker.train, args=args)
    process.start()
    if kill_after is None:
        process.join()
        assert process.exitcode == 0
    else:
        time.sleep(kill_after)
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it has already finished (the fork server reaped it)
            pass
        process.join()
    return process.exitcode


def load_checkpoint(directory):
    """Load the checkpoint into fresh objects, as a resuming process would; return its step and weights."""
    autoencoder = sigkill_worker.tiny_autoencoder()
    optimizer = torch.optim.AdamW(autoencoder.parameters())
    step, history = load_training_state(directory, TrainingState({"autoencoder": autoencoder}, optimizer,
                                                                 torch.Generator()))
    # Every file is from the same save: the optimizer's step counts and the logged losses agree with trainer.json.
    assert all(state["step"].item() == step for state in optimizer.state.values())
    assert len(history["loss"]) == step
    return step, sigkill_worker.digest(autoencoder)


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL and a fork server")
def test_sigkill_during_checkpoints_always_leaves_a_whole_checkpoint(tmp_path):
    context = fork_server()
    run(context, None, str(tmp_path / "reference.json"))
    reference = {int(step): value for step, value in json.loads((tmp_path / "reference.json").read_text()).items()}
    folder = tmp_path / "checkpoint"
    # How long the whole run takes with its checkpoints, on this machine now: the kill delays are scaled to
    # it, so that the kills spread over the run on a fast machine and a slow one alike (fixed delays let a
    # fast machine finish every step before the first few kills, and then no kill can land in a save).
    start = time.perf_counter()
    run(context, str(tmp_path / "calibration"))
    max_delay = 2 * (time.perf_counter() - start) / KILLS

    process = context.Process(target=sigkill_worker.train, args=(str(folder),))
    process.start()
    while not (readable_directory(folder) / "trainer.json").is_file():  # the first checkpoint, then kill
        time.sleep(0.001)
    try:
        os.kill(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # on a fast machine it may have finished every step already
        pass
    process.join()

    delays = random.Random(6).sample([max_delay * i / KILLS for i in range(KILLS)], KILLS)
    steps, mid_save = [], 0
    for delay in delays:
        exitcode = run(context, str(folder), kill_after=delay)
        assert exitcode in (-signal.SIGKILL, 0), f"the training process failed on its own (exit code {exitcode})"
        mid_save += any(name.startswith(".checkpoint.") for name in os.listdir(tmp_path))
        step, weights = load_checkpoint(folder)
        assert weights == reference[step], f"the checkpoint of step {step} is not the one the straight run made"
        assert not steps or step >= steps[-1]
        steps.append(step)
        assert exitcode == -signal.SIGKILL or step == sigkill_worker.STEPS  # 0: it had finished all steps
    run(context, str(folder))  # resume to the end
    step, weights = load_checkpoint(folder)
    assert step == sigkill_worker.STEPS and weights == reference[step]
    print(f"{KILLS} kills, {mid_save} in the middle of a save, at steps {steps}")
    # Most of a step's time goes to its checkpoint, so some kills must have caught one half written.
    assert mid_save > 0, "no kill landed during a save: the test did not test what it means to"
