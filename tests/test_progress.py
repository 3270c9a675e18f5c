"""The progress display: plain log lines off a terminal (CI logs), a tqdm bar on one.

A real run's lines (off a terminal, eval metric included) are checked by the control run in test_bad_input.py,
which is paid for there anyway."""

from __future__ import annotations

import io
import logging
import re

from jaxsft import reporting
from jaxsft.reporting import Progress

ROW = {"loss": 0.693147, "tokens_per_second": 1234.4, "examples_per_second": 56.25, "learning_rate": 1e-4}


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal_carry_step_loss_speed_eval_and_eta(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(reporting.time, "time", clock)
    stream = io.StringIO()  # not a tty
    caplog.set_level(logging.INFO, logger="jaxsft")
    p = Progress(total=20, initial=0, stream=stream)
    assert not p.tty and p.bar is None
    clock.t += 30.0  # compiling the first step: must not count in the pace
    p.update(5, ROW)
    p.tick(6)
    p.set_eval(6, "eval_accuracy", 0.8125)
    clock.t += 10.0  # 5 more steps in 10 s: 2 s/step, 10 steps left
    p.update(10, {**ROW, "loss": 0.5})
    p.close()

    lines = [r.getMessage() for r in caplog.records if r.name == "jaxsft"]
    assert len(lines) == 2, lines
    first, second = lines
    assert first.startswith("step 5/20 ") and "loss=0.6931" in first and "tokens/s=1234" in first
    assert "examples/s=56.2" in first and "eval_" not in first
    assert re.search(r"eta=1:30$", first), first  # 30 s for 5 steps → 15 steps left ≈ 90 s
    assert second.startswith("step 10/20 ") and "loss=0.5000" in second
    assert "eval_accuracy=0.8125 (step 6)" in second
    assert re.search(r"eta=0:20$", second), second
    assert stream.getvalue() == ""  # no bar, no control characters


def test_eta_is_unknown_before_any_step_and_zero_at_the_end(monkeypatch, caplog):
    monkeypatch.setattr(reporting.time, "time", FakeClock())
    caplog.set_level(logging.INFO, logger="jaxsft")
    p = Progress(total=4, initial=4, stream=io.StringIO())
    assert p.eta(4) == 0.0
    q = Progress(total=4, initial=0, stream=io.StringIO())
    q.update(0, ROW)
    assert caplog.records[-1].getMessage().endswith("eta=?")


def test_bar_on_a_terminal_shows_step_total_and_numbers(caplog):
    term = Terminal()
    p = Progress(total=8, initial=2, stream=term)  # resumed at step 2
    assert p.tty and p.bar is not None
    for step in range(3, 6):
        p.tick(step)
    p.update(6, ROW)
    p.set_eval(6, "eval_accuracy", 0.75)
    logging.getLogger("jaxsft").info("a log line while the bar is up")
    p.close()
    out = term.getvalue()
    assert "6/8" in out and "\r" in out, out
    assert "loss=0.6931" in out and "tok/s=1234" in out and "eval_accuracy=0.7500" in out, out
    assert not any(r.getMessage().startswith("step ") for r in caplog.records)  # the bar, not log lines


def test_progress_off_process_zero_shows_nothing(monkeypatch, caplog):
    monkeypatch.setattr(reporting.jax, "process_index", lambda: 1)
    caplog.set_level(logging.INFO, logger="jaxsft")
    term = Terminal()
    p = Progress(total=4, initial=0, stream=term)
    p.tick(1)
    p.update(2, ROW)
    p.close()
    assert p.bar is None and not caplog.records and term.getvalue() == ""
