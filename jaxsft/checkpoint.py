"""Orbax checkpoints of a run: params, optimizer state and a JSON record (step, data position, loss
accumulator, eval metrics). Keeps the newest N plus the best by `checkpoint_metric`; restores fall back past
unreadable checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger("jaxsft")


class Checkpoints:
    def __init__(self, directory: Path, *, keep: int = 2, metric: str | None = None, mode: str = "max",
                 read_only: bool = False):
        self.metric, self.mode, self.directory = metric, mode, Path(directory)
        policies = [pp.LatestN(n=max(int(keep), 1))]
        if metric:
            policies.append(pp.BestN(get_metric_fn=lambda m: m[metric], reverse=(mode == "min"), n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(preservation_policy=pp.AnyPreservationPolicy(policies),
                                               enable_async_checkpointing=False, read_only=read_only,
                                               create=not read_only)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
        usable = metrics if metrics and self.metric in metrics else None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=usable, force=True)
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state) -> tuple[dict, dict] | None:
        """The newest checkpoint that restores; a broken one is skipped with a warning naming the problem."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                log.warning("warning: checkpoint at step %d is unreadable (%s: %s); trying an older one",
                            step, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None

    def best_step(self) -> int | None:
        """The best kept step by the metric recorded with it, else the newest."""
        steps = self.steps()
        if not steps:
            return None
        scored = []
        for s in steps:
            try:
                meta = self.read_meta(s)
            except Exception:  # noqa: BLE001
                continue
            if meta.get("stopped_by"):  # saved on a signal: its eval metrics belong to an earlier step
                continue
            value = meta.get("eval_metrics", {}).get(self.metric)
            if value is not None:
                scored.append((value, s))
        if not scored:
            return steps[-1]
        sign = 1.0 if self.mode == "max" else -1.0
        return max(scored, key=lambda t: (sign * t[0], t[1]))[1]  # ties: the newer step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
