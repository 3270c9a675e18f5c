"""Report: `python -m jaxsft.report --workdir W` prints a summary of W/metrics.jsonl and writes W/report.png
(train loss and eval-metric curves). Training runs it at the end of every run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from jaxsft import cli, fs
from jaxsft.errors import UserError, run_cli

NOT_CURVES = {"eval_seconds"}  # bookkeeping, not a metric


def read_events(workdir: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train rows, eval rows) by step; after a resume the rerun's rows replace the first run's of the same step."""
    path = fs.path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"--workdir {workdir}: no metrics.jsonl, so nothing to report (has a run logged there?)")
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a last line cut short by a kill
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        if "loss" in row:
            train[int(row["step"])] = row
        if any(k.startswith("eval_") for k in row):
            evals[int(row["step"])] = row
    if not train and not evals:
        raise UserError(f"--workdir {workdir}: {path} holds no train or eval events")
    return dict(sorted(train.items())), dict(sorted(evals.items()))


def run_rows(workdir: str | Path) -> list[dict]:
    """The rows a run writes besides its events: `run_started` (one per start, resumes included) and
    `compile_seconds`."""
    rows = []
    for line in (fs.path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and ("run_started" in row or "compile_seconds" in row):
            rows.append(row)
    return rows


def eval_metric_names(evals: dict[int, dict]) -> list[str]:
    names = {k for row in evals.values() for k, v in row.items() if k.startswith("eval_") and k not in NOT_CURVES
             and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(names, key=lambda k: (k != "eval_loss", k))


def _target(workdir: Path, names: list[str]) -> tuple[str | None, str]:
    """The run's checkpoint metric and mode (from W/config.json), else eval_loss / min."""
    try:
        config = json.loads((workdir / "config.json").read_text())
        metric, mode = config.get("checkpoint_metric"), config.get("checkpoint_mode") or "max"
    except (OSError, ValueError):
        metric, mode = None, "max"
    if metric in names:
        return metric, mode
    return ("eval_loss", "min") if "eval_loss" in names else (names[0] if names else None, "max")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def summary_lines(workdir: str | Path) -> list[str]:
    """A short table: steps, final train loss, best eval metric and its step, last eval, wall time."""
    workdir = fs.path(workdir)
    train, evals = read_events(workdir)
    rows = [("steps", str(max([*train, *evals])))]
    if train:
        last = train[max(train)]
        rows.append(("final train loss", f"{_fmt(last['loss'])} (step {last['step']})"))
        if "skipped_updates" in last:
            rows.append(("skipped updates", str(last["skipped_updates"])))
    names = eval_metric_names(evals)
    metric, mode = _target(workdir, names)
    if metric is not None:
        scored = [(row[metric], step) for step, row in evals.items() if isinstance(row.get(metric), (int, float))]
        value, step = (max if mode == "max" else min)(scored, key=lambda t: t[0]) if scored else (None, None)
        if value is not None:
            rows.append((f"best {metric} ({mode})", f"{_fmt(value)} (step {step})"))
        last = evals[max(evals)]
        rows.append((f"last eval (step {last['step']})", " ".join(f"{k}={_fmt(last[k])}" for k in names if k in last)))
    times = [row["time"] for row in [*train.values(), *evals.values()] if isinstance(row.get("time"), (int, float))]
    extra = run_rows(workdir)
    starts = [row["run_started"] for row in extra if isinstance(row.get("run_started"), (int, float))]
    compiled = sum(row.get("compile_seconds", 0) for row in extra)
    if times and starts:  # the whole run: loading, compilation and training (each start to its last event)
        seconds = int(max(times) - min(starts))
        note = f"(start to last event; compilation {compiled:.0f} s)" if compiled else "(start to last event)"
        rows.append(("wall time", f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} {note}"))
    elif len(times) >= 2:  # workdirs from before the start row
        seconds = int(max(times) - min(times))
        rows.append(("wall time", f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} "
                                  "(first to last event)"))
    width = max(len(k) for k, _ in rows)
    return [f"run report for {workdir}", *(f"  {k:<{width}}  {v}" for k, v in rows)]


def plot(workdir: str | Path) -> Path:
    """Writes W/report.png: train loss (with eval_loss) and one panel per other eval metric."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    workdir = fs.path(workdir)
    train, evals = read_events(workdir)
    others = [k for k in eval_metric_names(evals) if k != "eval_loss"][:8]
    panels = 1 + len(others)
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    ax = axes[0]
    if train:
        ax.plot(list(train), [r["loss"] for r in train.values()], label="train loss", lw=1)
    loss_steps = [s for s, r in evals.items() if isinstance(r.get("eval_loss"), (int, float))]
    if loss_steps:
        ax.plot(loss_steps, [evals[s]["eval_loss"] for s in loss_steps], "o-", label="eval_loss", ms=3)
    ax.set(title="loss", xlabel="step")
    ax.legend()
    for ax, name in zip(axes[1:], others):
        steps = [s for s, r in evals.items() if isinstance(r.get(name), (int, float))]
        ax.plot(steps, [evals[s][name] for s in steps], "o-", ms=3)
        ax.set(title=name, xlabel="step")
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(str(workdir))
    out = workdir / "report.png"
    if fs.is_remote(out):  # matplotlib writes local files or streams
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        out.write_bytes(buf.getvalue())
    else:
        fig.savefig(out, dpi=100)
    return out


def main(argv: list[str]) -> int:
    p = cli.parser("jaxsft.report", __doc__)
    p.add_argument("--workdir", required=True, help="a run folder with metrics.jsonl")
    args = p.parse_args(argv)
    print("\n".join(summary_lines(args.workdir)), flush=True)
    print(f"wrote {plot(args.workdir)}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
