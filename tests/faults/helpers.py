"""What the fault tests share: a tiny classification run as a config or a `jaxsft.run` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, synthetic_rows, write_tsv

from jaxsft import config as config_lib

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def data(folder: Path, n_train: int = 64, n_eval: int = 16) -> tuple[Path, Path]:
    return (write_tsv(folder / "train.tsv", synthetic_rows(n_train, 1)),
            write_tsv(folder / "eval.tsv", synthetic_rows(n_eval, 2)))


def tiny_config(model, train, evals=None, **overrides):
    c = config_lib.load_config_file(str(ROOT / "configs" / "classify.py"))
    c.model.name_or_path, c.data.train, c.data.eval = str(model), str(train), str(evals or "")
    c.max_length, c.batch_size, c.learning_rate, c.log_every_steps, c.warmup_ratio = 64, 8, 1e-3, 1, 0.0
    for k, v in overrides.items():
        c[k] = v
    return c


def run_args(model, train, evals, workdir, *extra) -> list[str]:
    return ["-m", "jaxsft.run", "--config", "configs/classify.py", "--workdir", str(workdir),
            f"--config.model.name_or_path={model}", f"--config.data.train={train}", f"--config.data.eval={evals}",
            "--config.max_length=64", "--config.batch_size=8", "--config.learning_rate=1e-3",
            "--config.log_every_steps=1", *extra]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def wait_for_train_event(workdir: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Polls W/metrics.jsonl until a train row (`loss`) appears; fails if the run ends first."""
    path, deadline = Path(workdir) / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and any('"loss"' in line for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before a train event:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no train event in time")


def events(workdir: Path, key: str) -> list[dict]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]
