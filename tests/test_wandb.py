"""Weights & Biases logging (report_to=wandb) in offline mode: the run's metrics land in W&B's own run file with
their steps, a resumed run continues the same W&B run, report_to without tensorboard writes no event files, and bad
destinations are one line. The offline run file (W/wandb/offline-run-*/run-ID.wandb) is read back as W&B writes it:
LevelDB-log records of wandb_internal_pb2.Record."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_classifier, synthetic_rows, write_tsv

from jaxsft import config as config_lib
from jaxsft.defaults import base_config
from jaxsft.errors import UserError

wandb = pytest.importorskip("wandb")
ROOT = Path(__file__).resolve().parents[1]


def wandb_records(path: Path):
    """(kind, record) of each record of a .wandb file: a 7-byte header, then 32 KiB blocks of LevelDB-log chunks
    (crc32 4, length 2, type 1: full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf + chunk if kind == 4 else chunk)
            out.append((r.WhichOneof("record_type"), r))
        elif kind in (2, 3):
            buf = chunk if kind == 2 else buf + chunk
    return out


def history(run_file: Path) -> dict[int, dict]:
    rows = {}
    for kind, r in wandb_records(run_file):
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


def run_cli(*args, extra_env=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", **(extra_env or {})}
    env.pop("WANDB_DIR", None)
    return subprocess.run([sys.executable, "-m", "jaxsft.run", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def test_bad_destinations_are_one_line():
    c = base_config()
    c.report_to = ["tensorboard", "mlflow"]
    with pytest.raises(UserError, match=r"^config\.report_to: unknown destination 'mlflow' \(tensorboard, wandb\)$"):
        config_lib.check_values(c)


@pytest.mark.slow
def test_classification_run_logs_to_wandb_offline_and_resume_continues_the_run(tmp_path):
    model = make_tiny_classifier(tmp_path / "m", dropout=0.0)
    rows = synthetic_rows(96)
    train, evals = write_tsv(tmp_path / "train.tsv", rows[:64]), write_tsv(tmp_path / "eval.tsv", rows[64:])
    w = tmp_path / "w"
    common = ["--config", "configs/classify.py", "--workdir", w, f"--config.model.name_or_path={model}",
              f"--config.data.train={train}", f"--config.data.eval={evals}", "--config.batch_size=16",
              "--config.log_every_steps=2", "--config.eval_every_steps=4", "--config.report_to=wandb",
              "--config.wandb_project=jaxsft-test"]
    p = run_cli(*common, "--config.max_steps=4")
    assert p.returncode == 0, p.stderr[-2000:]
    run_id = (w / "wandb_run_id").read_text().strip()
    p = run_cli(*common, "--config.max_steps=8")  # resumes from step 4: the same W&B run goes on
    assert p.returncode == 0, p.stderr[-2000:]
    files = sorted(w.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, list(w.rglob("*.wandb"))  # one file per process, both of run `run_id`
    first, second = history(files[0]), history(files[1])
    metrics = [json.loads(ln) for ln in (w / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        if "loss" in row or "eval_accuracy" in row:
            logged = (first if row["step"] <= 4 else second)[row["step"]]
            for k in ("loss", "learning_rate", "eval_accuracy", "eval_loss"):
                if k in row:
                    assert logged[k] == pytest.approx(row[k]), (row["step"], k)
    assert sorted(s for s in second if s > 4) == [6, 8]
    runs = [r for f in files for kind, r in wandb_records(f) if kind == "run"]
    assert {r.run.run_id for r in runs} == {run_id} and {r.run.project for r in runs} == {"jaxsft-test"}
    lr = [json.loads(u.value_json) for u in runs[0].run.config.update if u.key == "learning_rate"]
    assert lr == [json.loads((w / "config.json").read_text())["learning_rate"]]  # the run's config travels
    assert not (w / "tensorboard").exists()  # report_to without tensorboard: no event files
