"""What a run records beside its config: W/environment.json (versions, devices, command line, host, time), and
the data it accepted but reports — empty texts, examples cut at max_length, duplicate examples — counted in the
log and in a metrics.jsonl row at step 0."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from datetime import datetime

import jax
import pytest
from conftest import ROOT, llm_tokenizer, minilm_path, seq2seq_tokenizer, synthetic_rows, write_tsv
from helpers import run_args

from jaxsft import run as run_lib
from jaxsft import train as train_lib
from jaxsft.defaults import base_config
from jaxsft.errors import run_cli

datasets = pytest.importorskip("datasets")
VERSIONS = ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers")


def test_environment_names_versions_devices_command_host_and_time(monkeypatch):
    import flax
    import optax
    import transformers

    argv = ["/x/jaxsft/run.py", "--config", "configs/classify.py", "--workdir", "W"]
    monkeypatch.setattr(sys, "argv", argv)
    env = json.loads(json.dumps(train_lib.environment()))  # as written: plain JSON
    v = env["versions"]
    assert all(v[k] for k in VERSIONS), v
    assert (v["jax"], v["flax"], v["optax"], v["transformers"]) == (jax.__version__, flax.__version__,
                                                                     optax.__version__, transformers.__version__)
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    devices = jax.devices()
    assert (env["platform"], env["device_kind"], env["device_count"], env["process_count"]) == \
        (devices[0].platform, devices[0].device_kind, len(devices), jax.process_count())
    assert len(env["devices"]) == len(devices) and env["devices"][0]["platform"] == devices[0].platform
    assert env["command"] == [sys.executable, *argv] and env["hostname"] == socket.gethostname()
    assert abs(datetime.fromisoformat(env["time"]).timestamp() - time.time()) < 60


# --- accepted but reported ----------------------------------------------------------------------------------------

def classification_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Synthetic rows plus 2 empty texts, 2 texts far over 64 tokens, and 3 repeated rows."""
    rows = synthetic_rows(n, seed) + [("", "positive"), ("", "negative"), (" ".join(["good"] * 100), "positive"),
                                      (" ".join(["bad film"] * 60), "negative")]
    return rows + rows[:3]


def duplicates(rows) -> int:
    return len(rows) - len(set(rows))


def test_each_task_counts_empty_truncated_and_duplicate_examples():
    import transformers as tf

    from jaxsft.tasks import causal_lm, classification, seq2seq

    c = base_config()
    c.max_length, c.data.label_names = 64, ["negative", "positive"]
    c.model.num_labels = 2
    rows = classification_rows(20, 1)
    ds = datasets.Dataset.from_dict({"sentence": [r[0] for r in rows], "label": [r[1] for r in rows]})
    f = classification.featurize(ds, tf.AutoTokenizer.from_pretrained(minilm_path()), c, "data.train", "rows",
                                 need_labels=True)
    assert (f.num_empty, f.num_truncated, f.num_duplicates) == (2, 2, duplicates(rows)) and duplicates(rows) >= 3
    assert train_lib.data_counts(f, None) == {"data_train_empty": 2, "data_train_truncated": 2,
                                              "data_train_duplicates": duplicates(rows)}

    c = base_config()
    c.task, c.max_length, c.data.packing = "causal_lm", 96, True
    alpaca = [{"instruction": "Say hi", "input": "", "output": "hi"},
              {"instruction": "Say hi", "input": "", "output": "hello"},  # same prompt, another answer: not equal
              {"instruction": "Count", "input": "", "output": " ".join(["one"] * 100)},  # cut at 96
              {"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Say hi", "input": "",
                                                                      "output": "hi"}]
    f = causal_lm.featurize(datasets.Dataset.from_list(alpaca), llm_tokenizer(), c, "data.train", "rows")
    assert (f.num_truncated, f.num_duplicates) == (1, 2)

    c = base_config()
    c.task, c.max_length = "seq2seq", 16
    pairs = [("a dog", "ein hund"), ("a dog", "ein Hund"), ("", "leer"), ("a dog", "ein hund"),
             (" ".join(["dog"] * 40), "hund")]
    ds = datasets.Dataset.from_dict({"source": [p[0] for p in pairs], "target": [p[1] for p in pairs]})
    f = seq2seq.featurize(ds, seq2seq_tokenizer(), c, "data.train", "rows")
    assert (f.num_empty, f.num_truncated, f.num_duplicates) == (1, 1, 1)
    assert train_lib.data_counts(None, f) == {"data_eval_empty": 1, "data_eval_truncated": 1,
                                              "data_eval_duplicates": 1}


@pytest.mark.slow  # ~20 s: a 2-step run through the CLI entry point
def test_a_run_writes_environment_json_and_a_step_0_row_of_data_counts(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    handlers, level = logging.root.handlers[:], logging.root.level
    train_rows, eval_rows = classification_rows(40, 1), classification_rows(12, 2)[:-2]  # eval: 1 repeat
    train = write_tsv(tmp_path / "train.tsv", train_rows)
    evals = write_tsv(tmp_path / "eval.tsv", eval_rows)
    w = tmp_path / "w"
    argv = run_args(tiny_bert, train, evals, w, "--config.max_steps=2", "--config.data.buckets=[64]")[2:]
    monkeypatch.setattr(sys, "argv", [str(ROOT / "jaxsft" / "run.py"), *argv])
    try:
        with pytest.raises(SystemExit) as e:
            run_cli(run_lib.main, argv)
    finally:
        logging.root.handlers[:], logging.root.level = handlers, level
    assert e.value.code == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert f"data.train: 2 empty texts, 2 examples cut at max_length=64, {duplicates(train_rows)} duplicate " \
           "examples (kept)" in err, err[-3000:]

    rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["run_started"] <= rows[0]["time"]  # the report's wall time counts from the run's start
    assert rows[0] == {"step": 0, "time": rows[0]["time"], "run_started": rows[0]["run_started"],
                       "data_train_empty": 2, "data_train_truncated": 2,
                       "data_train_duplicates": duplicates(train_rows), "data_eval_empty": 2,
                       "data_eval_truncated": 2, "data_eval_duplicates": duplicates(eval_rows)}
    assert duplicates(eval_rows) >= 1 and [r["step"] for r in rows if "loss" in r] == [1, 2]

    env = json.loads((w / "environment.json").read_text())
    assert (w / "config.json").is_file() and all(env["versions"][k] for k in VERSIONS)
    assert env["command"] == [sys.executable, str(ROOT / "jaxsft" / "run.py"), *argv]
    assert env["device_count"] == len(env["devices"]) >= 1 and env["platform"] == "cpu"
