"""What a run shows: metrics.jsonl events, a progress bar (plain lines when not on a terminal), a summary."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import jax

log = logging.getLogger("jaxsft")


class MetricsWriter:
    """Appends one JSON object per event (always with `step` and `time`) to W/metrics.jsonl and every numeric
    value to TensorBoard event files in W/tensorboard/ (tensorboardX, no TensorFlow); process 0 only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.enabled = jax.process_index() == 0
        self.tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - TensorBoard is a view; metrics.jsonl stays the record
                log.warning("warning: no TensorBoard events (%s: %s)", type(e).__name__, e)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        now = time.time()
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}, "time": round(now, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, global_step=int(step), walltime=now)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


class Progress:
    """Steps, loss, examples/s and ETA: a tqdm bar on a terminal, a log line per update otherwise."""

    def __init__(self, total: int, initial: int, unit: str = "ex"):
        self.total, self.unit = total, unit
        self.tty = sys.stderr.isatty() and jax.process_index() == 0
        self.start_step, self.start_time = initial, time.time()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=True)

    def update(self, step: int, info: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in info.items()},
                                 refresh=True)
            return
        if jax.process_index() != 0:
            return
        elapsed = time.time() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        log.info("step %d/%d %s eta=%s", step, self.total, parts, _fmt_time(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_time(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
