"""The operator's view: TensorBoard events with every logged scalar, and the end-of-run report (table + PNG)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import data, run, tiny_config

from jaxsft import report
from jaxsft import train as train_lib


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Tags → (step, value), read straight from the TFRecord framing (no TensorFlow, no tensorboard)."""
    from tensorboardX.proto import event_pb2

    out: dict = {}
    for f in folder.rglob("events.out.tfevents.*"):
        raw, i = f.read_bytes(), 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.mark.slow  # ~18 s
def test_a_run_writes_tensorboard_scalars_and_a_report(tiny_bert, tmp_path):
    w = tmp_path / "w"
    train_lib.train_and_evaluate(tiny_config(tiny_bert, *data(tmp_path), max_steps=4, eval_every_steps=2), w)
    scalars = tensorboard_scalars(w / "tensorboard")
    assert {"loss", "learning_rate", "grad_norm", "examples_per_second", "tokens_per_second", "eval_loss",
            "eval_accuracy", "eval_f1"} <= scalars.keys()
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4] and [s for s, _ in scalars["eval_accuracy"]] == [2, 4]
    png = (w / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    lines = report.summary_lines(w)
    assert any("best eval_accuracy (max)" in line for line in lines) and any("steps" in line for line in lines)


def test_report_on_a_workdir_without_metrics_exits_2_with_one_line(tmp_path):
    (tmp_path / "w").mkdir()
    proc = run(["-m", "jaxsft.report", "--workdir", str(tmp_path / "w")], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no metrics.jsonl" in lines[0] and str(tmp_path / "w") in lines[0]


def test_metrics_row_cut_by_a_kill_does_not_swallow_the_next(tmp_path):
    """kill -9 mid-write leaves half a line; the resumed run's rows start on lines of their own."""
    import json

    from jaxsft.reporting import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    writer = MetricsWriter(path)
    writer.write(3, {"loss": 0.5})
    writer.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"step": 2, "lo'
    assert json.loads(lines[2])["loss"] == 0.5
