"""The train, eval and decode steps that `jaxsft.run`, `evaluate` and `generate` build, over abstract weights and
batches: what `jaxsft.aot` compiles for a TPU slice on a CPU host, and what the CUDA lowering tests lower.

Only the model's config (an HF `PretrainedConfig`) is needed: no weights are read, no data, no tokenizer. Each
step comes back as (jitted function, abstract arguments) so a caller can `.lower(*args)`, `.compile()` or
`jax.export` it. The functions are the production ones (`train.make_train_step`, `pipeline.make_eval_step`,
`decoding.make_generate_fn` / `make_seq2seq_generate_fn`), never copies."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft import optim, parallel, pipeline
from jaxsft.models import Functional, compute_dtype, flatten_state

I32, F32 = jnp.int32, jnp.float32


@dataclass
class Built:
    """A model built with shapes only, its optimizer and the sharded abstract train state."""

    config: object
    hf_config: object
    mesh: object
    task: object
    functional: Functional
    tx: object
    state: dict  # ShapeDtypeStructs carrying their NamedShardings
    shardings: dict


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build(config, hf_config, mesh, *, total_steps: int = 1000) -> Built:
    """The abstract model + optimizer + state of a run of `config` on `mesh` (LoRA adapters injected when
    lora.rank > 0, as train.py does). Classification needs config.model.num_labels (else the HF config's)."""
    task = pipeline.task_module(config)
    if config.task == "classification":
        if config.model.num_labels is None:
            config.model.num_labels = int(getattr(hf_config, "num_labels", 2))
        if config.data.label_names is None and config.model.num_labels > 1:
            config.data.label_names = [str(i) for i in range(config.model.num_labels)]
        task.set_label_config(hf_config, config)
    if config.task == "seq2seq" and config.model.decoder_start_token_id is None:
        start = getattr(hf_config, "decoder_start_token_id", None)
        config.model.decoder_start_token_id = int(start if start is not None else hf_config.pad_token_id or 0)
    model = nnx.eval_shape(lambda: pipeline.build(hf_config, config)[0])
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    trainable = pipeline.trainable_for(model, config)
    functional = Functional(model)
    tx, _ = optim.make_optimizer(config, total_steps)
    train_params, frozen = pipeline.split_trainable(params, trainable)
    state = pipeline.train_state(train_params, frozen, jax.eval_shape(tx.init, train_params))
    shardings = parallel.state_shardings(state, parallel.rules_for(hf_config), mesh)
    return Built(config, hf_config, mesh, task, functional, tx, _abstract(state, shardings), shardings)


def abstract_batch(config, batch_size: int, length: int, mesh, target_length: int | None = None) -> dict:
    """The arrays `task.collate` makes for one global batch, as ShapeDtypeStructs split over (data, fsdp)."""
    sh = parallel.batch_sharding(mesh)
    b, t = batch_size, length

    def a(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    if config.task == "classification":
        label = F32 if config.model.num_labels == 1 else I32
        return {"input_ids": a((b, t), I32), "attention_mask": a((b, t), I32), "token_type_ids": a((b, t), I32),
                "labels": a((b,), label), "weights": a((b,), F32)}
    if config.task == "causal_lm":
        return {"input_ids": a((b, t), I32), "attention_mask": a((b, t), I32), "segment_ids": a((b, t), I32),
                "positions": a((b, t), I32), "targets": a((b, t), I32), "loss_mask": a((b, t), F32),
                "weights": a((b,), F32)}
    if config.task == "seq2seq":
        u = target_length or t
        return {"input_ids": a((b, t), I32), "attention_mask": a((b, t), I32), "decoder_input_ids": a((b, u), I32),
                "decoder_attention_mask": a((b, u), I32), "labels": a((b, u), I32), "loss_mask": a((b, u), F32),
                "weights": a((b,), F32)}
    raise ValueError(f"unknown task {config.task!r}")


def train_step(built: Built, batch_size: int, length: int, target_length: int | None = None):
    """(jitted train step, (state, batch, step)) exactly as train.py builds it."""
    from jaxsft.train import make_train_step

    step = make_train_step(built.functional, built.task, built.tx, built.config, built.mesh, built.shardings)
    batch = abstract_batch(built.config, batch_size, length, built.mesh, target_length)
    rep = parallel.replicated(built.mesh)
    return step, (built.state, batch, jax.ShapeDtypeStruct((), I32, sharding=rep))


def eval_params(built: Built) -> dict:
    return {**built.state.get("frozen", {}), **built.state["params"]}


def eval_step(built: Built, batch_size: int, length: int, target_length: int | None = None):
    """(jitted eval step, (params, batch)) as train.py / evaluate.py build it."""
    sh = {**built.shardings.get("frozen", {}), **built.shardings["params"]}
    step = pipeline.make_eval_step(built.functional, built.task, built.mesh, sh)
    return step.jitted, (eval_params(built), abstract_batch(built.config, batch_size, length, built.mesh,
                                                              target_length))


def decode_step(built: Built, batch_size: int, prompt_length: int, max_new_tokens: int = 16,
                eos_ids: tuple[int, ...] = (2,), pad_id: int = 0):
    """(jitted generate function, args) as `jaxsft.generate` builds it: KV-cache greedy decoding for decoders,
    beam search (config.decode.num_beams, default 4) for encoder-decoders. Params replicated (the CLI's layout)."""
    from jaxsft import decoding

    rep = parallel.replicated(built.mesh)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), eval_params(built))
    ids = jax.ShapeDtypeStruct((batch_size, prompt_length), I32, sharding=rep)
    dtype = compute_dtype(built.config.dtype)
    if built.config.task == "seq2seq":
        import dataclasses

        from transformers import GenerationConfig

        gen = GenerationConfig.from_model_config(built.hf_config).to_dict()
        settings = decoding.seq2seq_settings(gen, built.config.decode, fallback_pad=pad_id, fallback_eos=eos_ids[0])
        settings = dataclasses.replace(settings, num_beams=built.config.decode.num_beams or 4,
                                       max_length=(built.config.decode.max_new_tokens or max_new_tokens) + 1)
        fn = decoding.make_seq2seq_generate_fn(built.functional, settings, dtype)
        return fn, (params, ids, ids)
    fn = decoding.make_generate_fn(built.functional, decoding.Sampling(max_new_tokens), eos_ids, pad_id, dtype)
    return fn, (params, ids, ids, jax.random.key(0))
