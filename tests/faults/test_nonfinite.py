"""A NaN/inf loss (a huge learning rate): the run stops naming the step and the last good checkpoint, which is
intact; with `skip_nonfinite_updates` such updates are skipped and counted instead."""

from __future__ import annotations

import re

import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import data, events, tiny_config

from jaxsft import train as train_lib
from jaxsft.checkpoint import Checkpoints
from jaxsft.errors import RunFailed

HUGE = dict(max_steps=8, learning_rate=1e6, warmup_steps=1, checkpoint_every_steps=1)  # step 1 has lr 0


def saved_params(workdir, step):
    ck = Checkpoints(workdir / "checkpoints", read_only=True)
    state = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return state["params"]


def test_nonfinite_loss_stops_naming_the_step_and_the_intact_last_good_checkpoint(tiny_bert, tmp_path):
    w = tmp_path / "w"
    with pytest.raises(RunFailed) as e:
        train_lib.train_and_evaluate(tiny_config(tiny_bert, data(tmp_path)[0], **HUGE), w)
    msg = str(e.value)
    m = re.search(r"not finite at step (\d+).*last good checkpoint: step (\d+)", msg)
    assert m and "\n" not in msg, msg
    bad, good = int(m[1]), int(m[2])
    assert good == bad - 1  # a checkpoint every step: the one before the bad step, and none of the bad state
    assert max(Checkpoints(w / "checkpoints", read_only=True).steps()) == good
    assert all(np.isfinite(v).all() for v in saved_params(w, good).values())


@pytest.mark.slow  # ~20 s (the stop-on-NaN test stays in the fast tier)
def test_skip_nonfinite_updates_skips_and_counts_them(tiny_bert, tmp_path):
    w = tmp_path / "w"
    final = train_lib.train_and_evaluate(
        tiny_config(tiny_bert, data(tmp_path)[0], skip_nonfinite_updates=True, **HUGE), w)
    assert final["step"] == HUGE["max_steps"]
    rows = events(w, "loss")
    assert rows[-1]["skipped_updates"] > 0 and all(np.isfinite(r["loss"]) for r in rows)
    assert all(np.isfinite(v).all() for v in saved_params(w, HUGE["max_steps"]).values())
