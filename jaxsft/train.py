"""train_and_evaluate(config, workdir): the one loop every task shares.

Order matters for "bad input never touches the workdir": everything is validated and loaded (config, data,
tokenizer, weights) before the first file is written.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shutil
import signal
import tempfile
import threading
import time
from datetime import UTC
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsft import compile_cache, fs, hf_io, optim, parallel, pipeline, precompile
from jaxsft import config as config_lib
from jaxsft.checkpoint import Checkpoints, abstract
from jaxsft.data import sharded
from jaxsft.data.batching import BatchPlan, padding_share
from jaxsft.errors import EXIT_FAILURE, EXIT_STOPPED, RunFailed, Stopped, UserError, first_line
from jaxsft.lock import WorkdirLock
from jaxsft.models import Functional, compute_dtype, layers, report_load
from jaxsft.reporting import MetricsWriter, Progress

log = logging.getLogger("jaxsft")
# Test hook: crash right after this step (and its checkpoint, if one is due), to exercise resume.
_FAIL_AFTER_STEP = int(os.environ.get("JAXSFT_FAIL_AFTER_STEP", "-1"))


def validate(config) -> None:
    """Checks that need no data or model: every key's value in range (config.check_values), a known task, dtype,
    optimizer, remat policy and data format."""
    task = pipeline.task_module(config)
    compute_dtype(config.dtype)
    config_lib.check_values(config)
    if config.model.remat not in layers.REMAT_POLICIES:
        raise UserError(f"config.model.remat must be one of {', '.join(layers.REMAT_POLICIES)}, "
                        f"got {config.model.remat!r}")
    formats = (*getattr(task, "FORMATS", ()), "translation")
    if config.task == "causal_lm" and config.data.format is not None and config.data.format not in formats:
        raise UserError(f"config.data.format must be one of {', '.join(formats)} (None: detected from the columns), "
                        f"got {config.data.format!r}")
    if config.checkpoint_mode not in (None, "max", "min"):
        raise UserError(f"config.checkpoint_mode must be 'max' or 'min', got {config.checkpoint_mode!r}")
    if config.get("optimizer", "adamw") not in optim.OPTIMIZERS:
        raise UserError(f"config.optimizer must be one of {', '.join(optim.OPTIMIZERS)}, got {config.optimizer!r}")
    if not config.model.name_or_path:
        raise UserError("config.model.name_or_path is not set")


RUN_FILES = ("config.json", "checkpoints", "metrics.jsonl", "hf", "tensorboard", "environment.json", "report.png")


def check_is_run_folder(workdir) -> None:
    """A workdir is new, empty, or a jaxsft run (its W/config.json is a jaxsft config); anything else (an HF
    model folder, a home folder, the current folder) is refused and left untouched."""
    p = fs.path(workdir)
    if not p.is_dir():
        return
    names = {c.name for c in p.iterdir() if not c.name.startswith(".")}  # .lock, .DS_Store, write probes
    if not names - set(RUN_FILES[1:]):  # empty, or a run's files before its config.json
        return
    saved = p / "config.json"
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and isinstance(old.get("model"), dict) and "task" in old:
            return
        what = "its config.json is not a jaxsft config (an HF model folder?)"
    else:
        listed = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        what = f"it holds other files ({listed}) and no jaxsft config.json"
    raise UserError(f"--workdir {workdir} is not empty and not a jaxsft run: {what}; give a new or empty folder")


def check_workdir(workdir: Path) -> None:
    """Fails early (before any loading) if the workdir cannot be a folder we write to: tried for real with a
    probe that is removed at once (permission bits say nothing for root, or under /proc); and if it is a folder
    that holds something other than a jaxsft run."""
    if fs.is_remote(workdir):
        _check_remote_workdir(workdir)
        return check_is_run_folder(workdir)
    p = Path(workdir)
    if p.exists() and not p.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a folder")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--workdir {workdir}: {parent} is a file, so the folder cannot be created")
    import tempfile

    try:
        if parent == p:
            fd, probe = tempfile.mkstemp(prefix=".jaxsft-write-check-", dir=p)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".jaxsft-write-check-", dir=parent))
    except OSError as e:
        what = "is not writable (creating a file in it" if parent == p else \
            f"cannot be created (making a folder in {parent}"
        raise UserError(f"--workdir {workdir} {what} failed: {e.strerror or type(e).__name__})") from None
    check_is_run_folder(p)


def _check_remote_workdir(workdir) -> None:
    """gs://: gcsfs installed, and the bucket reachable and writable (a probe object, removed at once)."""
    import socket

    try:
        p = fs.path(workdir)
    except UserError as e:
        raise UserError(f"--workdir {e}") from None
    probe = p / f".jaxsft-write-check-{socket.gethostname()}-{os.getpid()}"
    try:
        if p.is_file():
            raise UserError(f"--workdir {workdir} is an object, not a folder")
        probe.write_text("")
        probe.unlink()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - auth, no such bucket, no network: all one line
        text = first_line(e)[:200]
        raise UserError(f"--workdir {workdir} is not writable (writing {probe.name} failed: {type(e).__name__}: "
                        f"{text})") from None


def check_resume_config(workdir: Path, config, *, force: bool, unresolved: bool = False) -> None:
    """A workdir that holds a run (W/config.json): another task's run is refused outright (its checkpoints cannot
    resume this one, `force` or not); a change to a key that defines the run (model, data and fields, labels,
    tokenizer, max_length, batch size, optimizer, seed, LoRA, dtype) is refused as bad input, naming each
    `key: old → new`, unless `force`; schedule and bookkeeping keys (config.RESUMABLE) may change.
    Called before loading (`unresolved`: keys left to inference are skipped) and again once labels etc. are
    resolved, before anything is written."""
    saved = fs.path(workdir) / "config.json"
    if not saved.is_file():
        return
    try:
        old = json.loads(saved.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"--workdir {workdir}: cannot read {saved} ({type(e).__name__}: {e}); is this a jaxsft "
                        "workdir? use another --workdir") from None
    previous = old.get("task")
    if previous is not None and previous != config.task:
        raise UserError(f"--workdir {workdir} holds a task {previous!r} run ({saved}) but config.task is "
                        f"{config.task!r}: its checkpoints cannot resume a {config.task} run; use another --workdir")
    defining, allowed = config_lib.run_changes(old, config, unresolved=unresolved)
    if defining and not force:
        raise UserError(f"--workdir {workdir} holds a run with another config ({saved}); changed: "
                        f"{'; '.join(defining)}. Resume with the saved values, use another --workdir, or pass "
                        "--force to resume with the new ones")
    if unresolved:
        return
    if defining:
        log.warning("warning: --force: resuming %s with a changed config: %s", workdir, "; ".join(defining))
    if allowed:
        log.info("config changes since the last run in %s: %s", workdir, "; ".join(allowed))


def environment() -> dict:
    """What ran: library versions, devices, command line, host and time (W/environment.json)."""
    import platform
    import socket
    import sys
    from datetime import datetime
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    devices = jax.devices()
    return {
        "versions": {"python": platform.python_version(), **{d: version(d) for d in (
            "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "datasets",
            "numpy", "jaxsft")}},
        "platform": devices[0].platform, "device_kind": devices[0].device_kind, "device_count": len(devices),
        "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
        "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind, "process": d.process_index}
                    for d in devices],
        "command": [sys.executable, *sys.argv], "cwd": os.getcwd(), "hostname": socket.gethostname(),
        "pid": os.getpid(), "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def data_counts(train, evals) -> dict:
    """What the data holds that is accepted but reported: empty texts, examples cut at max_length, duplicates."""
    out = {}
    for what, f in (("train", train), ("eval", evals)):
        if f is not None:
            out.update({f"data_{what}_{k}": int(getattr(f, f"num_{k}", 0))
                        for k in ("empty", "truncated", "duplicates")})
    return out


def mesh_for(config):
    mesh = parallel.make_mesh(config.mesh)
    shards = parallel.data_shards(mesh)
    per_step = shards * config.gradient_accumulation_steps
    if config.batch_size % per_step:
        raise UserError(f"config.batch_size={config.batch_size} is not divisible by data x fsdp shards ({shards}) "
                        f"x gradient_accumulation_steps ({config.gradient_accumulation_steps})")
    return mesh


def make_train_step(functional, task, tx, config, mesh, state_shardings=None):
    """A pure, jitted step: (state, batch, step) → (state, {loss_sum, count, grad_norm, finite}); the state keeps
    `state_shardings` (parallel.state_shardings; None: replicated) and is donated, the batch is split over
    (data, fsdp).

    With `skip_nonfinite_updates`, a step whose loss or gradient norm is not finite leaves params and optimizer
    state unchanged and adds nothing to the loss sums; the host counts these steps from `finite`."""
    skip = bool(config.skip_nonfinite_updates)
    k = config.gradient_accumulation_steps
    key = jax.random.key(config.seed)

    def sums(params, frozen, batch, rng):
        if hasattr(task, "train_sums"):  # a task that computes its loss its own way (causal_lm: chunked CE)
            return task.train_sums(functional, {**frozen, **params}, batch, rng, config)
        logits = task.forward(functional.apply, {**frozen, **params}, batch, rng)
        return task.loss(logits, batch, config)

    def step(state, batch, step_no):
        with layers.activations_on(mesh):  # activations stay split over the batch axes (layers.split_batch)
            return _step(state, batch, step_no)

    def _step(state, batch, step_no):
        params, opt_state, frozen = state["params"], state["opt_state"], state.get("frozen", {})
        rng = jax.random.fold_in(key, step_no)
        grad_fn = jax.value_and_grad(lambda p, b, r: sums(p, frozen, b, r), has_aux=True)
        if k == 1:  # the mean's gradient directly: no extra pass dividing every gradient by the count

            def mean(p, b, r):
                ls, n = sums(p, frozen, b, r)
                return ls / jax.lax.stop_gradient(jnp.maximum(n, 1.0)), (ls, n)

            (_, (loss_sum, count)), grads = jax.value_and_grad(mean, has_aux=True)(params, batch, rng)
        else:
            # Strided micro-batches keep every device's rows inside each micro-batch.
            micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                i, mb = xs
                (ls, n), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
                return (carry[0] + ls, carry[1] + n, jax.tree.map(jnp.add, carry[2], g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            scalar = jnp.zeros((), jnp.float32)
            (loss_sum, count, grads), _ = jax.lax.scan(body, (scalar, scalar, zeros), (jnp.arange(k), micro))
            grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if skip:
            keep = lambda new, old: jnp.where(finite, new, old)
            new_params, new_opt_state = jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state,
                                                                                              opt_state)
            loss_sum, count = jnp.where(finite, loss_sum, 0.0), jnp.where(finite, count, 0.0)
        return pipeline.train_state(new_params, frozen, new_opt_state), {"loss_sum": loss_sum, "count": count,
                                                                         "grad_norm": grad_norm, "finite": finite}

    rep = parallel.replicated(mesh)
    state_sh = rep if state_shardings is None else state_shardings
    return jax.jit(step, in_shardings=(state_sh, parallel.batch_sharding(mesh), rep), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))


def _write_workdir_files(workdir: Path, config, hf_config, tokenizer, folder: Path) -> None:
    if jax.process_index() != 0:
        return
    remote = fs.is_remote(workdir)  # transformers saves to local folders: remote hf/ is uploaded from a temp one
    if not remote:
        workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    hf_dir = Path(tempfile.mkdtemp(prefix="jaxsft-hf-")) if remote else workdir / "hf"
    hf_config.save_pretrained(hf_dir)
    if config.data.chat_template:
        tokenizer.chat_template = config.data.chat_template
    tokenizer.save_pretrained(hf_dir)
    if (Path(folder) / "generation_config.json").is_file():
        shutil.copy(Path(folder) / "generation_config.json", hf_dir / "generation_config.json")
    if remote:
        fs.upload_folder(hf_dir, workdir / "hf")
        shutil.rmtree(hf_dir, ignore_errors=True)
    (workdir / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")


class _StopSignals:
    """SIGTERM/SIGINT set a flag the loop checks at step boundaries; a second one exits at once with code 1
    (Orbax commits a checkpoint by renaming a finished temp folder, so the newest complete one stays intact).

    In a multi-process run SIGTERM is left to JAX's preemption service (jax.distributed.initialize installs it):
    a notice on any host reaches all of them, and `multihost_utils.reached_preemption_sync_point` makes every
    process stop at the same step (`synced_stop`), so they save one checkpoint together; a process stopping alone
    would leave the others waiting in a collective. SIGINT keeps its default there (it ends that process; the
    others fail with an error rather than hang)."""

    def __init__(self):
        self.name: str | None = None
        self._previous: dict = {}
        self.multihost = jax.process_count() > 1
        # Until the loop starts (loading, tokenizing, compiling: minutes on a large set) a signal ends the process
        # at once: there is no step to finish and nothing to save, and compiler threads cannot be interrupted.
        self.loading = True
        self.writing = False  # the workdir's files are being written: a signal waits for the end of it

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and not self.multihost:  # main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def synced_stop(self, step: int) -> bool:
        """Multi-process: whether every process has reached the step a preemption notice (SIGTERM on any host)
        chose to stop at; call once per step, on every process. One process: whether a signal came."""
        if self.multihost and self.name is None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.name = "SIGTERM"
                log.warning("preemption notice: every process stops after step %d with a checkpoint", step)
        return self.name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.name is not None:
            os.write(2, f"error: second signal ({name}) while stopping: exited at once; the newest complete "
                        "checkpoint is kept\n".encode())
            os._exit(EXIT_FAILURE)
        self.name = name
        if self.loading and not self.writing:
            self.exit_loading()
        log.info("%s: stopping after the current step with a checkpoint (a second signal exits at once)", name)

    def exit_loading(self) -> None:
        if self.name is not None:
            name = self.name
            os.write(2, f"stopped on {name} before the first step (loading, tokenizing or compiling); nothing to "
                        "save — rerun the same command to start again\n".encode())
            os._exit(EXIT_STOPPED)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def _drain(pending: list, ckpts: Checkpoints, skip: bool) -> tuple[float, float, int, float]:
    """(loss_sum, count, skipped steps, last grad_norm) of the un-fetched step outputs; without `skip`, a
    non-finite step stops the run before anything of that state is saved."""
    vals = jax.device_get([out for _, out in pending])
    for (step_no, _), v in zip(pending, vals):
        if not skip and not v["finite"]:
            good = ckpts.steps()
            raise RunFailed(f"loss or gradient norm is not finite at step {step_no}, so the run stopped without "
                            f"saving it; last good checkpoint: {f'step {good[-1]}' if good else 'none'} in "
                            f"{ckpts.directory} (lower config.learning_rate, or set "
                            "config.skip_nonfinite_updates=True to skip such updates)")
    return (float(sum(v["loss_sum"] for v in vals)), float(sum(v["count"] for v in vals)),
            int(sum(not v["finite"] for v in vals)), float(vals[-1]["grad_norm"]))


class EarlyStopping:
    """transformers' EarlyStoppingCallback on the checkpoint metric: an evaluation resets the count if it beats the
    best of the earlier ones (in `mode`: max | min) by more than `threshold` (the first always does), else adds one;
    `stop` once the count reaches `patience` (0: never). The best then follows every strictly better value, as
    Trainer._determine_best_metric moves state.best_metric (from -inf / inf)."""

    def __init__(self, patience: int, threshold: float, mode: str, best: float | None = None, counter: int = 0):
        self.patience, self.threshold, self.best, self.counter = patience, threshold, best, counter
        self.better = operator.gt if mode == "max" else operator.lt

    def update(self, value: float) -> bool:
        value = float(value)
        if self.best is None or (self.better(value, self.best) and abs(value - self.best) > self.threshold):
            self.counter = 0
        else:
            self.counter += 1
        if self.best is None:
            self.best = -math.inf if self.better is operator.gt else math.inf
        if self.better(value, self.best):
            self.best = value
        return self.stop

    @property
    def stop(self) -> bool:
        return 0 < self.patience <= self.counter


def train_and_evaluate(config, workdir: str | Path, *, force: bool = False) -> dict:
    """Fine-tunes per config, evaluating and checkpointing into workdir; resumes if workdir has checkpoints
    (refused if the config changes a key that defines the run, unless `force`)."""
    started = time.time()
    if not str(workdir).strip():
        raise UserError("--workdir is empty; name the run's folder (a new or empty one, or an earlier run's)")
    workdir = fs.path(workdir)  # a local Path, or an epath.Path for gs://
    validate(config)
    compile_cache.enable(config)
    check_workdir(workdir)
    check_resume_config(workdir, config, force=force, unresolved=True)
    lock = WorkdirLock(workdir)
    if jax.process_index() == 0:  # one lock per run: on a shared filesystem the other processes are the same run
        lock.check()
    with _StopSignals() as stop:
        try:
            return _train_and_evaluate(config, workdir, lock, stop, force, started)
        finally:
            lock.release()


def _train_and_evaluate(config, workdir: Path, lock: WorkdirLock, stop: _StopSignals,
                        force: bool = False, started: float | None = None) -> dict:
    task = pipeline.task_module(config)
    mesh = mesh_for(config)
    if config.checkpoint_metric is None:
        metric, mode = task.checkpoint_metric(config)
        config.checkpoint_metric = metric
        config.checkpoint_mode = config.checkpoint_mode or mode
    config.checkpoint_mode = config.checkpoint_mode or "max"

    # --- load and validate everything; nothing is written yet ---
    folder = hf_io.resolve(config.model.name_or_path)
    hf_config = pipeline.load_hf_config(folder, "model.name_or_path")
    config_lib.check_positions(config, hf_config)  # max_length within the model's positions; nothing written yet
    tokenizer = pipeline.load_tokenizer(folder, "model.name_or_path")
    if config.task == "seq2seq" and config.model.decoder_start_token_id is None:
        start = getattr(hf_config, "decoder_start_token_id", None)
        config.model.decoder_start_token_id = tokenizer.pad_token_id if start is None else int(start)
    train_ds, eval_ds = pipeline.load_splits(config)
    if config.early_stopping_patience > 0 and eval_ds is None:
        raise UserError(f"config.early_stopping_patience={config.early_stopping_patience} needs evaluation data, but "
                        "config.data.eval is not set (nor data.eval_fraction); set one, or early_stopping_patience=0")
    streaming = bool(config.data.get("streaming"))  # .get: workdirs from before the key
    if streaming:  # each process's share of the stream, tokenized and batched as the loop goes (data/streaming.py)
        from jaxsft.data.streaming import TrainStream

        rows = parallel.local_rows(mesh, config.batch_size)
        train = TrainStream(task, train_ds, tokenizer, config, pipeline.train_spec(config),
                            batch_size=rows.stop - rows.start, index=jax.process_index(), count=jax.process_count())
    else:
        task.resolve_labels(config, train_ds)
        # 1 process: the whole split tokenized; several: each its share, then its rows of each batch as they come
        train = sharded.featurize(task, train_ds, tokenizer, config, "data.train", pipeline.train_spec(config))
    evals = None
    if eval_ds is not None:
        eval_key = "data.eval" if config.data.eval else "data.train (eval_fraction hold-out)"
        eval_spec = config.data.eval or pipeline.train_spec(config)
        if getattr(task, "eval_generates", lambda c: False)(config):  # decoding needs every prompt and reference
            evals = task.featurize(eval_ds, tokenizer, config, eval_key, eval_spec, need_labels=True)
        else:  # the eval loss and metrics need only lengths and labels everywhere: shared out like the training set
            evals = sharded.featurize(task, eval_ds, tokenizer, config, eval_key, eval_spec)
    if hasattr(task, "set_label_config"):
        task.set_label_config(hf_config, config)
    if config.model.from_scratch:  # the architecture only: fresh random weights (HF initialisation ranges)
        from jaxsft.models import init_sharded

        # each param initialised on its devices, in its sharding (model: shapes only)
        model, params = init_sharded(lambda: pipeline.build(hf_config, config, with_lora=False)[0], mesh,
                                     parallel.rules_for(hf_config))
        trainable = pipeline.trainable_for(model, config)
        log.info("model.from_scratch: %s with %d fresh random parameters", type(model).__name__,
                 sum(v.size for v in params.values()))
    else:  # straight into the shardings: each process reads only its devices' slices (model: shapes only)
        model, params, trainable, report = pipeline.load_pretrained(hf_config, config, folder, mesh,
                                                                    str(config.model.name_or_path))
        report_load(report, type(model).__name__, str(config.model.name_or_path))
    if trainable is not None:  # LoRA: adapters join the loaded weights; only they (and a new head) train
        from jaxsft.models import flatten_state, lora

        adapted = lora.inject(model, config.lora, config.seed)
        trainable = lora.trainable_predicate(model, config.task)
        params = {**{k: v for k, v in flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
                     if lora.is_adapter(k)}, **params}
        if config.lora.get("quantize"):  # QLoRA: the adapted base kernels quantised on their devices, floats freed
            params = lora.quantize_params(params, model)
        n_train = sum(v.size for k, v in params.items() if trainable(k))
        log.info("LoRA rank %d on %d layers: %d of %d parameters train (%.2f%%)", config.lora.rank, len(adapted),
                 n_train, sum(v.size for v in params.values()),
                 100 * n_train / sum(v.size for v in params.values()))
    functional = Functional(model)
    del model
    check_resume_config(workdir, config, force=force)  # labels etc. resolved now; still nothing written
    if jax.process_index() == 0:
        lock.acquire()
    stop.writing = True
    _write_workdir_files(workdir, config, hf_config, tokenizer, folder)
    stop.writing = False
    stop.exit_loading()  # a signal that came while writing
    for what, f in (("train", train), ("eval", evals)):  # accepted but reported (also in metrics.jsonl, step 0)
        if task.name == "classification" and f is not None and (f.num_empty or f.num_truncated or
                                                                 f.num_duplicates):
            log.info("data.%s: %d empty texts, %d examples cut at max_length=%d, %d duplicate examples (kept)",
                     what, f.num_empty, f.num_truncated, config.max_length, f.num_duplicates)
        elif f is not None and getattr(f, "num_duplicates", 0):
            log.info("data.%s: %d duplicate examples (kept)", what, f.num_duplicates)

    # --- schedule, optimizer, steps ---
    if streaming:  # no length: max_steps counts the run (config.check_values)
        plan, bucket_list, total = None, train.buckets, config.max_steps
    else:
        plan = BatchPlan(train.lengths, config.batch_size, seed=config.seed, shuffle=True,
                         group_by_length=config.data.group_by_length)
        bucket_list = pipeline.buckets(config, [train.lengths[b].max() for b in plan.epoch(0)])  # same on resume
        total = config.max_steps if config.max_steps > 0 else config.num_epochs * plan.num_batches
    tx, lr_fn = optim.make_optimizer(config, total)
    train_params, frozen = pipeline.split_trainable(params, trainable)
    shardings = parallel.state_shardings(pipeline.train_state(train_params, frozen,
                                                              jax.eval_shape(tx.init, train_params)),
                                         parallel.rules_for(hf_config), mesh)
    train_params = parallel.put(train_params, shardings["params"])  # each device keeps only its shards
    state = pipeline.train_state(train_params, parallel.put(frozen, shardings.get("frozen", {})),
                                 jax.jit(tx.init, out_shardings=shardings["opt_state"])(train_params))
    del params, train_params, frozen
    per_device = parallel.bytes_per_device(state)
    log.info("params + optimizer state: %.1f MiB per device (most loaded), %.1f MiB in all", max(per_device.values())
             / 2**20, sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20)
    train_step = make_train_step(functional, task, tx, config, mesh, shardings)
    eval_step = pipeline.make_eval_step(functional, task, mesh, {**shardings.get("frozen", {}), **shardings["params"]})
    pad_id = tokenizer.pad_token_id
    if streaming:  # the stream collates this process's rows; they become its part of the global arrays
        make_batch = parallel.GlobalBatches(lambda arrays, rows: arrays, config.batch_size, mesh)
    else:
        make_batch = pipeline.global_batches(task, train, config.batch_size, bucket_list, pad_id, mesh)
    if jax.process_count() > 1:
        log.warning("process %d builds rows %d:%d of each global batch of %d", jax.process_index(),
                    make_batch.rows.start, make_batch.rows.stop, config.batch_size)

    ckpts = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints, metric=config.checkpoint_metric,
                        mode=config.checkpoint_mode)
    meta = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "acc_loss_sum": 0.0, "acc_count": 0.0,
            "eval_metrics": {}, "skipped_updates": 0}
    restored = ckpts.restore_latest(abstract(state))
    if restored is not None:
        state, meta = restored
        log.info("resuming from step %d (epoch %d, batch %d) in %s", meta["step"], meta["epoch"],
                 meta["batch_in_epoch"], workdir / "checkpoints")
    early = EarlyStopping(config.early_stopping_patience, config.early_stopping_threshold, config.checkpoint_mode)
    saved = meta.get("early_stopping", {})  # counted for this metric and mode only
    if (saved.get("metric"), saved.get("mode")) == (config.checkpoint_metric, config.checkpoint_mode):
        early.best, early.counter = saved["best"], saved["counter"]
    stopped_early = meta.get("early_stopped_at") if early.stop else None  # a rerun after an early stop: done
    if stopped_early is not None:
        log.info("the run stopped early at step %d (%s did not improve for %d evaluations); nothing left to train",
                 stopped_early, config.checkpoint_metric, early.counter)
    step, epoch, batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
    acc_loss, acc_count = meta["acc_loss_sum"], meta["acc_count"]
    skip, skipped = bool(config.skip_nonfinite_updates), int(meta.get("skipped_updates", 0))
    writer = MetricsWriter(workdir / "metrics.jsonl", report_to=tuple(config.get("report_to", ("tensorboard",))),
                           wandb_project=config.get("wandb_project"), run_config=json.loads(config_lib.to_json(config)))
    # one row per run start: what the data held, and when the run started (the report's wall time counts from it)
    writer.write(0, {**data_counts(train, evals), "run_started": started or time.time()})
    if streaming:
        log.info("training %d steps on a stream (batch %d, %d devices, mesh %s; buckets %s)", total,
                 config.batch_size, mesh.size, dict(mesh.shape), bucket_list)
    else:
        log.info("training %d steps (%d per epoch, batch %d, %d devices, mesh %s); padding %.1f%% of tokens "
                 "(buckets %s)", total, plan.num_batches, config.batch_size, mesh.size, dict(mesh.shape),
                 100 * padding_share(train.lengths, plan.epoch(0), config.batch_size, bucket_list), bucket_list)

    train_step = precompile.Ahead(train_step, batch_arg=1)
    # every batch shape, train and eval, compiled in parallel
    if config.get("precompile", True) and step < total and stopped_early is None:
        upcoming, e, b = [], epoch, batch_in_epoch
        while plan is not None and len(upcoming) < total - step and e <= epoch + 1:  # shapes repeat across epochs
            upcoming += plan.epoch(e)[b:]
            e, b = e + 1, 0
        # a stream's batch shapes are known as they come: compiled on first use
        jobs = train_step.jobs((state, None, np.int32(step)), make_batch.shapes, upcoming[:total - step], mesh)
        if evals is not None:
            eval_batches, make_eval = pipeline.eval_batches(evals, config, mesh, task, pad_id)
            jobs += eval_step.jobs(({**state.get("frozen", {}), **state["params"]}, None), make_eval.shapes,
                                   eval_batches, mesh)
            eval_step.planned = True
        seconds = precompile.compile_all(jobs)
        writer.write(step, {"compile_seconds": round(seconds, 2), "compiled_shapes": len(jobs)})

    hypotheses = pipeline.hypothesis_fn(task, functional, config, folder, hf_config, tokenizer, mesh)

    def evaluate(step_no: int) -> dict:
        if evals is None:
            return {}
        t0 = time.time()
        params_now = {**state.get("frozen", {}), **state["params"]}
        outputs = pipeline.predict(eval_step, params_now, evals, config, mesh, task, pad_id)
        m = task.compute_metrics(outputs, evals, config)
        if hypotheses is not None:  # translation, or decode.eval_samples: decode and score the hypotheses
            hyps = hypotheses(params_now, evals)
            m.update(task.generation_metrics(hyps, evals, config))
            if hasattr(task, "generation_rows"):
                writer.write_generations(step_no, task.generation_rows(hyps, evals, config))
        m["eval_seconds"] = round(time.time() - t0, 3)
        writer.write(step_no, {**m, "epoch": epoch_of(step_no)})
        log.info("eval at step %d: %s", step_no, {k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in m.items()})
        return m

    progress = Progress(total, step)
    last_metrics: dict = meta.get("eval_metrics", {})
    progress.set_eval(step, config.checkpoint_metric, last_metrics.get(config.checkpoint_metric))
    t_log, ex_log, tok_log, pending = time.time(), 0, 0, []
    eval_every, ckpt_every = config.eval_every_steps, config.checkpoint_every_steps
    stop.loading = False  # from here a signal stops the run after the current step, with a checkpoint

    def epoch_of(step_no: int) -> float:
        """Epochs done (a stream, of unknown length: the epoch of the next batch)."""
        return round(step_no / plan.num_batches, 4) if plan is not None else position["epoch"]

    def feed(epoch: int, start: int):
        """(global batch, examples, tokens, end of epoch, position after) of each batch of `epoch` from batch
        `start`; a stream's go on from the checkpoint's stream position, epoch after epoch."""
        if streaming:
            for arrays, n, tokens, end, after in train.batches(meta.get("stream")):
                yield make_batch(arrays), n, tokens, end, after
            return
        batches = plan.epoch(epoch)
        for bi in range(start, len(batches)):
            idx = batches[bi]
            if train.on_demand is not None:  # several processes: this one's rows of the next batches, in one go
                sharded.prefetch(train.on_demand, batches, bi, make_batch.rows)
            end = bi + 1 == len(batches)
            yield make_batch(idx), len(idx), int(train.lengths[idx].sum()), end, \
                {"epoch": epoch + 1, "batch": 0} if end else {"epoch": epoch, "batch": bi + 1}

    def save_checkpoint(metrics: dict | None, **extra) -> None:
        if streaming:  # where the stream goes on (data/streaming.py)
            extra = {"stream": position, **extra}
        meta = {"step": step, "epoch": epoch_after, "batch_in_epoch": batch_after, "acc_loss_sum": acc_loss,
                "acc_count": acc_count, "eval_metrics": last_metrics, "skipped_updates": skipped,
                "early_stopping": {"metric": config.checkpoint_metric, "mode": config.checkpoint_mode,
                                   "best": early.best, "counter": early.counter}, **extra}
        ckpts.save(step, state, meta, metrics)
        writer.flush()  # gs://: metrics.jsonl written whole beside each checkpoint (locally always current)

    while step < total and stopped_early is None:
        for batch, n_examples, n_tokens, end_of_epoch, position in feed(epoch, batch_in_epoch):
            if step >= total:
                break
            state, out = train_step(state, batch, np.int32(step))
            step += 1
            ex_log += n_examples
            tok_log += n_tokens
            pending.append((step, out))
            progress.tick(step)
            epoch_after, batch_after = position["epoch"], position["batch"]
            if step % config.log_every_steps == 0 or step == total:
                loss_sum, count, n_skipped, grad_norm = _drain(pending, ckpts, skip)
                acc_loss, acc_count, skipped = acc_loss + loss_sum, acc_count + count, skipped + n_skipped
                elapsed = time.time() - t_log
                row = {"loss": acc_loss / max(acc_count, 1.0), "learning_rate": float(lr_fn(step - 1)),
                       "grad_norm": grad_norm, "examples_per_second": ex_log / elapsed,
                       "tokens_per_second": tok_log / elapsed,
                       "epoch": epoch_of(step), **({"skipped_updates": skipped} if skip else {})}
                writer.write(step, row)
                progress.update(step, row)
                acc_loss, acc_count, pending, ex_log, tok_log, t_log = 0.0, 0.0, [], 0, 0, time.time()
            eval_due = (eval_every > 0 and step % eval_every == 0) or (eval_every <= 0 and end_of_epoch) \
                or step == total
            ckpt_due = (ckpt_every > 0 and step % ckpt_every == 0) or (ckpt_every <= 0 and eval_due) \
                or step == total
            stopping = stop.synced_stop(step) and step < total
            # checked, and the unlogged loss saved with the checkpoint (an eval may stop the run early: one then)
            if (ckpt_due or stopping or (eval_due and early.patience > 0)) and pending:
                loss_sum, count, n_skipped, _ = _drain(pending, ckpts, skip)
                acc_loss, acc_count, skipped, pending = acc_loss + loss_sum, acc_count + count, skipped + n_skipped, []
            if evals is not None and (eval_due or ckpt_due):  # every checkpoint carries its eval metrics
                last_metrics = evaluate(step)
                progress.set_eval(step, config.checkpoint_metric, last_metrics.get(config.checkpoint_metric))
                t_log = time.time()
                value = last_metrics.get(config.checkpoint_metric)
                if value is None and early.patience > 0:  # as transformers: this evaluation is not counted
                    log.warning("warning: early stopping: no %s in the eval metrics at step %d, so not counted",
                                config.checkpoint_metric, step)
                elif value is not None and early.update(value):
                    stopped_early, ckpt_due = step, True  # ends the run with a checkpoint of this step
                    log.info("early stopping at step %d: %s has not improved by more than %s for %d evaluations "
                             "(best %s)", step, config.checkpoint_metric, early.threshold, early.patience,
                             round(early.best, 6))
                    writer.write(step, {"early_stopped": True, "early_stopping_best": early.best})
            if ckpt_due:
                save_checkpoint(last_metrics, **({"early_stopped_at": step} if stopped_early is not None else {}))
                t_log = time.time()
            if stopped_early is not None:
                break
            if stopping:
                if not ckpt_due:  # no eval of its own: kept as the newest, never picked as the best
                    save_checkpoint(None, stopped_by=stop.name)
                progress.close()
                ckpts.close()
                writer.close()
                raise Stopped(f"stopped at step {step} on {stop.name}; checkpoint saved in {workdir / 'checkpoints'}"
                              " — rerun the same command to resume")
            if step == _FAIL_AFTER_STEP:
                raise RuntimeError(f"injected failure after step {step} (JAXSFT_FAIL_AFTER_STEP)")
        epoch, batch_in_epoch = epoch + 1, 0
    progress.close()
    ckpts.close()
    writer.close()
    final = {"step": step, **last_metrics, "train_step_compilations": train_step.compilations,
             **({"early_stopped_at": stopped_early} if stopped_early is not None else {})}
    log.info("done: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()})
    if jax.process_index() == 0:
        try:
            from jaxsft import report

            for line in report.summary_lines(workdir):
                log.info("%s", line)
            report.plot(workdir)
        except Exception as e:  # noqa: BLE001 - a missing plot must never fail a finished run
            log.warning("warning: no run report (%s: %s)", type(e).__name__, first_line(e))
    return final
