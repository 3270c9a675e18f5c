"""kill -9 at a random point of a run, then the same command again: the rerun resumes from the newest complete
checkpoint and ends bit-identical to a run that was never interrupted — final params and optimizer state, and
every logged loss (data order, dropout RNG, optimizer state and the logging accumulator all restored exactly)."""

from __future__ import annotations

import random
import signal
import time

import pytest
from helpers import data, run, run_args, start
from saved import bitwise_differences, checkpoint, committed_steps, rows_by_step, wait_for_checkpoint

STEPS = 12  # 8 batches an epoch: the runs cross an epoch boundary
# A checkpoint every step and a loss row every 3 steps: a kill loses at most a step, and resuming between two loss
# rows must restore the half-filled logging accumulator. Dropout is on (tiny_bert); one padded length, one compilation.
EXTRA = (f"--config.max_steps={STEPS}", "--config.checkpoint_every_steps=1", "--config.log_every_steps=3",
         "--config.keep_checkpoints=2", "--config.data.buckets=[64]")


def args_for(tiny_bert, tmp, workdir):
    train, _ = data(tmp)
    return run_args(tiny_bert, train, "", workdir, *EXTRA)


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    """The uninterrupted run: (final checkpoint state, meta, loss rows by step)."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run(args_for(tiny_bert, tmp, tmp / "w"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, meta = checkpoint(tmp / "w", STEPS)
    return state, meta, rows_by_step(tmp / "w", "loss")


@pytest.mark.slow  # ~60 s each on 2 busy cores: a killed run and its rerun (plus the reference run once)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_step_then_rerun_ends_bit_identical_to_an_uninterrupted_run(seed, reference, tiny_bert,
                                                                                       tmp_path):
    rng = random.Random(seed)
    kill_step, delay = rng.randint(2, STEPS - 3), rng.uniform(0.0, 0.4)  # somewhere inside the next step(s)
    w = tmp_path / "w"
    args = args_for(tiny_bert, tmp_path, w)
    proc = start(args)
    wait_for_checkpoint(w, proc, kill_step)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = max(committed_steps(w))
    assert kill_step <= last < STEPS, "the run ended before the kill"

    rerun = run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from step {last} " in rerun.stderr, rerun.stderr[-3000:]

    ref_state, ref_meta, ref_rows = reference
    state, meta = checkpoint(w, STEPS)
    assert not bitwise_differences(state, ref_state), bitwise_differences(state, ref_state)[:5]
    assert {k: meta[k] for k in ("step", "epoch", "batch_in_epoch")} == \
        {k: ref_meta[k] for k in ("step", "epoch", "batch_in_epoch")}
    rows = rows_by_step(w, "loss")
    assert sorted(rows) == sorted(ref_rows) == list(range(3, STEPS + 1, 3))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [rows[s][key] for s in sorted(rows)] == [ref_rows[s][key] for s in sorted(rows)], key
