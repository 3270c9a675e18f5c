"""Early stopping on the checkpoint metric: the count and best equal transformers' EarlyStoppingCallback (with
Trainer's best_metric) eval for eval; end to end it stops with a checkpoint, survives a crash, and a rerun of the
same command trains no further; a patience without evaluation data is refused before anything is written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, synthetic_rows, write_tsv

from jaxsft.train import EarlyStopping

SEQUENCES = [
    [0.5, 0.6, 0.6, 0.61, 0.55, 0.7, 0.7, 0.69, 0.8, 0.8, 0.75, 0.9, 0.5, 0.5, 0.91],
    [0.9, 0.8, 0.8, 0.79, 0.85, 0.5, 0.49, 0.52, 0.3, 0.3, 0.31, 0.1, 0.7, 0.7, 0.09],
    [math.nan, 0.4, math.nan, 0.4, 0.45, 0.3, 0.6, 0.6],  # NaN: never better; first, it leaves best at -inf / inf
]


def transformers_trace(values, mode, threshold, patience):
    """(counter, best, should_training_stop) after each evaluation, as transformers' Trainer has them: the callback
    sees the previous best in on_evaluate, then Trainer._determine_best_metric updates state.best_metric."""
    pytest.importorskip("torch")
    from transformers import EarlyStoppingCallback, Trainer, TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", metric_for_best_model="accuracy", greater_is_better=mode == "max",
                             eval_strategy="steps", report_to=[])
    state, control = TrainerState(), TrainerControl()
    callback = EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)
    trainer = SimpleNamespace(args=args, state=state)  # all that _determine_best_metric reads
    trace = []
    for step, value in enumerate(values, 1):
        state.global_step = step
        metrics = {"eval_accuracy": value}
        callback.on_evaluate(args, state, control, metrics=metrics)
        Trainer._determine_best_metric(trainer, metrics=metrics, trial=None)
        trace.append((callback.early_stopping_patience_counter, state.best_metric, control.should_training_stop))
    return trace


@pytest.mark.parametrize("threshold", [0.0, 0.05])
@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("values", SEQUENCES, ids=["rising", "falling", "nan"])
def test_count_and_best_equal_transformers_early_stopping_callback(values, mode, threshold):
    for patience in (1, 2, 3):
        want = transformers_trace(values, mode, threshold, patience)
        ours, got, stopped = EarlyStopping(patience, threshold, mode), [], False
        for value in values:
            stopped = ours.update(value) or stopped
            got.append((ours.counter, ours.best, stopped))
            # a resume: the count and best from a checkpoint's meta carry on exactly
            ours = EarlyStopping(patience, threshold, mode, best=ours.best, counter=ours.counter)
        assert got == want, (patience, got, want)
    assert EarlyStopping(0, threshold, mode, counter=100).stop is False  # patience 0: off


def cli(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "jaxsft.run", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("early_data")
    return write_tsv(d / "train.tsv", synthetic_rows(120, 1)), write_tsv(d / "eval.tsv", synthetic_rows(40, 2))


def rows(workdir, key):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_run_stops_early_with_a_checkpoint_resumes_its_count_and_a_rerun_trains_no_further(tiny_bert, data,
                                                                                            tmp_path):
    # A threshold no evaluation can beat: the first eval (step 2) sets the best, those at 3 (a checkpoint) and 4
    # do not improve, so patience 2 stops at step 4, not a checkpoint step of its own, of max_steps 20.
    w = tmp_path / "run"
    args = ["--config", "configs/classify.py", "--workdir", w, f"--config.model.name_or_path={tiny_bert}",
            f"--config.data.train={data[0]}", f"--config.data.eval={data[1]}", "--config.max_length=64",
            "--config.batch_size=8", "--config.max_steps=20", "--config.eval_every_steps=2",
            "--config.checkpoint_every_steps=3", "--config.early_stopping_patience=2",
            "--config.early_stopping_threshold=1e9", "--config.log_every_steps=1"]
    crashed = cli(*args, env_extra={"JAXSFT_FAIL_AFTER_STEP": "3"})  # after step 3's checkpoint (count 1)
    assert crashed.returncode != 0 and "injected failure after step 3" in crashed.stderr, crashed.stderr[-3000:]

    r = cli(*args)  # resumes at step 3 with its count: stops at step 4 (a fresh count would run to step 8)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["early_stopped_at"] == final["step"] == 4
    assert "early stopping at step 4: eval_accuracy has not improved by more than 1000000000.0 for 2 evaluations " \
           "(best " in r.stderr and "run report for" in r.stderr
    accuracy = {e["step"]: e["eval_accuracy"] for e in rows(w, "eval_accuracy")}
    assert sorted(accuracy) == [2, 3, 4]
    [stop_row] = rows(w, "early_stopped")
    assert stop_row["step"] == 4 and stop_row["early_stopped"] is True
    assert stop_row["early_stopping_best"] == max(accuracy[2], accuracy[3], accuracy[4])
    assert max(e["step"] for e in rows(w, "loss")) == 4

    from jaxsft.checkpoint import Checkpoints

    ckpts = Checkpoints(w / "checkpoints", read_only=True)
    assert ckpts.steps()[-1] == 4
    meta = ckpts.read_meta(4)
    assert meta["early_stopped_at"] == 4 and meta["early_stopping"]["counter"] == 2
    assert meta["early_stopping"]["best"] == stop_row["early_stopping_best"]

    again = cli(*args)  # the same command: nothing trained, the same result
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the run stopped early at step 4" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["early_stopped_at"] == 4
    assert Checkpoints(w / "checkpoints", read_only=True).steps()[-1] == 4
    assert max(e["step"] for e in rows(w, "loss")) == 4 and len(rows(w, "early_stopped")) == 1


def test_patience_without_eval_data_is_one_line_before_writing(tiny_bert, data, tmp_path):
    w = tmp_path / "run"
    r = cli("--config", "configs/classify.py", "--workdir", w, f"--config.model.name_or_path={tiny_bert}",
            f"--config.data.train={data[0]}", "--config.data.eval=", "--config.early_stopping_patience=3")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == (
        "error: config.early_stopping_patience=3 needs evaluation data, but config.data.eval is not set (nor "
        "data.eval_fraction); set one, or early_stopping_patience=0")
    assert "Traceback" not in r.stderr and not w.exists()
