"""What a run shows: metrics.jsonl events, a progress bar (plain lines when not on a terminal), a summary."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import jax

from jaxsft import fs

log = logging.getLogger("jaxsft")


class MetricsWriter:
    """Appends one JSON object per event (always with `step` and `time`) to W/metrics.jsonl and every numeric
    value to TensorBoard event files in W/tensorboard/ (tensorboardX, no TensorFlow); process 0 only.

    A `gs://` workdir has no append: the rows are kept in memory (after those already in the object, read first
    so a resumed run loses nothing) and the object is written whole at most every `REMOTE_FLUSH_SECONDS` (GCS
    allows about one write per second to an object), on `flush()` and on `close()`; TensorBoard events are
    written to a local temp folder and copied up whole at the same moments."""

    REMOTE_FLUSH_SECONDS = 5.0

    def __init__(self, path: Path, *, report_to=("tensorboard",), wandb_project: str | None = None,
                 run_config: dict | None = None):
        self.path = fs.path(path)
        self.wb = None  # a wandb run, when report_to has "wandb"
        self.remote = fs.is_remote(self.path)
        self.enabled = jax.process_index() == 0
        self.tb = None
        self._rows: bytearray | None = None  # remote: the whole object's content
        self._tb_local: Path | None = None  # remote: where tensorboardX writes before the copy up
        self._uploaded = 0.0
        if self.enabled and self.remote:
            self._rows = bytearray(self.path.read_bytes() if self.path.exists() else b"")
            if self._rows and not self._rows.endswith(b"\n"):  # a row cut short by a kill
                self._rows += b"\n"
        elif self.enabled and self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb+") as f:  # a row cut short by a kill: the next one starts on a line of its own
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        if self.enabled and "wandb" in report_to:
            self.wb = _wandb_run(self.path.parent, wandb_project, run_config)
        if self.enabled and "tensorboard" in report_to:
            try:
                from tensorboardX import SummaryWriter

                if self.remote:
                    import tempfile

                    self._tb_local = Path(tempfile.mkdtemp(prefix="jaxsft-tensorboard-"))
                self.tb = SummaryWriter(str(self._tb_local or self.path.parent / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - TensorBoard is a view; metrics.jsonl stays the record
                log.warning("warning: no TensorBoard events (%s: %s)", type(e).__name__, e)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        now = time.time()
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}, "time": round(now, 3)}
        if self.remote:
            self._rows += (json.dumps(row) + "\n").encode()
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, global_step=int(step), walltime=now)
            self.tb.flush()
        if self.wb is not None and numbers:
            self.wb.log(numbers, step=int(step))
        if self.remote and now - self._uploaded >= self.REMOTE_FLUSH_SECONDS:
            self.flush()

    def write_generations(self, step: int, rows: list[dict]) -> None:
        """The completions decoded at an evaluation: W/generations/step_N.jsonl (one JSON row each) and TensorBoard
        text (`eval_generations`, a markdown table of the first 20)."""
        if not self.enabled or not rows:
            return
        folder = self.path.parent / "generations"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"step_{int(step)}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if self.tb is not None:
            cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")[:500]  # noqa: E731
            table = "| prompt | reference | completion |\n| --- | --- | --- |\n" + "".join(
                f"| {cell(r.get('prompt', ''))} | {cell(r.get('reference', ''))} | {cell(r.get('completion', ''))} |\n"
                for r in rows[:20])
            self.tb.add_text("eval_generations", table, global_step=int(step))
            self.tb.flush()
        if self.wb is not None:
            import wandb

            columns = ["index", "prompt", "reference", "completion"]
            self.wb.log({"eval_generations": wandb.Table(columns=columns, data=[[r.get(c) for c in columns]
                                                                               for r in rows])}, step=int(step))

    def flush(self) -> None:
        """Remote: writes metrics.jsonl and the TensorBoard event files whole (local files are always current)."""
        if not (self.enabled and self.remote):
            return
        self.path.write_bytes(bytes(self._rows))
        if self._tb_local is not None:
            if self.tb is not None:
                self.tb.flush()
            fs.upload_folder(self._tb_local, self.path.parent / "tensorboard")
        self._uploaded = time.time()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wb is not None:
            self.wb.finish()
            self.wb = None
        self.flush()
        if self._tb_local is not None:
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None
        self.enabled = self.enabled and not self.remote  # remote: nothing more is written after close


def _wandb_run(workdir, project: str | None, run_config: dict | None):
    """A W&B run for this workdir: its id is kept in W/wandb_run_id, so a resumed run continues it (resume="allow");
    WANDB_MODE / WANDB_ENTITY / WANDB_DIR work as usual (W&B's files go to W/wandb unless WANDB_DIR says). A local
    workdir only holds them; a gs:// one keeps just the id."""
    import wandb

    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    if not id_file.exists():
        id_file.write_text(run_id + "\n")
    local = None if fs.is_remote(workdir) else str(workdir)
    if local and not os.environ.get("WANDB_DIR"):
        os.makedirs(os.path.join(local, "wandb"), exist_ok=True)
    where = None if os.environ.get("WANDB_DIR") else local
    return wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "jaxsft", id=run_id, resume="allow",
                      name=os.path.basename(str(workdir).rstrip("/")), dir=where, config=run_config,
                      settings=wandb.Settings(silent=True))


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


class Progress:
    """What a run shows while it trains: step/total, loss, tokens/s (examples/s when there are no token counts),
    the last eval metric and the ETA.

    On a terminal (the stream the bar is drawn on, stderr, is a tty) that is a tqdm bar that advances every step
    (`tick`), with the numbers as its postfix; log lines go above the bar instead of through it. Otherwise (CI,
    `2> log`) it is one plain log line per `update`, e.g.
    `step 40/200 loss=0.6012 tokens/s=5873 examples/s=193.4 eval_accuracy=0.8214 (step 20) eta=1:05`.
    Only process 0 shows anything."""

    def __init__(self, total: int, initial: int, unit: str = "step", *, stream=None):
        self.total, self.unit = int(total), unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = jax.process_index() == 0
        self.tty = self.enabled and _isatty(self.stream)
        self.start_step, self.start_time = int(initial), time.time()
        self._first: tuple[int, float] | None = None  # (step, time) of the first update: the rate excludes compiling
        self.eval_metric: tuple[str, float, int] | None = None  # (name, value, step)
        self._row: dict = {}
        self.bar = None
        self._redirect = None
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.total, initial=self.start_step, desc="train", unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=True)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar, not through it
            self._redirect.__enter__()

    def tick(self, step: int) -> None:
        """The bar follows every step (cheap: tqdm redraws at most ~10 times a second); a no-op off a terminal."""
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def set_eval(self, step: int, name: str, value) -> None:
        """The newest eval metric (shown from now on)."""
        if value is None:
            return
        self.eval_metric = (name, float(value), int(step))
        if self.bar is not None:
            self.bar.set_postfix(self._postfix(), refresh=True)

    def update(self, step: int, row: dict) -> None:
        """A train event (`loss`, `tokens_per_second`, `examples_per_second` as in metrics.jsonl)."""
        if not self.enabled:
            return
        self._row = row
        now = time.time()
        if self._first is None:
            self._first = (step, now)
        if self.bar is not None:
            self.tick(step)
            self.bar.set_postfix(self._postfix(), refresh=True)
            return
        parts = [f"step {step}/{self.total}"]
        if row.get("loss") is not None:
            parts.append(f"loss={row['loss']:.4f}")
        if row.get("tokens_per_second") is not None:
            parts.append(f"tokens/s={row['tokens_per_second']:.0f}")
        if row.get("examples_per_second") is not None:
            parts.append(f"examples/s={row['examples_per_second']:.1f}")
        if self.eval_metric is not None:
            name, value, at = self.eval_metric
            parts.append(f"{name}={value:.4f} (step {at})")
        parts.append(f"eta={_fmt_time(self.eta(step, now))}")
        log.info("%s", " ".join(parts))

    def eta(self, step: int, now: float | None = None) -> float:
        """Seconds left at the average pace since the first update (else since the start); NaN if unknown."""
        now = time.time() if now is None else now
        s0, t0 = self._first if self._first is not None and step > self._first[0] else (self.start_step,
                                                                                          self.start_time)
        done = step - s0
        if step >= self.total:
            return 0.0
        return (now - t0) / done * (self.total - step) if done > 0 else float("nan")

    def _postfix(self) -> dict:
        row, out = self._row, {}
        if row.get("loss") is not None:
            out["loss"] = f"{row['loss']:.4f}"
        if row.get("tokens_per_second") is not None:
            out["tok/s"] = f"{row['tokens_per_second']:.0f}"
        elif row.get("examples_per_second") is not None:
            out["ex/s"] = f"{row['examples_per_second']:.1f}"
        if self.eval_metric is not None:
            out[self.eval_metric[0]] = f"{self.eval_metric[1]:.4f}"
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def _isatty(stream) -> bool:
    """A terminal a bar can be drawn on: a tty, and not one of 0 columns (a pty nobody sized, where tqdm
    would print nothing at all)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # no real fd (a test's fake terminal)
        return True


def _fmt_time(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
