"""SIGTERM/SIGINT: a checkpoint at the next step boundary, exit 75 and one line; a second signal exits at once."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from helpers import data, run, run_args, start, wait_for_train_event

from jaxsft.errors import RunFailed, Stopped, run_cli

STEPS = 200
STOPPED = re.compile(r"stopped at step (\d+) on (SIGTERM|SIGINT); checkpoint saved in (\S+) — rerun the same "
                     r"command to resume")


def test_sigterm_saves_a_checkpoint_exits_75_and_the_same_command_resumes_to_the_end(tiny_bert, tmp_path):
    sig = signal.SIGTERM
    w = tmp_path / "w"
    args = run_args(tiny_bert, *data(tmp_path), w, f"--config.max_steps={STEPS}",
                    f"--config.eval_every_steps={STEPS}", f"--config.checkpoint_every_steps={STEPS}")
    proc = start(args)
    wait_for_train_event(w, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    m = STOPPED.fullmatch(err.strip().splitlines()[-1])
    assert m, err[-2000:]
    step = int(m[1])
    assert 0 < step < STEPS and m[2] == sig.name and m[3] == str(w / "checkpoints")
    assert (w / "checkpoints" / str(step)).is_dir()

    rerun = run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from step {step}" in rerun.stderr
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["step"] == STEPS


@pytest.mark.slow  # ~65 s on 2 busy cores: two runs
def test_a_second_signal_exits_at_once_and_the_newest_complete_checkpoint_still_resumes(tiny_bert, tmp_path):
    w = tmp_path / "w"
    args = run_args(tiny_bert, *data(tmp_path), w, "--config.max_steps=60", "--config.eval_every_steps=60",
                    "--config.checkpoint_every_steps=2")
    proc = start(args)
    wait_for_train_event(w, proc)
    deadline = time.time() + 60
    while not (w / "checkpoints" / "2").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    if proc.returncode == 1:  # the usual case: the second signal lands before the stop checkpoint is written
        assert last.startswith("error: second signal (SIGTERM)"), err[-2000:]
    else:
        assert proc.returncode == 75 and STOPPED.fullmatch(last), err[-2000:]
    rerun = run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from step" in rerun.stderr
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["step"] == 60


@pytest.mark.parametrize("exc, code", [(Stopped("stopped at step 3 on SIGTERM"), 75), (RunFailed("nan"), 1)])
def test_run_cli_maps_stop_to_75_and_run_failures_to_1_with_one_line(exc, code, capsys):
    def main(argv):
        raise exc

    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == code
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
