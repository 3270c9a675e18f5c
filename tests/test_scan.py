"""Speed options of the decoder family: scanned layers (parity, HF names both ways, depth-independent programs),
per-layer remat and the chunked cross-entropy (equal loss and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import defaults, optim, parallel
from jaxsft.models import Functional, build_model, flatten_state, load_weights, to_hf_weights
from jaxsft.tasks import causal_lm

tf = pytest.importorskip("transformers")

VOCAB = 101
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.1)


def _weights(cfg, seed=0):
    """Random PyTorch-named weights for `cfg` (from our own unscanned model, perturbed)."""
    from flax import nnx

    model = build_model(cfg, "causal_lm", jnp.float32, seed)
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rng = np.random.RandomState(seed)
    params = {k: np.asarray(v) + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    return to_hf_weights(params)


def _batch(b=2, t=12, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, 5:] = 2  # a packed row
    seg[1, 10:] = 0  # padding
    from jaxsft.data.packing import next_token_targets

    starts = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    idx = np.broadcast_to(np.arange(t), (b, t))
    pos = (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)).astype(np.int32)
    targets, mask = next_token_targets(ids, seg, np.ones_like(ids))
    return {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "segment_ids": seg, "positions": pos,
            "targets": targets, "loss_mask": mask, "weights": mask.sum(1)}


SCAN_VARIANTS = {
    "llama-tied": lambda: tf.LlamaConfig(tie_word_embeddings=True, **SMALL),
    "llama-untied-bias": lambda: tf.LlamaConfig(tie_word_embeddings=False, attention_bias=True, **SMALL),
    "mistral-window": lambda: tf.MistralConfig(sliding_window=4, **SMALL),
    "qwen3-qk-norm": lambda: tf.Qwen3Config(head_dim=16, **SMALL),
}


@pytest.mark.parametrize("variant", list(SCAN_VARIANTS))
def test_scanned_layers_equal_unscanned_and_map_hf_names_both_ways(variant):
    cfg = SCAN_VARIANTS[variant]()
    weights = _weights(cfg)
    plain = build_model(cfg, "causal_lm", jnp.float32, 0)
    scanned = build_model(cfg, "causal_lm", jnp.float32, 0, {"scan_layers": True})
    p_plain, _ = load_weights(plain, weights, "test")
    p_scan, report = load_weights(scanned, weights, "test")
    assert not report.missing
    assert p_scan["model.layers.self_attn.q_proj.kernel"].shape[0] == 3
    assert not any(k.startswith("model.layers.0.") for k in p_scan)
    batch = _batch()
    args = (batch["input_ids"], batch["attention_mask"])
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    a = Functional(plain).apply(p_plain, *args, **kw)
    b = Functional(scanned).apply(p_scan, *args, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    back = to_hf_weights(p_scan)  # export: per-layer HF names again, equal values
    assert set(back) == set(to_hf_weights(p_plain))
    for k, v in back.items():
        np.testing.assert_array_equal(v, weights[k])


def test_scanned_layers_kv_cache_decoding_equals_full_forward():
    cfg = tf.LlamaConfig(**SMALL)
    scanned = build_model(cfg, "causal_lm", jnp.float32, 0, {"scan_layers": True})
    params, _ = load_weights(scanned, _weights(cfg), "test")
    f = Functional(scanned)
    ids = np.random.RandomState(1).randint(3, VOCAB, (2, 6)).astype(np.int32)
    full = f.apply(params, ids, np.ones_like(ids))
    cache = f.method(params, "init_cache", 2, 8, jnp.float32)
    slots = np.zeros((2, 8), np.int32)
    slots[:, :6] = 1
    logits, cache = f.apply(params, ids[:, :5], slots, positions=np.broadcast_to(np.arange(5), (2, 5)), cache=cache,
                            cache_index=0)
    last, _ = f.apply(params, ids[:, 5:], slots, positions=np.full((2, 1), 5), cache=cache, cache_index=5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :5]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, 5]), atol=1e-5)


def _loss_and_grads(model, params, batch, config):
    f = Functional(model)

    def sums(p):
        s, n = causal_lm.train_sums(f, p, batch, None, config)
        return s / n

    return jax.jit(jax.value_and_grad(sums))(params)


ALL_OPTIONS = ((7, {}), (5, {"remat": "dots"}), (64, {"scan_layers": True, "remat": "full"}))


@pytest.mark.parametrize("tied,variants", [(True, ALL_OPTIONS), (False, ALL_OPTIONS[:1])])
def test_chunked_loss_and_remat_equal_the_plain_loss_and_gradients(tied, variants):
    cfg = tf.LlamaConfig(tie_word_embeddings=tied, **SMALL)
    weights = _weights(cfg)
    batch = _batch()
    config = defaults.base_config()
    config.label_smoothing = 0.1
    ref_model = build_model(cfg, "causal_lm", jnp.float32, 0)
    params, _ = load_weights(ref_model, weights, "test")
    ref_loss, ref_grads = _loss_and_grads(ref_model, params, batch, config)
    for chunk, options in variants:
        config.chunked_loss_size = chunk
        model = build_model(cfg, "causal_lm", jnp.float32, 0, options)
        p, _ = load_weights(model, weights, "test")
        loss, grads = _loss_and_grads(model, p, batch, config)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        flat = to_hf_weights(grads)
        for k, g in to_hf_weights(ref_grads).items():
            np.testing.assert_allclose(flat[k], g, atol=1e-5, rtol=1e-4, err_msg=f"{k} chunk={chunk} {options}")


def test_scanned_program_does_not_grow_with_depth():
    """One while loop runs the layers: the compiled program of 8 layers is about the size of 2 layers'."""
    sizes = {}
    for n in (2, 8):
        cfg = tf.LlamaConfig(**{**SMALL, "num_hidden_layers": n})
        model = build_model(cfg, "causal_lm", jnp.float32, 0, {"scan_layers": True})
        from flax import nnx

        params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        f, batch = Functional(model), _batch()
        def loss(p, f=f, batch=batch):
            return causal_lm.train_sums(f, p, batch, None, defaults.base_config())[0]

        text = jax.jit(jax.grad(loss)).lower(params).as_text()
        sizes[n] = len(text)
    assert sizes[8] < 1.2 * sizes[2], sizes


def test_scanned_params_shard_with_a_leading_none_and_norms_are_not_decayed():
    cfg = tf.LlamaConfig(**SMALL)
    from flax import nnx

    model = build_model(cfg, "causal_lm", jnp.float32, 0, {"scan_layers": True})
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    from jaxsft.models import decoder

    spec = parallel.spec_for("model.layers.self_attn.q_proj.kernel", (3, 32, 32), decoder.PARTITION_RULES,
                             {"data": 1, "fsdp": 2, "tensor": 2})
    assert tuple(spec) == (None, "fsdp", "tensor")
    norm = parallel.spec_for("model.layers.input_layernorm.scale", (3, 32), decoder.PARTITION_RULES,
                             {"data": 1, "fsdp": 2, "tensor": 2})
    assert tuple(norm) == ()
    mask = optim.decay_mask(params)
    assert not mask["model.layers.input_layernorm.scale"] and mask["model.layers.mlp.up_proj.kernel"]


def test_scan_refuses_mixed_windows_and_other_families():
    from jaxsft.errors import UserError

    mixed = tf.Qwen3Config(head_dim=16, use_sliding_window=True, sliding_window=3, max_window_layers=1, **SMALL)
    with pytest.raises(UserError, match="scan_layers"):
        build_model(mixed, "causal_lm", jnp.float32, 0, {"scan_layers": True})
    gpt2 = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    with pytest.raises(UserError, match="scan_layers"):
        build_model(gpt2, "causal_lm", jnp.float32, 0, {"scan_layers": True})
    with pytest.raises(UserError, match="remat"):
        build_model(tf.LlamaConfig(**SMALL), "causal_lm", jnp.float32, 0, {"remat": "some"})


def test_packed_mask_layout_and_cpu_fallback(monkeypatch):
    """The cuDNN packed layout (lengths, STARTS, -1 fill; trailing padding one more segment) and, off GPU, the
    dense-mask path with equal logits (the cuDNN kernel itself runs only on a GPU: benchmarks/gpu_check.sh)."""
    from jaxsft.models import decoder, layers

    seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    m = layers.packed_mask(jnp.asarray(seg), None, max_segments=4)
    np.testing.assert_array_equal(m.seqlens, [[3, 2, 3, -1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(m.offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
    assert bool(m.fits)
    assert not bool(layers.packed_mask(jnp.asarray([[1, 2, 3, 4, 5, 0]]), None, max_segments=4).fits)
    assert not bool(layers.packed_mask(jnp.asarray([[1, 0, 2, 2]]), None, max_segments=4).fits)

    cfg = tf.LlamaConfig(**SMALL)
    model = build_model(cfg, "causal_lm", jnp.float32, 0)
    params, _ = load_weights(model, _weights(cfg), "test")
    batch = _batch()
    f = Functional(model)

    def logits():
        return np.asarray(f.apply(params, batch["input_ids"], batch["attention_mask"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"]))

    plain = logits()
    monkeypatch.setattr(decoder, "use_packed_attention", lambda: True)  # PackedMask built; CPU → dense path
    np.testing.assert_allclose(logits(), plain, atol=1e-6)


@pytest.mark.slow
def test_scanned_sft_run_learns_and_exports_what_transformers_loads(tmp_path):
    """jaxsft.run with scan_layers + remat + chunked CE learns; the export has per-layer HF names and equal logits."""
    torch = pytest.importorskip("torch")
    from conftest import alpaca_rows, make_tiny_decoder, write_jsonl
    from test_sft import cli

    from jaxsft import hf_io

    model = make_tiny_decoder(tmp_path / "llama")
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(96, seed=0))
    w = tmp_path / "w"
    cli("run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={tmp_path / 'train.jsonl'}", "--config.data.eval_fraction=0.1",
        "--config.max_steps=24", "--config.learning_rate=1e-2", "--config.max_length=128", "--config.batch_size=8",
        "--config.dtype=float32", "--config.log_every_steps=8", "--config.warmup_steps=0",
        "--config.model.scan_layers=True", "--config.model.remat=dots", "--config.chunked_loss_size=96")
    import json

    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if "loss" in e]
    assert losses[-1] < 0.6 * losses[0], losses
    out = tmp_path / "export"
    cli("export", "--workdir", w, "--output", out)
    weights = hf_io.read_weights(out)
    assert "model.layers.1.self_attn.q_proj.weight" in weights
    hf = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(0).randint(3, 200, (2, 10))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    cfg = tf.AutoConfig.from_pretrained(out)
    ours = build_model(cfg, "causal_lm", jnp.float32, 0, {"scan_layers": True})
    params, report = load_weights(ours, weights, "export")
    assert not report.missing
    got = Functional(ours).apply(params, ids.astype(np.int32), np.ones_like(ids, dtype=np.int32))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", pytest.param("roberta", marks=pytest.mark.slow)])
def test_encoder_scan_and_remat_equal_the_plain_encoder_with_dropout_and_padding(model_type):
    """BERT/RoBERTa: scanned layers and per-layer remat give the plain model's logits and gradients (dropout on,
    padded rows), and export the per-layer HF names."""
    cls = tf.BertConfig if model_type == "bert" else tf.RobertaConfig
    cfg = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=1, num_labels=3, initializer_range=0.1)
    plain = build_model(cfg, "classification", jnp.float32, 0)
    params = flatten_state(__import__("flax").nnx.to_pure_dict(__import__("flax").nnx.state(plain)))
    weights = to_hf_weights(params)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, VOCAB, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    ids[mask == 0] = 1
    key = jax.random.key(3)

    def loss_and_grads(options):
        model = build_model(cfg, "classification", jnp.float32, 0, options)
        p, report = load_weights(model, weights, "test")
        assert not report.missing
        f = Functional(model)
        loss = lambda q: jnp.sum(f.apply(q, ids, mask, rng=key) ** 2)
        return p, jax.jit(f.apply)(p, ids, mask), *jax.jit(jax.value_and_grad(loss))(p)

    p0, logits0, loss0, g0 = loss_and_grads({})
    prefix = "bert" if model_type == "bert" else "roberta"
    for options in ({"scan_layers": True}, {"remat": "full"}, {"scan_layers": True, "remat": "dots"}):
        p, logits, loss, g = loss_and_grads(options)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(logits0), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5)
        assert set(to_hf_weights(p)) == set(weights)
        if options.get("scan_layers"):
            stacked = g[f"{prefix}.encoder.layer.attention.self.query.kernel"]
            assert stacked.shape == (3, 32, 32)
            np.testing.assert_allclose(np.asarray(stacked[1]),
                                       np.asarray(g0[f"{prefix}.encoder.layer.1.attention.self.query.kernel"]),
                                       atol=1e-5, rtol=1e-4)
