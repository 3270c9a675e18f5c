"""What training and evaluation share: checkpoint-folder loading, features, mesh, and the eval pass."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jaxsft import fs, parallel
from jaxsft.data import sharded
from jaxsft.data.batching import BatchPlan, choose_buckets, default_buckets
from jaxsft.errors import UserError, first_line

log = logging.getLogger("jaxsft")

TASKS = ("classification", "causal_lm", "seq2seq")


def task_module(config):
    if config.task not in TASKS:
        raise UserError(f"config.task: {config.task!r} is not one of {', '.join(TASKS)}")
    import importlib

    return importlib.import_module(f"jaxsft.tasks.{config.task}")


def load_splits(config, *, need_train: bool = True):
    """(train, eval) datasets: data.eval if set, else a seeded `data.eval_fraction` hold-out of data.train."""
    from jaxsft.data.sources import load_source

    frac = config.data.eval_fraction or 0.0
    if not 0.0 <= frac < 1.0:
        raise UserError(f"config.data.eval_fraction must be in [0, 1), got {frac}")
    fields = dict(source_field=config.data.source_field, target_field=config.data.target_field,
                  tfds_data_dir=config.data.get("tfds_data_dir") or None)  # .get: workdirs from before the key
    mixture = list(config.data.get("mixture") or [])  # .get: workdirs from before the key
    if mixture and config.data.train:
        raise UserError("set data.train or data.mixture, not both")
    streaming = bool(config.data.get("streaming"))  # the training source as an IterableDataset (data/streaming.py)
    if not (need_train or (frac and not config.data.eval)):
        train = None
    elif mixture:
        from jaxsft.data.sources import load_mixture

        train = load_mixture(mixture, list(config.data.get("mixture_weights") or []),
                             config.data.get("mixture_stopping") or "first_exhausted", config.seed,
                             streaming=streaming, **fields)
    else:
        train = load_source(config.data.train, "data.train", streaming=streaming, **fields)
    if config.data.eval:
        return train, load_source(config.data.eval, "data.eval", **fields)
    if frac > 0:
        if len(train) < 2:
            raise UserError(f"data.train: {len(train)} example(s) cannot be split by data.eval_fraction={frac}")
        parts = train.train_test_split(test_size=frac, seed=config.seed, shuffle=True)
        return parts["train"], parts["test"]
    return train, None


def train_spec(config) -> str:
    """What data.train names in messages: its spec, or the mixture's specs."""
    return config.data.train or " + ".join(config.data.get("mixture") or [])


def load_hf_config(folder: Path, source: str):
    from transformers import AutoConfig

    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"{source}: no config.json in {folder}")
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"{source}: cannot read {folder}/config.json ({type(e).__name__}: "
                        f"{first_line(e)})") from None


def load_tokenizer(folder: Path, source: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"{source}: cannot load a tokenizer from {folder} ({type(e).__name__}: "
                        f"{first_line(e)}); are the tokenizer files missing?") from None
    # Without tokenizer files transformers 5 quietly builds a tokenizer of special tokens only (every word → UNK).
    try:
        real = set(tok.get_vocab()) - set(tok.all_special_tokens) - set(tok.get_added_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer that cannot list its vocabulary: nothing to check
        real = None
    if real is not None and len(real) < 4:
        raise UserError(f"{source}: tokenizer files missing in {folder} (no tokenizer.json, vocab.txt, vocab.json, "
                        "tokenizer.model, *.spm or spiece.model), so the tokenizer has no vocabulary (every word "
                        "would be unknown); copy the checkpoint's tokenizer files into the folder")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def buckets(config, batch_lengths=None) -> list[int]:
    """Padded lengths: `data.buckets` when set (max_length added); else, given each batch's longest row, the
    `data.num_buckets` lengths that pad these batches least (batching.choose_buckets); else (num_buckets 0, no
    batches given, or packed causal_lm rows) powers of two up to max_length."""
    if config.data.buckets:
        b = sorted(int(x) for x in config.data.buckets)
        if b[-1] < config.max_length:
            b.append(config.max_length)
        return b
    count = config.data.get("num_buckets", 0)  # .get: workdirs from before the key
    packed = config.task == "causal_lm" and config.data.packing  # rows filled to max_length: one shape
    if count and batch_lengths is not None and not packed:
        return choose_buckets(batch_lengths, count, config.max_length)
    return default_buckets(config.max_length)


def eval_batch_size(config, mesh) -> int:
    bs = config.eval_batch_size or config.batch_size
    shards = parallel.data_shards(mesh)
    return -(-bs // shards) * shards


def make_eval_step(functional, task, mesh, param_shardings=None):
    """A jitted (params, batch) → per-row outputs (replicated), as a precompile.Ahead; params keep
    `param_shardings` (None: the shardings they arrive with, sharded or replicated), the batch is split over
    (data, fsdp)."""
    from jaxsft.models import layers

    def step(params, batch):
        with layers.activations_on(mesh):  # activations stay split over the batch axes (layers.split_batch)
            return task.eval_outputs(task.forward(functional.apply, params, batch), batch)

    from jaxsft.precompile import Ahead

    return Ahead(jax.jit(step, in_shardings=(param_shardings, parallel.batch_sharding(mesh)),
                         out_shardings=parallel.replicated(mesh)), batch_arg=1)


def eval_batches(features, config, mesh, task, pad_id: int):
    """(index batches, parallel.GlobalBatches making their arrays) of an eval pass: length-sorted, fixed-shape
    batches."""
    bs = eval_batch_size(config, mesh)
    batches = BatchPlan(features.lengths, bs, seed=0, shuffle=False, group_by_length=True).epoch(0)
    chosen = buckets(config, [features.lengths[b].max() for b in batches])
    return batches, global_batches(task, features, bs, chosen, pad_id, mesh)


def global_batches(task, features, batch_size: int, bucket_list: list[int], pad_id: int, mesh):
    """parallel.GlobalBatches of the task's fixed-shape batches of `features`."""
    return parallel.GlobalBatches(partial(task.collate, features, batch_size=batch_size, buckets=bucket_list,
                                          pad_id=pad_id), batch_size, mesh,
                                  key=partial(task.batch_lengths, features, buckets=bucket_list))


def predict(eval_step, params, features, config, mesh, task, pad_id: int) -> np.ndarray:
    """The task's eval outputs for every row, in the data's order (batches are length-sorted, fixed-shape). The
    first call compiles every batch shape of the pass up front, in parallel (jaxsft.precompile)."""
    from jaxsft import precompile

    batches, make = eval_batches(features, config, mesh, task, pad_id)
    if not eval_step.planned:
        precompile.compile_all(eval_step.jobs((params, None), make.shapes, batches, mesh), "eval ")
        eval_step.planned = True
    out = None
    for at, idx in enumerate(batches):
        if getattr(features, "on_demand", None) is not None:  # several processes: this one's rows, made in chunks
            sharded.prefetch(features.on_demand, batches, at, make.rows)
        logits = parallel.to_host(eval_step(params, make(idx)))
        if out is None:
            out = np.zeros((len(features),) + logits.shape[1:], dtype=np.float32)
        out[idx] = logits[:len(idx)]
    return out


def restore_params(workdir: Path, config, params_template: dict, mesh, which: str = "best",
                   trainable=None, rules=None) -> tuple[dict, int]:
    """Params of a run's checkpoint (`best` by checkpoint_metric if kept, else `latest`) on `mesh`, sharded by
    the family's partition rules (`rules`, else those of W/hf/config.json) whatever mesh the run trained on;
    `trainable` is the LoRA split predicate the run trained with (None: full fine-tuning)."""
    from jaxsft import optim
    from jaxsft.checkpoint import Checkpoints, abstract

    directory = fs.path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"--workdir {workdir}: no checkpoints/ folder; has the run saved a checkpoint yet?")
    ckpts = Checkpoints(directory, metric=config.checkpoint_metric, mode=config.checkpoint_mode or "max",
                        read_only=True)
    steps = ckpts.steps()
    if not steps:
        raise UserError(f"--workdir {workdir}: no checkpoint in {directory}")
    step = ckpts.best_step() if which == "best" else steps[-1]
    tx, _ = optim.make_optimizer(config, 1)
    if rules is None:
        rules = parallel.rules_for(load_hf_config(workdir_hf(workdir), "--workdir"))
    train_p, frozen = split_trainable(params_template, trainable)
    target = abstract(train_state(train_p, frozen, jax.eval_shape(tx.init, train_p)))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target,
                          parallel.state_shardings(target, rules, mesh))
    state, _ = ckpts.restore(step, target)
    ckpts.close()
    return {**state.get("frozen", {}), **state["params"]}, step


def train_state(params: dict, frozen: dict, opt_state) -> dict:
    """The checkpointed training state; frozen (LoRA base) weights ride along so the workdir is self-contained."""
    state = {"params": params, "opt_state": opt_state}
    if frozen:
        state["frozen"] = frozen
    return state


def split_trainable(params: dict, trainable) -> tuple[dict, dict]:
    """(trainable, frozen) flat dicts; without LoRA everything trains and `frozen` is empty."""
    if trainable is None:
        return params, {}
    return ({k: v for k, v in params.items() if trainable(k)}, {k: v for k, v in params.items() if not trainable(k)})


def build(hf_config, config, *, with_lora: bool = True):
    """The model for this config (adapters injected when lora.rank > 0) and its trainable-path predicate."""
    from jaxsft.models import build_model, compute_dtype, layers, lora

    layers.set_attention(config.model.get("attention"))
    options = {k: config.model.get(k) for k in ("remat", "scan_layers")}  # .get: workdirs from before the keys
    options["neftune_noise_alpha"] = config.get("neftune_noise_alpha")
    if options.get("scan_layers") and config.lora.rank and config.lora.rank > 0:
        raise UserError("config.model.scan_layers=True with LoRA (lora.rank > 0) is not supported yet; "
                        "set model.scan_layers=False")
    model = build_model(hf_config, config.task, compute_dtype(config.dtype), config.seed, options)
    if config.lora.rank and config.lora.rank > 0 and with_lora:
        lora.inject(model, config.lora, config.seed)
    return model, trainable_for(model, config)


def trainable_for(model, config):
    """The LoRA trainable-path predicate of this (possibly abstract) model; None: full fine-tuning."""
    from jaxsft.models import lora

    return lora.trainable_predicate(model, config.task) if config.lora.rank and config.lora.rank > 0 else None


def load_pretrained(hf_config, config, folder: Path, mesh, source: str, rules=None):
    """(model with shapes only, params, LoRA trainable predicate, load report) of the checkpoint in `folder`:
    params placed straight into their shardings (the family's partition rules on `mesh`; `rules=()`: replicated),
    each process reading only its devices' slices. LoRA adapters are not added (train.py injects them)."""
    from jaxsft import hf_io
    from jaxsft.models import load_sharded

    rules = parallel.rules_for(hf_config) if rules is None else rules
    model, params, report = load_sharded(lambda: build(hf_config, config, with_lora=False)[0],
                                         hf_io.WeightReader(folder), source, mesh, rules or None)
    return model, params, trainable_for(model, config), report


def workdir_hf(workdir) -> Path:
    """W/hf as a local folder transformers can read (a gs:// workdir's is downloaded once per process)."""
    return fs.local_copy(fs.path(workdir) / "hf")


def workdir_model(workdir: Path, config):
    """(Functional, flat param template (shapes and dtypes), hf_config, tokenizer) rebuilt from W/hf and
    W/config.json alone."""
    from flax import nnx

    from jaxsft.models import Functional, flatten_state

    hf_dir = workdir_hf(workdir)
    hf_config = load_hf_config(hf_dir, "--workdir")
    tokenizer = load_tokenizer(hf_dir, "--workdir")
    model = nnx.eval_shape(lambda: build(hf_config, config)[0])  # shapes only: the checkpoint supplies values
    template = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    functional = Functional(model)
    functional.trainable = trainable_for(model, config)
    return functional, template, hf_config, tokenizer


def decode_dtype(config) -> str:
    """config.decode.dtype (workdirs from before the key: float32)."""
    return config.decode.get("dtype") or "float32"


def decoding_functional(functional, hf_config, config):
    """The model to decode with: `functional` itself when decode.dtype is the training compute dtype, else the
    same architecture (LoRA adapters included) computing in decode.dtype, over the same float32 params."""
    from flax import nnx

    from jaxsft.models import Functional

    dtype = decode_dtype(config)
    if dtype == config.dtype:
        return functional
    other = config.copy_and_resolve_references()
    other.dtype = dtype
    model = nnx.eval_shape(lambda: build(hf_config, other)[0])
    out = Functional(model)
    out.trainable = getattr(functional, "trainable", None)
    return out


def generation_config(folder: Path, hf_config) -> dict:
    """The checkpoint's generation settings as transformers derives them (generation_config.json, else config)."""
    from transformers import GenerationConfig

    if (Path(folder) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder).to_dict()
    return GenerationConfig.from_model_config(hf_config).to_dict()


def seq2seq_generator(functional, config, folder: Path, hf_config, tokenizer):
    """(jitted generate fn, settings) for an encoder-decoder model: generation_config + config.decode overrides."""
    from jaxsft import decoding
    from jaxsft.models import compute_dtype
    from jaxsft.tasks import seq2seq

    gen = {**generation_config(folder, hf_config), **seq2seq.generation_overrides(tokenizer, config)}
    settings = decoding.seq2seq_settings(gen, config.decode, fallback_pad=tokenizer.pad_token_id,
                                         fallback_eos=tokenizer.eos_token_id)
    fn = decoding.make_seq2seq_generate_fn(decoding_functional(functional, hf_config, config), settings,
                                           compute_dtype(decode_dtype(config)))
    return fn, settings


def translate(generator, params, features, task, config, tokenizer, mesh) -> list[str]:
    """Hypotheses (detokenized strings) for every example of `features`, in order."""
    from jaxsft import decoding

    generate_fn, settings = generator
    bs = eval_batch_size(config, mesh)
    outs = decoding.seq2seq_generate(generate_fn, params, task.prompts_for_generation(features), batch_size=bs,
                                     pad_id=tokenizer.pad_token_id, buckets=buckets(config))
    eos = set(settings.eos_token_ids)
    return tokenizer.batch_decode([decoding.cut_at_eos(o, eos) for o in outs],
                                  skip_special_tokens=True)


def hypothesis_fn(task, functional, config, folder: Path, hf_config, tokenizer, mesh):
    """For tasks that score generations at evaluation (translation; causal_lm with decode.eval_samples): params,
    features → hypothesis strings (causal_lm: of task.generation_prompts); None when the task and config do not
    generate."""
    if not getattr(task, "eval_generates", lambda c: False)(config):
        return None
    if config.task == "seq2seq":
        generator = seq2seq_generator(functional, config, folder, hf_config, tokenizer)
        return lambda params, features: translate(generator, params, features, task, config, tokenizer, mesh)
    complete = prompt_completer(decoding_functional(functional, hf_config, config), config, folder, tokenizer,
                                config.decode.max_new_tokens or 128, eval_batch_size(config, mesh))
    return lambda params, features: complete(params, [task.encode_prompt(tokenizer, config, p)
                                                      for p in task.generation_prompts(features, config)])


def prompt_completer(functional, config, folder: Path, tokenizer, max_new_tokens: int, batch_size: int):
    """A decoder model's greedy completions: (params, prompt token ids per example) → completion strings, in order;
    an empty prompt (text data has none) gets "". The generate function compiles once and is reused."""
    from jaxsft import decoding
    from jaxsft.models import compute_dtype

    eos = decoding.eos_ids_for(folder, tokenizer)
    fn = decoding.make_generate_fn(functional, decoding.Sampling(max_new_tokens), eos, tokenizer.pad_token_id,
                                   compute_dtype(decode_dtype(config)))

    def run(params, prompts: list[list[int]]) -> list[str]:
        todo = [i for i, x in enumerate(prompts) if x]
        outs = decoding.generate(fn, params, [prompts[i] for i in todo], batch_size=batch_size,
                                 pad_id=tokenizer.pad_token_id, max_prompt=config.max_length)
        texts = tokenizer.batch_decode([decoding.cut_at_eos(o, eos) for o in outs], skip_special_tokens=True)
        done = dict(zip(todo, texts))
        return [done.get(i, "") for i in range(len(prompts))]

    return run
