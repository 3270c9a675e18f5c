"""Orbax checkpoints of a run: params, optimizer state and a JSON record (step, data position, loss
accumulator, eval metrics). Keeps the newest N plus the best by `checkpoint_metric`.

Faults: Orbax writes a checkpoint into a temporary folder and commits it by renaming it, so a save cut short by a
crash leaves `N.orbax-checkpoint-tmp*`, which is never read; opening the folder for a run warns about it and
removes it. Every committed checkpoint gets `jaxsft_files.json` (each file's size); a restore first checks the
files against it, so a deleted or truncated file is named, and `restore_latest` falls back to the newest
checkpoint that restores, moving the damaged ones aside as `N.damaged`.

On a `gs://` workdir Orbax writes through TensorStore's GCS driver and commits a step by writing a marker file
instead of renaming (an object store has no atomic rename); the listing, manifest, cleanup and moves here go
through `jaxsft.fs` (a move is a copy then delete there)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxsft import fs
from jaxsft.errors import RunFailed

log = logging.getLogger("jaxsft")
MANIFEST = "jaxsft_files.json"
TMP_MARK = ".orbax-checkpoint-tmp"
_UNCHECKED = {MANIFEST, "_CHECKPOINT_METADATA"}  # Orbax may rewrite its step metadata after the commit
# Test hook: SIGKILL this process while saving this step, after its files are written but before Orbax commits it.
_KILL_DURING_SAVE = int(os.environ.get("JAXSFT_KILL_DURING_SAVE", "-1"))


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not match what was written, or that Orbax cannot restore."""


class Checkpoints:
    def __init__(self, directory: Path, *, keep: int = 2, metric: str | None = None, mode: str = "max",
                 read_only: bool = False):
        self.metric, self.mode, self.directory = metric, mode, fs.path(directory)
        self.read_only = read_only
        policies = [pp.LatestN(n=max(int(keep), 1))]
        if metric:
            policies.append(pp.BestN(get_metric_fn=lambda m: m[metric], reverse=(mode == "min"), n=1,
                                     keep_checkpoints_without_metrics=False))
        extra = {"temporary_path_class": _killing_temporary_path()} if _KILL_DURING_SAVE >= 0 else {}
        options = ocp.CheckpointManagerOptions(preservation_policy=pp.AnyPreservationPolicy(policies),
                                               enable_async_checkpointing=False, read_only=read_only,
                                               create=not read_only, **extra)
        where = self.directory if fs.is_remote(self.directory) else self.directory.absolute()
        self.manager = ocp.CheckpointManager(where, options=options,
                                             item_names=("state", "meta"))
        if not read_only and jax.process_index() == 0:
            self._remove_incomplete()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _remove_incomplete(self) -> None:
        """Removes, with a warning, what a save cut short left behind: Orbax never reads it, and it would be in
        the way of saving that step again."""
        if not self.directory.is_dir():
            return
        committed = {str(s) for s in self.manager.all_steps()}
        for p in sorted(self.directory.iterdir()):
            step = p.name.split(TMP_MARK)[0] if TMP_MARK in p.name else p.name
            if not p.is_dir() or not step.isdigit() or p.name in committed:
                continue
            if TMP_MARK in p.name:
                fs.rmtree(p)
                done = "removed"
            else:  # a step folder Orbax does not count as committed (e.g. no commit marker): kept, aside
                fs.rename(p, self._free_name(f"{step}.incomplete"))
                done = f"moved to {step}.incomplete"
            log.warning("warning: ignoring %s: an incomplete checkpoint of step %s (its save was cut short before "
                        "Orbax committed it); %s", p, step, done)

    def _free_name(self, name: str) -> Path:
        dst, n = self.directory / name, 0
        while dst.exists():
            n += 1
            dst = self.directory / f"{name}{n}"
        return dst

    def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
        usable = metrics if metrics and self.metric in metrics else None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=usable, force=True)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            self._write_manifest(step)

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _write_manifest(self, step: int) -> None:
        folder = self._step_dir(step)
        if not folder.is_dir():
            return
        files = {rel: size for rel, size in fs.file_sizes(folder).items() if rel.rsplit("/", 1)[-1] not in _UNCHECKED}
        # a crash here leaves no half-written list
        fs.write_bytes(folder / MANIFEST, (json.dumps({"step": step, "files": files}, indent=0) + "\n").encode())

    def verify(self, step: int) -> str | None:
        """What is wrong with the files of a checkpoint (None: they match the list written with it, or it has
        none: a crash right after the commit)."""
        folder = self._step_dir(step)
        listing = folder / MANIFEST
        if not listing.is_file():
            return None
        try:
            files = json.loads(listing.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its file list {MANIFEST} is unreadable ({type(e).__name__})"
        missing, wrong, found = [], [], fs.file_sizes(folder)  # one listing (one request on an object store)
        for rel, size in files.items():
            if rel not in found:
                missing.append(rel)
            elif found[rel] != size:
                wrong.append(f"{rel} is {found[rel]} bytes, not {size}" + (" (truncated)" if found[rel] < size else ""))
        problems = ([f"{len(missing)} file(s) missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"]
                    if missing else []) + wrong[:3]
        return "; ".join(problems) or None

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        problem = self.verify(step)
        if problem:
            raise DamagedCheckpoint(problem)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state) -> tuple[dict, dict] | None:
        """The newest checkpoint that restores; a damaged one is skipped with a warning naming its step and what
        is wrong, and moved aside (`N.damaged`) once an older one restores. None if there is no checkpoint;
        RunFailed if there are some but none restores."""
        failed: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                out = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                problem = str(e) if isinstance(e, DamagedCheckpoint) else describe(e)
                failed.append((step, problem))
                log.warning("warning: checkpoint at step %d (%s) is damaged: %s; trying an older one", step,
                            self._step_dir(step), problem)
                continue
            for bad, _ in failed:
                self._move_aside(bad)
            return out
        if failed:
            raise RunFailed(f"no checkpoint in {self.directory} restores ("
                            + "; ".join(f"step {s}: {p}" for s, p in failed) + f"); move {self.directory} away to "
                            "start the run over")
        return None

    def _move_aside(self, step: int) -> None:
        if self.read_only or jax.process_index() != 0:
            return
        dst = self._free_name(f"{step}.damaged")
        fs.rename(self._step_dir(step), dst)  # Orbax lists only folders named by a step number
        self.manager.reload()
        log.warning("warning: moved the damaged checkpoint of step %d to %s", step, dst)

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


def describe(e: BaseException) -> str:
    """One short line for an Orbax / TensorStore error (their messages run to pages of JSON)."""
    text = " ".join(str(e).split())
    for cut in (" See full TensorStore details", " [tensorstore_spec="):
        text = text.split(cut)[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _killing_temporary_path():
    """The JAXSFT_KILL_DURING_SAVE hook: Orbax's atomic-rename temp folder, but the process SIGKILLs itself
    just before committing that step (its files are written, the rename is not done)."""
    import signal

    base = ocp.path.atomicity.AtomicRenameTemporaryPath

    class KillBeforeCommit(base):
        async def finalize(self, *args, **kwargs):
            if self.get_final().name == str(_KILL_DURING_SAVE):
                os.write(2, f"JAXSFT_KILL_DURING_SAVE: SIGKILL while saving step {_KILL_DURING_SAVE}\n".encode())
                os.kill(os.getpid(), signal.SIGKILL)
            return await super().finalize(*args, **kwargs)

    return KillBeforeCommit


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
