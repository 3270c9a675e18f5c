"""Decoder LLMs (Llama, Mistral, Qwen2, Qwen3, GPT-2) against transformers' PyTorch classes and HF Flax checkpoints:
padding, packing, KV-cache decoding, classification heads, export round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED

from jaxsft import hf_io
from jaxsft.models import Functional, build_model, load_weights, to_hf_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

VOCAB = 101
PAD = 0
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}
VARIANTS = {
    "llama-gqa-llama3-untied": lambda: tf.LlamaConfig(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False, **SMALL),
    "llama-tied": lambda: tf.LlamaConfig(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, **SMALL),
    "mistral-window": lambda: tf.MistralConfig(sliding_window=4, **SMALL),
    "qwen2-bias": lambda: tf.Qwen2Config(tie_word_embeddings=True, **SMALL),
    "qwen3-qk-norm": lambda: tf.Qwen3Config(head_dim=16, use_sliding_window=True, sliding_window=3,
                                            max_window_layers=1, **SMALL),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  pad_token_id=PAD, initializer_range=0.1),
}


def hf_model(cfg, cls=tf.AutoModelForCausalLM):
    """A random PyTorch model with every parameter perturbed (norms ≠ 1, biases ≠ 0), in eval mode."""
    torch.manual_seed(0)
    model = cls.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def jax_model(model_or_folder, task="causal_lm", weights=None):
    """(apply, params, load report) of our model of the same config, filled with the PyTorch model's weights."""
    if isinstance(model_or_folder, torch.nn.Module):
        hf_config = model_or_folder.config
        weights = weights or {k: v.numpy() for k, v in model_or_folder.state_dict().items()}
    else:
        hf_config = tf.AutoConfig.from_pretrained(model_or_folder)
        weights = hf_io.read_weights(model_or_folder)
    model = build_model(hf_config, task, jnp.float32, 0)
    params, report = load_weights(model, weights, "test")
    return Functional(model), params, report


def padded_batch(side: str, lengths=(13, 9, 4), seed=0):
    rng = np.random.RandomState(seed)
    t = max(lengths)
    ids = rng.randint(3, VOCAB, (len(lengths), t))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask[:, ::-1].copy()
    return np.where(mask == 1, ids, PAD).astype(np.int32), mask.astype(np.int32)


def hf_logits(model, ids, mask, positions=None):
    kwargs = {} if positions is None else {"position_ids": torch.tensor(positions, dtype=torch.long)}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     **kwargs).logits.float().numpy()


def positions_of(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_lm_logits_match_transformers_with_right_and_left_padding(variant):
    model = hf_model(VARIANTS[variant]())
    f, params, report = jax_model(model)
    assert not report.missing and not report.unexpected
    apply = jax.jit(f.apply)
    for side in ("right", "left"):
        ids, mask = padded_batch(side)
        ref = hf_logits(model, ids, mask, positions_of(mask))
        ours = np.asarray(apply(params, ids, mask))
        real = mask == 1
        np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0, err_msg=side)
        assert np.abs(ref[real]).max() > 0.5 and ref[real].std(axis=0).mean() > 0.05  # not trivial


def test_tied_model_ignores_a_checkpoints_lm_head_and_has_no_head_param():
    model = hf_model(VARIANTS["llama-tied"]())
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    _, params, report = jax_model(model, weights=weights)
    assert not report.missing and not report.unexpected
    assert not any(k.startswith("lm_head") for k in params)


def test_base_model_checkpoint_gets_the_prefix():
    model = hf_model(VARIANTS["llama-gqa-llama3-untied"]())
    weights = {k.removeprefix("model."): v.numpy() for k, v in model.state_dict().items()}
    _, _, report = jax_model(model, weights=weights)
    assert not report.unexpected and report.missing == []
    gpt = hf_model(VARIANTS["gpt2"]())
    weights = {k.removeprefix("transformer."): v.numpy() for k, v in gpt.state_dict().items()}
    weights["h.0.attn.bias"] = np.tril(np.ones((64, 64), bool))[None, None]  # old checkpoints' mask buffer
    _, _, report = jax_model(gpt, weights=weights)
    assert not report.unexpected and not report.missing


@pytest.mark.parametrize("name", ["gpt2_lm", "llama_lm", "mistral_lm"])
def test_hf_flax_msgpack_checkpoint_matches_its_reference_logits(name):
    folder = SHARED / "fixtures" / "hf_flax" / name
    if not folder.is_dir():
        pytest.skip("../shared/fixtures/hf_flax not present")
    ref = np.load(folder / "reference_outputs.npz")
    ids, mask = ref["input_ids"], ref["attention_mask"]
    real = mask == 1
    hf_config = tf.AutoConfig.from_pretrained(folder)
    if name == "mistral_lm":
        # HF's FlaxMistral turned sliding_window=None into a diagonal-only mask: with a window of 1 we reproduce its
        # numbers (the msgpack weights are read right); with the real config we match PyTorch's MistralForCausalLM.
        hf_config.sliding_window = 1
    model = build_model(hf_config, "causal_lm", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(folder), str(folder))
    assert not report.missing and not report.unexpected
    ours = np.asarray(Functional(model).apply(params, ids, mask))
    np.testing.assert_allclose(ours[real], ref["logits"][real], atol=1e-4, rtol=0)
    if name == "mistral_lm":
        f, params, _ = jax_model(folder)
        pt = tf.MistralForCausalLM(tf.AutoConfig.from_pretrained(folder)).eval()
        pt.load_state_dict({k: torch.tensor(v) for k, v in to_hf_weights(params).items()})
        np.testing.assert_allclose(np.asarray(f.apply(params, ids, mask))[real], hf_logits(pt, ids, mask)[real],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["llama-gqa-llama3-untied", "gpt2"])
def test_packed_row_gives_each_example_its_own_logits(variant):
    f, params, _ = jax_model(hf_model(VARIANTS[variant]()))
    apply = jax.jit(f.apply)
    rng = np.random.RandomState(1)
    lengths = (5, 7, 3)
    examples = [rng.randint(3, VOCAB, (1, n)).astype(np.int32) for n in lengths]
    pad = 2
    ids = np.concatenate(examples + [np.full((1, pad), PAD, np.int32)], axis=1)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad)])[None]
    segments, positions = segments.astype(np.int32), positions.astype(np.int32)
    packed = np.asarray(apply(params, ids, None, positions=positions, segment_ids=segments))
    derived = np.asarray(apply(params, ids, None, segment_ids=segments))  # positions from segment starts
    np.testing.assert_allclose(derived[segments > 0], packed[segments > 0], atol=1e-6, rtol=0)
    start = 0
    for ex in examples:
        alone = np.asarray(apply(params, ex, np.ones_like(ex)))
        np.testing.assert_allclose(packed[:, start:start + ex.shape[1]], alone, atol=1e-5, rtol=0)
        start += ex.shape[1]


@pytest.mark.parametrize("variant", ["llama-gqa-llama3-untied", "qwen3-qk-norm", "gpt2"])
def test_kv_cache_decoding_matches_full_forward_and_compiles_once(variant):
    cfg = VARIANTS[variant]()
    model = build_model(cfg, "causal_lm", jnp.float32, 0)
    torch_model = hf_model(cfg)
    params, _ = load_weights(model, {k: v.numpy() for k, v in torch_model.state_dict().items()}, "test")
    f = Functional(model)
    prompt, prompt_mask = padded_batch("left", lengths=(5, 3, 7), seed=2)
    steps, batch, p = 4, prompt.shape[0], prompt.shape[1]
    cont = np.random.RandomState(3).randint(3, VOCAB, (batch, steps)).astype(np.int32)
    full_ids = np.concatenate([prompt, cont], 1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(cont)], 1)
    full = np.asarray(f.apply(params, full_ids, full_mask))

    max_length = p + steps + 3
    slots = np.zeros((batch, max_length), np.int32)
    slots[:, :p] = prompt_mask
    cache = model.init_cache(batch, max_length, jnp.float32)
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert cache["layers.0.k"].shape == (batch, max_length, kv_heads, head_dim) and len(cache) == 4
    step = jax.jit(lambda params, cache, ids, pos, slots, i: f.apply(params, ids, slots, positions=pos, cache=cache,
                                                                      cache_index=i))
    logits, cache = step(params, cache, prompt, positions_of(prompt_mask), slots, jnp.int32(0))
    real = prompt_mask == 1
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :p][real], atol=1e-4, rtol=0)
    pos = prompt_mask.sum(1, keepdims=True)
    for j in range(steps):
        slots[:, p + j] = 1
        logits, cache = step(params, cache, cont[:, j:j + 1], (pos + j).astype(np.int32), slots, jnp.int32(p + j))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, p + j], atol=1e-4, rtol=0)
    assert step._cache_size() == 2  # one prefill shape + one decode step shape, whatever the step index
    decode_only = jax.jit(lambda cache, ids, i: f.apply(params, ids, slots, positions=pos, cache=cache, cache_index=i))
    for i in range(3):
        decode_only(cache, cont[:, :1], jnp.int32(p + i))
    assert decode_only._cache_size() == 1


@pytest.mark.parametrize("variant", ["llama-gqa-llama3-untied", "gpt2"])
def test_sequence_classification_matches_transformers(variant):
    cfg = VARIANTS[variant]()
    cfg.num_labels = 3
    model = hf_model(cfg, tf.AutoModelForSequenceClassification)
    f, params, report = jax_model(model, task="classification")
    assert not report.missing and not report.unexpected
    for side in ("right", "left"):
        ids, mask = padded_batch(side, seed=4)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
        ours = np.asarray(jax.jit(f.apply)(params, ids, mask))
        assert ours.shape == (3, 3)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0, err_msg=side)
        assert np.abs(ref).max() > 0.1


def test_classification_without_pad_token_refuses_batches():
    cfg = VARIANTS["gpt2"]()
    cfg.pad_token_id = None
    model = build_model(cfg, "classification", jnp.float32, 0)
    ids, mask = padded_batch("right")
    with pytest.raises(ValueError, match="no padding token"):
        model(ids, mask)
    assert model(ids[:1], mask[:1]).shape == (1, 2)


def test_unsupported_settings_are_clear_errors():
    with pytest.raises(ValueError, match="add_cross_attention"):
        build_model(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, add_cross_attention=True), "causal_lm",
                    jnp.float32, 0)
    cfg = tf.LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0}, **SMALL)
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        build_model(cfg, "causal_lm", jnp.float32, 0)


@pytest.mark.parametrize("variant", ["llama-tied", "qwen2-bias", "qwen3-qk-norm", "gpt2"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(variant, tmp_path):
    cfg = VARIANTS[variant]()
    f, params, _ = jax_model(hf_model(cfg))
    params = {k: v + 0.01 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) for k, v in params.items()}
    hf_io.write_safetensors(to_hf_weights(params), tmp_path)
    cfg.save_pretrained(tmp_path)
    theirs, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded_batch("right", seed=5)
    ref = hf_logits(theirs.eval(), ids, mask)
    ours = np.asarray(jax.jit(f.apply)(params, ids, mask))
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)


def test_explicit_attention_path_handles_grouped_query_heads():
    from jaxsft.models.layers import attention, causal_mask

    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (2, 6, h, 8)) for key, h in ((kq, 4), (kk, 2), (kv, 2)))
    seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    idx = jnp.arange(6)[None]
    mask = causal_mask(seg, seg, idx, idx, window=2)
    fused = attention(q, k, v, mask, scale=0.3)
    explicit = attention(q, k, v, mask, dropout_rate=1e-9, rng=kd, scale=0.3)  # keeps everything: same maths
    np.testing.assert_allclose(np.asarray(explicit), np.asarray(fused), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["llama-gqa-llama3-untied", "gpt2"])
def test_dropout_only_with_an_rng_and_bfloat16_compute_runs(variant):
    cfg = VARIANTS[variant]()
    if variant != "gpt2":
        cfg.attention_dropout = 0.1
    ids, mask = padded_batch("right")
    model32 = build_model(cfg, "causal_lm", jnp.float32, 0)
    eval_logits = model32(ids, mask)
    train_logits = model32(ids, mask, rng=jax.random.PRNGKey(1))
    assert np.abs(np.asarray(train_logits - eval_logits)).max() > 1e-3
    model16 = build_model(cfg, "causal_lm", jnp.bfloat16, 0)
    logits16 = model16(ids, mask)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits16), np.asarray(eval_logits), atol=0.1, rtol=0)
    cache = model16.init_cache(3, 16)
    assert cache["layers.1.v"].dtype == jnp.bfloat16
    step, _ = model16(ids, jnp.pad(mask, ((0, 0), (0, 3))), positions=positions_of(mask), cache=cache, cache_index=0)
    np.testing.assert_allclose(np.asarray(step)[mask == 1], np.asarray(logits16)[mask == 1], atol=0.1, rtol=0)
