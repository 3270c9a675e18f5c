"""KV-cache decoding against transformers' `generate` (greedy, left-padded batches), sampling warpers, compiles."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import llm_tokenizer, make_tiny_decoder

from jaxsft import decoding, hf_io
from jaxsft.models import Functional, build_model, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

PROMPTS = ["the film was", "a long and winding story about the cast and the music of the",
           "price", "good food but the service was rather slow and the room"]


def load_jax(folder):
    hf_config = tf.AutoConfig.from_pretrained(folder)
    model = build_model(hf_config, "causal_lm", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(folder), str(folder))
    assert not report.missing and not report.unexpected
    return Functional(model), params


def hf_greedy(folder, prompts, n):
    tok = tf.AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


def until_eos(tokens, eos):
    out = []
    for t in tokens:
        out.append(t)
        if t == eos:
            break
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_greedy_generation_equals_transformers(kind, tmp_path):
    folder = make_tiny_decoder(tmp_path / kind, kind, std=0.1)
    tok = tf.AutoTokenizer.from_pretrained(folder)  # what a user gets (transformers may pick the family's class)
    functional, params = load_jax(folder)
    fn = decoding.make_generate_fn(functional, decoding.Sampling(max_new_tokens=20), (tok.eos_token_id,),
                                   tok.pad_token_id, jnp.float32)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = decoding.generate(fn, params, ids, batch_size=4, pad_id=tok.pad_token_id, max_prompt=64)
    theirs = hf_greedy(folder, PROMPTS, 20)
    for o, t in zip(ours, theirs):
        assert until_eos(o, tok.eos_token_id) == until_eos(t, tok.eos_token_id)
    distinct = {t for row in ours for t in row}
    assert len(distinct) >= 5, f"degenerate generations: {ours}"
    assert fn._cache_size() == 1


def test_decoding_compiles_once_per_shape_and_batches_independently(tiny_llama):
    tok = llm_tokenizer()
    functional, params = load_jax(tiny_llama)
    fn = decoding.make_generate_fn(functional, decoding.Sampling(max_new_tokens=8), (tok.eos_token_id,),
                                   tok.pad_token_id, jnp.float32)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    together = decoding.generate(fn, params, ids, batch_size=4, pad_id=tok.pad_token_id, max_prompt=64)
    alone = [decoding.generate(fn, params, [x], batch_size=4, pad_id=tok.pad_token_id, max_prompt=64)[0]
             for x in ids]
    assert together == alone  # padding and batch neighbours do not change a row's tokens
    assert fn._cache_size() == 1  # 5 calls, 1 shape (all prompts fit the 16-token bucket), 1 compilation


def test_sampling_warpers_match_transformers():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 50).astype(np.float32) * 3
    for s in [decoding.Sampling(temperature=0.7), decoding.Sampling(top_k=5), decoding.Sampling(top_p=0.8),
              decoding.Sampling(temperature=0.5, top_k=10, top_p=0.9)]:
        procs = tf.LogitsProcessorList()
        if s.temperature != 1.0:
            procs.append(tf.TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            procs.append(tf.TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            procs.append(tf.TopPLogitsWarper(s.top_p))
        ref = procs(None, torch.tensor(logits)).numpy()
        ours = np.asarray(decoding._warp(jnp.asarray(logits), s))
        keep_ref, keep_ours = np.isfinite(ref) & (ref > -1e30), ours > -1e30
        assert (keep_ref == keep_ours).all()
        np.testing.assert_allclose(ours[keep_ours], ref[keep_ref], rtol=1e-5)
        assert 0 < keep_ours.sum() < logits.size or s.temperature != 1.0


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_llama):
    tok = llm_tokenizer()
    functional, params = load_jax(tiny_llama)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    run = lambda s, seed: decoding.generate(  # noqa: E731
        decoding.make_generate_fn(functional, s, (tok.eos_token_id,), tok.pad_token_id, jnp.float32), params, ids,
        batch_size=4, pad_id=tok.pad_token_id, max_prompt=64, seed=seed)
    greedy = run(decoding.Sampling(max_new_tokens=6), 0)
    assert run(decoding.Sampling(max_new_tokens=6, do_sample=True, top_k=1), 3) == greedy
    a = run(decoding.Sampling(max_new_tokens=6, do_sample=True, temperature=2.0), 1)
    assert a == run(decoding.Sampling(max_new_tokens=6, do_sample=True, temperature=2.0), 1)
    assert a != run(decoding.Sampling(max_new_tokens=6, do_sample=True, temperature=2.0), 2)
    assert a != greedy  # temperature-2 sampling really samples
    vocab = tok.vocab_size
    assert all(len(row) <= 6 and all(0 <= t < vocab for t in row) for row in a)
