"""Batched autoregressive decoding with a fixed-size KV cache, compiled once per (batch, prompt bucket) shape.

Prompts are left-padded to a bucket length P; the cache holds P + max_new_tokens slots. One jitted function runs
the prefill and a `lax.while_loop` over new tokens (stopping early once every row has emitted an EOS id), so no
token triggers a compilation. Greedy by default; sampling applies temperature, then top-k, then top-p, in the
order of transformers' logits warpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.data.batching import default_buckets


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def _warp(logits, s: Sampling):
    """transformers' TemperatureLogitsWarper → TopKLogitsWarper → TopPLogitsWarper, on (B, V) float32 logits."""
    neg = jnp.finfo(logits.dtype).min
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k and s.top_k > 0:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as transformers
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cum <= 1.0 - s.top_p
        remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least one token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    return logits


def make_generate_fn(functional, sampling: Sampling, eos_ids: tuple[int, ...], pad_id: int, cache_dtype):
    """A jitted (params, ids (B,P) left-padded, mask (B,P), rng) → tokens (B, max_new_tokens) function."""
    eos = jnp.asarray(sorted(set(eos_ids)) or [-1], jnp.int32)
    n_new = sampling.max_new_tokens

    def pick(logits, rng):
        if not sampling.do_sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(rng, _warp(logits, sampling), axis=-1).astype(jnp.int32)

    def run(params, ids, mask, rng):
        b, p = ids.shape
        slots = p + n_new
        cache = functional.method(params, "init_cache", b, slots, cache_dtype)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        slot_mask = jnp.zeros((b, slots), jnp.int32).at[:, :p].set(mask)
        logits, cache = functional.apply(params, ids, slot_mask, positions=positions, cache=cache,
                                         cache_index=jnp.int32(0))
        next_pos = positions[:, -1] + 1
        out = jnp.full((b, n_new), pad_id, jnp.int32)
        done = jnp.zeros((b,), bool)

        def cond(c):
            i, _, _, _, done, _, _ = c
            return (i < n_new) & ~jnp.all(done)

        def body(c):
            i, logits, cache, slot_mask, done, out, rng = c
            rng, sub = jax.random.split(rng)
            tok = jnp.where(done, pad_id, pick(logits, sub))
            out = out.at[:, i].set(tok)
            done = done | jnp.isin(tok, eos)
            slot = p + i
            slot_mask = slot_mask.at[:, slot].set(1)
            new_logits, cache = functional.apply(params, tok[:, None], slot_mask, positions=(next_pos + i)[:, None],
                                                 cache=cache, cache_index=slot.astype(jnp.int32))
            return i + 1, new_logits[:, -1], cache, slot_mask, done, out, rng

        state = (jnp.int32(0), logits[:, -1], cache, slot_mask, done, out, rng)
        return jax.lax.while_loop(cond, body, state)[5]

    return jax.jit(run)


def prompt_bucket(length: int, limit: int) -> int:
    """Prompts are padded to a power of two (≥ 16) so a handful of shapes cover any prompt set."""
    for b in default_buckets(max(limit, 16)):
        if b >= length:
            return b
    return length


def generate(generate_fn, params, prompts: list[list[int]], *, batch_size: int, pad_id: int, max_prompt: int,
             seed: int = 0) -> list[list[int]]:
    """New token ids for every prompt (cut after the first EOS, which is kept), in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    rng = jax.random.key(seed)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        p = prompt_bucket(max(len(prompts[i]) for i in idx), max_prompt)
        ids = np.full((batch_size, p), pad_id, np.int32)
        mask = np.zeros((batch_size, p), np.int32)
        for r, i in enumerate(idx):
            toks = prompts[i][-p:]
            ids[r, p - len(toks):] = toks
            mask[r, p - len(toks):] = 1
        for r in range(len(idx), batch_size):  # filler rows: a one-token prompt, discarded
            ids[r, -1], mask[r, -1] = pad_id, 1
        out = np.asarray(jax.device_get(generate_fn(params, ids, mask, jax.random.fold_in(rng, start))))
        for r, i in enumerate(idx):
            results[i] = out[r].tolist()
    return results


def cut_at_eos(tokens: list[int], eos_ids, pad_id: int) -> list[int]:
    out = []
    for t in tokens:
        if t in eos_ids:
            break
        out.append(t)
    return out


def eos_ids_for(folder, tokenizer) -> tuple[int, ...]:
    """Every EOS id of the checkpoint's generation_config.json (int or list), else the tokenizer's."""
    import json
    from pathlib import Path

    ids: list[int] = []
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids = [value] if isinstance(value, int) else list(value or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return tuple(int(i) for i in ids)

