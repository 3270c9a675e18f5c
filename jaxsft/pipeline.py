"""What training and evaluation share: checkpoint-folder loading, features, mesh, and the eval pass."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jaxsft import parallel
from jaxsft.data.batching import BatchPlan, default_buckets
from jaxsft.errors import UserError
from jaxsft.tasks import classification

log = logging.getLogger("jaxsft")

TASKS = {"classification": classification}


def task_module(config):
    if config.task not in TASKS:
        raise UserError(f"config.task: {config.task!r} is not one of {', '.join(TASKS)}")
    return TASKS[config.task]


def load_hf_config(folder: Path, source: str):
    from transformers import AutoConfig

    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"{source}: no config.json in {folder}")
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"{source}: cannot read {folder}/config.json ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_tokenizer(folder: Path, source: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"{source}: cannot load a tokenizer from {folder} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); are the tokenizer files missing?") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def buckets(config) -> list[int]:
    if config.data.buckets:
        b = sorted(int(x) for x in config.data.buckets)
        if b[-1] < config.max_length:
            b.append(config.max_length)
        return b
    return default_buckets(config.max_length)


def set_label_config(hf_config, config, task) -> None:
    """Puts num_labels / id2label / label2id / problem_type on the HF config, as transformers would."""
    labels = task.id2label(config)
    hf_config.num_labels = config.model.num_labels
    hf_config.id2label = labels
    hf_config.label2id = {v: k for k, v in labels.items()}
    hf_config.problem_type = "regression" if config.model.num_labels == 1 else "single_label_classification"


def eval_batch_size(config, mesh) -> int:
    bs = config.eval_batch_size or config.batch_size
    shards = parallel.data_shards(mesh)
    return -(-bs // shards) * shards


def make_eval_step(functional, task, mesh):
    def step(params, batch):
        return task.forward(functional.apply, params, batch)

    return jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))


def predict(eval_step, params, features, config, mesh, task, pad_id: int) -> np.ndarray:
    """Model outputs for every example, in the data's order (batches are length-sorted, fixed-shape)."""
    bs = eval_batch_size(config, mesh)
    plan = BatchPlan(features.lengths, bs, seed=0, shuffle=False, group_by_length=True)
    collate = partial(task.collate, features, batch_size=bs, buckets=buckets(config), pad_id=pad_id)
    out = None
    for idx in plan.epoch(0):
        logits = parallel.to_host(eval_step(params, parallel.to_global(collate(idx), mesh)))
        if out is None:
            out = np.zeros((len(features),) + logits.shape[1:], dtype=np.float32)
        out[idx] = logits[:len(idx)]
    return out


def restore_params(workdir: Path, config, params_template: dict, mesh, which: str = "best") -> tuple[dict, int]:
    """Params of a run's checkpoint (`best` by checkpoint_metric if kept, else `latest`) on `mesh`."""
    from jaxsft import optim
    from jaxsft.checkpoint import Checkpoints, abstract

    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"--workdir {workdir}: no checkpoints/ folder; has the run saved a checkpoint yet?")
    ckpts = Checkpoints(directory, metric=config.checkpoint_metric, mode=config.checkpoint_mode or "max",
                        read_only=True)
    steps = ckpts.steps()
    if not steps:
        raise UserError(f"--workdir {workdir}: no checkpoint in {directory}")
    step = ckpts.best_step() if which == "best" else steps[-1]
    tx, _ = optim.make_optimizer(config, 1)
    rep = parallel.replicated(mesh)
    params = jax.device_put(params_template, rep)
    target = abstract({"params": params, "opt_state": jax.eval_shape(tx.init, params)})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), target)
    state, _ = ckpts.restore(step, target)
    ckpts.close()
    return state["params"], step


def workdir_model(workdir: Path, config):
    """(Functional, flat param template, hf_config, tokenizer) rebuilt from W/hf and W/config.json alone."""
    from flax import nnx

    from jaxsft.models import Functional, build_model, compute_dtype, flatten_state

    hf_dir = Path(workdir) / "hf"
    hf_config = load_hf_config(hf_dir, "--workdir")
    tokenizer = load_tokenizer(hf_dir, "--workdir")
    model = build_model(hf_config, config.task, compute_dtype(config.dtype), config.seed)
    template = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return Functional(model), template, hf_config, tokenizer
