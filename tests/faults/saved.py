"""Reading what a run left in its workdir, for the resume tests: checkpoints as numpy, metrics rows by step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsft.checkpoint import Checkpoints


def checkpoint(workdir: Path, step: int) -> tuple[dict[str, np.ndarray], dict]:
    """(state as {path: numpy array}, meta) of one checkpoint: params and optimizer state, restored as saved."""
    ck = Checkpoints(Path(workdir) / "checkpoints", read_only=True)
    out = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
    ck.close()
    flat = jax.tree_util.tree_flatten_with_path(out["state"])[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}, out["meta"]


def bitwise_differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Paths whose arrays differ in any bit (or in dtype / shape), or that only one side has."""
    diff = sorted(a.keys() ^ b.keys())
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            diff.append(k)
    return diff


def rows_by_step(workdir: Path, key: str) -> dict[int, dict]:
    """The metrics.jsonl rows that have `key`, by step; a rerun's row replaces the one before it (as the report
    reads them)."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row
    return out


def committed_steps(workdir: Path) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def wait_for_checkpoint(workdir: Path, proc, step: int, timeout: float = 300) -> None:
    """Polls W/checkpoints until a committed checkpoint of `step` or later exists; fails if the run ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s in committed_steps(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before step {step}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no checkpoint of step {step} in time")
