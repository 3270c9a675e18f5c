"""Two runs on one workdir: the second refuses with one line naming the workdir and the holder's pid (exit 2);
the lock goes with its process, kill -9 included."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from helpers import ENV, data, run, run_args, start, wait_for_train_event

from jaxsft.errors import UserError
from jaxsft.lock import WorkdirLock

HOLD = "import sys, time; from jaxsft.lock import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); print('held', " \
       "flush=True); time.sleep(600)"


def test_the_lock_names_its_holder_and_is_released_when_the_holder_is_killed(tmp_path):
    w = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(w)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refusal = re.escape(f"--workdir {w} is in use by another run (pid {holder.pid},")
        for attempt in (WorkdirLock(w).check, WorkdirLock(w).acquire):
            with pytest.raises(UserError, match=refusal):
                attempt()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = WorkdirLock(w)
    lock.check()
    lock.acquire()
    assert (w / ".lock").read_text().strip() == str(os.getpid())
    lock.release()


@pytest.mark.slow  # ~20 s: two runs
def test_a_second_run_on_a_busy_workdir_refuses_with_one_line_and_exit_2(tiny_bert, tmp_path):
    w = tmp_path / "w"
    args = run_args(tiny_bert, *data(tmp_path), w, "--config.max_steps=100000", "--config.eval_every_steps=100000",
                    "--config.checkpoint_every_steps=100000")
    first = start(args)
    try:
        wait_for_train_event(w, first)
        second = run(args)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and str(w) in lines[0] and f"pid {first.pid}" in lines[0], second.stderr[-2000:]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
