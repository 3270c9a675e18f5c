"""Batched autoregressive decoding with a fixed-size KV cache, compiled once per (batch, prompt bucket) shape.

Prompts are left-padded to a bucket length P; the cache holds P + max_new_tokens slots. One jitted function runs
the prefill and a `lax.while_loop` over new tokens (stopping early once every row has emitted an EOS id), so no
token triggers a compilation. Greedy by default; sampling applies temperature, then top-k, then top-p, in the
order of transformers' logits warpers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import parallel
from jaxsft.data.batching import default_buckets

log = logging.getLogger("jaxsft")


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


def _batched(seqs: list[list[int]], batch_size: int, pad_id: int, length_for, *, left: bool, call):
    """Runs `call(ids, mask, start)` on fixed-shape batches of `seqs` (grouped by length, padded to
    `length_for(longest)`: on the left for decoder prompts, on the right for encoder sources; filler rows hold one
    pad token and are discarded) and returns its rows in the order of `seqs`."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    results: list[list[int]] = [[] for _ in seqs]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        p = length_for(max(len(seqs[i]) for i in idx))
        ids = np.full((batch_size, p), pad_id, np.int32)
        mask = np.zeros((batch_size, p), np.int32)
        for r, i in enumerate(idx):
            toks = seqs[i][-p:] if left else seqs[i][:p]
            cols = slice(p - len(toks), p) if left else slice(0, len(toks))
            ids[r, cols], mask[r, cols] = toks, 1
        mask[len(idx):, -1 if left else 0] = 1
        out = parallel.to_host(call(ids, mask, start))  # multi-process: gathered from every process
        for r, i in enumerate(idx):
            results[i] = out[r].tolist()
    return results


def generate(generate_fn, params, prompts: list[list[int]], *, batch_size: int, pad_id: int, max_prompt: int,
             seed: int = 0) -> list[list[int]]:
    """The new token ids of every prompt, in the prompts' order: each row holds max_new_tokens ids, the EOS that
    ended it and pad after that; `cut_at_eos` trims them. Prompts are left-padded to power-of-two buckets."""
    rng = jax.random.key(seed)
    return _batched(prompts, batch_size, pad_id, lambda n: prompt_bucket(n, max_prompt), left=True,
                    call=lambda ids, mask, start: generate_fn(params, ids, mask, jax.random.fold_in(rng, start)))


def cut_at_eos(tokens: list[int], eos_ids) -> list[int]:
    """The generated ids before the first EOS (what gets detokenized)."""
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



# --- encoder-decoder models: greedy and beam search, as transformers' `generate` ---------------------------------

NEG = -1.0e9


@dataclass(frozen=True)
class Seq2SeqDecode:
    """transformers' generation settings that matter for translation (max_length counts the start token)."""
    max_length: int = 20
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    decoder_start_token_id: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] | None = None
    bad_token_ids: tuple[int, ...] = ()  # single-token bad_words_ids
    min_length: int = 0


def seq2seq_settings(generation_config: dict, decode_config, *, fallback_pad: int, fallback_eos) -> Seq2SeqDecode:
    """Settings from a checkpoint's generation_config.json, overridden by config.decode (when set)."""
    g = dict(generation_config or {})

    def ids(v):
        return () if v is None else (int(v),) if isinstance(v, int) else tuple(int(x) for x in v)

    eos = ids(g.get("eos_token_id")) or ids(fallback_eos)
    pad = g.get("pad_token_id", fallback_pad)
    pad = fallback_pad if pad is None else int(pad)
    max_new = decode_config.max_new_tokens if decode_config.max_new_tokens else g.get("max_new_tokens")
    max_length = int(max_new) + 1 if max_new else int(g.get("max_length") or 20)
    bad = []
    for seq in g.get("bad_words_ids") or []:
        if len(seq) == 1 and seq[0] not in eos:
            bad.append(int(seq[0]))
        elif len(seq) > 1:
            log.warning("warning: multi-token bad_words_ids %s are not applied", seq)
    for key, neutral in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0), ("encoder_no_repeat_ngram_size", 0),
                         ("diversity_penalty", 0.0), ("exponential_decay_length_penalty", None)):
        if g.get(key) not in (None, neutral):
            log.warning("warning: generation_config %s=%s is not applied by jaxsft's decoding", key, g[key])
    num_beams = decode_config.num_beams or g.get("num_beams") or 1
    def pick(override, key, default):
        if override is not None:
            return override
        return default if g.get(key) is None else g[key]

    lp = pick(decode_config.length_penalty, "length_penalty", 1.0)
    es = pick(decode_config.early_stopping, "early_stopping", False)
    start = g.get("decoder_start_token_id")
    start = g.get("bos_token_id") if start is None else start  # transformers' fallback, then jaxsft's (pad)
    forced_bos = pick(decode_config.get("forced_bos_token_id"), "forced_bos_token_id", None)
    return Seq2SeqDecode(max_length=max_length, num_beams=int(num_beams), length_penalty=float(lp),
                         early_stopping=es, decoder_start_token_id=int(pad if start is None else start),
                         eos_token_ids=eos, pad_token_id=pad,
                         forced_bos_token_id=None if forced_bos is None else int(forced_bos),
                         forced_eos_token_id=ids(g.get("forced_eos_token_id")) or None, bad_token_ids=tuple(bad),
                         min_length=int(g.get("min_length") or 0))


def _process(scores, cur_len, s: Seq2SeqDecode):
    """transformers' logits processors for these settings; `cur_len` counts the start token (may be traced)."""
    vocab = jnp.arange(scores.shape[-1])
    neg_inf = -jnp.inf
    if s.min_length > 0 and s.eos_token_ids:
        eos = jnp.isin(vocab, jnp.asarray(s.eos_token_ids))
        scores = jnp.where(eos[None] & (cur_len < s.min_length), neg_inf, scores)
    if s.bad_token_ids:
        scores = jnp.where(jnp.isin(vocab, jnp.asarray(s.bad_token_ids))[None], neg_inf, scores)
    if s.forced_bos_token_id is not None:
        forced = jnp.where(vocab == s.forced_bos_token_id, 0.0, neg_inf)[None]
        scores = jnp.where(cur_len == 1, forced, scores)
    if s.forced_eos_token_id:
        forced = jnp.where(jnp.isin(vocab, jnp.asarray(s.forced_eos_token_id)), 0.0, neg_inf)[None]
        scores = jnp.where(cur_len == s.max_length - 1, forced, scores)
    return scores


def make_seq2seq_generate_fn(functional, s: Seq2SeqDecode, cache_dtype):
    """A jitted (params, ids (B,S), mask (B,S)) → (B, max_length - 1) new tokens function: greedy or beam search."""
    eos = jnp.asarray(s.eos_token_ids or (-1,), jnp.int32)
    length = s.max_length
    nb = max(int(s.num_beams), 1)

    def step(params, tokens, cross, mask, cache, index):
        logits, cache = functional.method(params, "decode", tokens[:, None], cross, mask, cache=cache,
                                          cache_index=index)
        return logits[:, -1].astype(jnp.float32), cache

    def greedy(params, ids, mask):
        b = ids.shape[0]
        cross = functional.method(params, "cross_kv", functional.method(params, "encode", ids, mask))
        cache = functional.method(params, "init_cache", b, length, cache_dtype)
        out = jnp.full((b, length - 1), s.pad_token_id, jnp.int32)
        tok = jnp.full((b,), s.decoder_start_token_id, jnp.int32)

        def cond(c):
            return (c[0] < length) & ~jnp.all(c[4])

        def body(c):
            cur, tok, cache, out, done = c
            logits, cache = step(params, tok, cross, mask, cache, (cur - 1).astype(jnp.int32))
            nxt = jnp.argmax(_process(logits, cur, s), axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, s.pad_token_id, nxt)
            out = out.at[:, cur - 1].set(nxt)
            return cur + 1, nxt, cache, out, done | jnp.isin(nxt, eos)

        c = (jnp.int32(1), tok, cache, out, jnp.zeros((b,), bool))
        return jax.lax.while_loop(cond, body, c)[3]

    def beam(params, ids, mask):
        b = ids.shape[0]
        keep = max(2, 1 + len(s.eos_token_ids)) * nb
        enc = functional.method(params, "encode", ids, mask)
        cross = jax.tree.map(lambda x: jnp.repeat(x, nb, axis=0), functional.method(params, "cross_kv", enc))
        mask_r = jnp.repeat(mask, nb, axis=0)
        cache = functional.method(params, "init_cache", b * nb, length, cache_dtype)
        fill = s.pad_token_id if s.pad_token_id else (s.eos_token_ids[0] if s.eos_token_ids else -1)
        running = jnp.full((b, nb, length), fill, jnp.int32).at[:, :, 0].set(s.decoder_start_token_id)
        state = dict(cur=jnp.int32(1), running=running, sequences=running,
                     running_scores=jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(NEG),
                     scores=jnp.full((b, nb), NEG, jnp.float32), finished=jnp.zeros((b, nb), bool),
                     unsat=jnp.ones((b, 1), bool), go=jnp.asarray(True), cache=cache)
        top_mask = jnp.arange(keep) < nb
        batch_offset = (jnp.arange(b) * nb)[:, None]

        def gather(x, idx):
            idx = idx.reshape(idx.shape + (1,) * (x.ndim - idx.ndim))
            return jnp.take_along_axis(x, idx, axis=1)

        def cond(st):
            return st["go"] & (st["cur"] < length)

        def body(st):
            cur = st["cur"]
            last = jax.lax.dynamic_index_in_dim(st["running"], cur - 1, axis=2, keepdims=False).reshape(b * nb)
            logits, cache = step(params, last, cross, mask_r, st["cache"], (cur - 1).astype(jnp.int32))
            logp = _process(jax.nn.log_softmax(logits, axis=-1), cur, s)
            vocab = logp.shape[-1]
            logp = (logp.reshape(b, nb, vocab) + st["running_scores"][:, :, None]).reshape(b, nb * vocab)
            topk_logp, topk_idx = jax.lax.top_k(logp, keep)
            parent, tok = topk_idx // vocab, (topk_idx % vocab).astype(jnp.int32)
            topk_seq = gather(st["running"], parent)
            topk_seq = jax.lax.dynamic_update_slice_in_dim(topk_seq, tok[:, :, None], cur, axis=2)
            hits = jnp.isin(tok, eos) | (cur + 1 >= length)
            # beams that continue
            run_logp = topk_logp + hits.astype(jnp.float32) * NEG
            nxt = jax.lax.top_k(run_logp, nb)[1]
            running, running_scores = gather(topk_seq, nxt), gather(run_logp, nxt)
            flat_parent = gather(parent + batch_offset, nxt).reshape(b * nb)
            # finished hypotheses
            just = hits & top_mask[None]
            cand = topk_logp / ((cur - 0.0) ** s.length_penalty)
            full = jnp.all(st["finished"], axis=-1, keepdims=True) & (s.early_stopping is True)
            cand = cand + full * NEG + (~st["unsat"]) * NEG + (~just) * NEG
            m_seq = jnp.concatenate([st["sequences"], topk_seq], axis=1)
            m_scores = jnp.concatenate([st["scores"], cand], axis=1)
            m_fin = jnp.concatenate([st["finished"], just], axis=1)
            best = jax.lax.top_k(m_scores, nb)[1]
            sequences, scores, finished = gather(m_seq, best), gather(m_scores, best), gather(m_fin, best)
            cache = jax.tree.map(lambda x: jnp.take(x, flat_parent, axis=0), cache)
            cur = cur + 1
            if s.early_stopping == "never" and s.length_penalty > 0.0:
                best_len = jnp.float32(length - 1)
            else:
                best_len = (cur - 1).astype(jnp.float32)
            best_running = running_scores[:, :1] / best_len ** s.length_penalty
            worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
            unsat = st["unsat"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
            go = jnp.any(unsat) & ~(jnp.all(finished) & (s.early_stopping is True)) & ~jnp.all(hits)
            return dict(cur=cur, running=running, sequences=sequences, running_scores=running_scores, scores=scores,
                        finished=finished, unsat=unsat, go=go, cache=cache)

        st = jax.lax.while_loop(cond, body, state)
        return st["sequences"][:, 0, 1:]

    return jax.jit(greedy if nb == 1 else beam)


def seq2seq_generate(fn, params, sources: list[list[int]], *, batch_size: int, pad_id: int,
                     buckets: list[int]) -> list[list[int]]:
    """New tokens per source (in order), right-padded sources bucketed by length; fixed batch shape."""
    from jaxsft.data.batching import bucket_for

    return _batched(sources, batch_size, pad_id, lambda n: bucket_for(n, buckets), left=False,
                    call=lambda ids, mask, start: fn(params, ids, mask))
