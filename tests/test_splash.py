"""Pallas splash attention (jaxsft.models.splash), TPU's attention kernel, against the XLA path on CPU: the kernel
runs in Pallas interpret mode (splash.INTERPRET); forward and gradients, causal / packed segments / padding /
grouped-query / sliding window, the dispatch in layers.attention, a decoder model under target_platform("tpu"),
and (marker tpu_aot, with libtpu) the sharded forward + backward compiled for a v5e:2x2 topology."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models import layers, splash


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(splash, "INTERPRET", True)
    monkeypatch.setattr(splash, "MAX_BLOCK", 128)  # several blocks even at T = 256: the kernel's block skipping


def qkv(b, t, s, h, kvh, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, s, kvh, d)),
            jax.random.normal(ks[2], (b, s, kvh, d)), jax.random.normal(ks[3], (b, t, h, d)))


def out_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))


def check(mask, dense, shapes, real_queries=None):
    """splash (layers.attention, implementation="splash") vs XLA with the dense mask: outputs and dq, dk, dv."""
    q, k, v, cot = qkv(*shapes)
    if real_queries is not None:  # queries whose output is defined the same on both paths
        cot = cot * real_queries[:, :, None, None]
    ours = jax.jit(lambda q, k, v, c: out_and_grads(
        lambda q, k, v: layers.attention(q, k, v, mask, implementation="splash"), q, k, v, c))(q, k, v, cot)
    ref = jax.jit(lambda q, k, v, c: out_and_grads(
        lambda q, k, v: layers.attention(q, k, v, dense, implementation="xla"), q, k, v, c))(q, k, v, cot)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all(), name
        if name == "out" and real_queries is not None:
            keep = np.asarray(real_queries, bool)
            a, b = a[keep], b[keep]
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, np.abs(b).max()), rtol=0, err_msg=name)
        assert np.abs(b).max() > 1e-2, name  # not trivially zero


def packed_segments(t, rows):
    """(B, T) jaxsft segments: each row a list of segment lengths, the rest padding (0)."""
    seg = np.zeros((len(rows), t), np.int32)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            seg[r, start:start + n] = i + 1
            start += n
    return jnp.asarray(seg)


def tpu_mask(seg, window=None):
    with layers.target_platform("tpu"):
        mask = layers.causal_segment_mask(seg, window)
    assert isinstance(mask, layers.SegmentMask)
    index = jnp.arange(seg.shape[1], dtype=jnp.int32)[None]
    dense = layers.causal_mask(seg, seg, index, index, window)
    np.testing.assert_array_equal(np.asarray(mask.dense), np.asarray(dense))  # exactly causal_mask's mask
    return mask, dense


def test_causal(interpret):
    mask, dense = tpu_mask(jnp.ones((2, 256), jnp.int32))
    check(mask, dense, (2, 256, 256, 2, 2, 64))


def test_packed_segments_with_trailing_padding_and_gqa(interpret):
    mask, dense = tpu_mask(packed_segments(256, [[100, 60, 40], [256], [3, 77]]))
    check(mask, dense, (3, 256, 256, 4, 2, 64))  # every query (padding too) is defined: exact everywhere


def test_sliding_window_over_packed_rows_multi_query(interpret):
    mask, dense = tpu_mask(packed_segments(256, [[200, 20], [150, 106]]), 100)  # partial blocks off the diagonal
    check(mask, dense, (2, 256, 256, 4, 1, 128))


def test_encoder_padding_and_cross_attention(interpret):
    keys = np.ones((3, 256), bool)
    keys[0, 200:] = False
    keys[2, :] = False  # an all-padding batch filler row: finite, its outputs not compared
    dense = jnp.asarray(keys)[:, None, None, :]
    real = jnp.asarray(keys.any(axis=1, keepdims=True) & np.ones((3, 256), bool), jnp.float32)
    check(dense, dense, (3, 256, 256, 2, 2, 64), real_queries=real)  # self-attention: padded queries see real keys
    check(dense, dense, (3, 128, 256, 2, 2, 64), real_queries=real[:, :128])  # cross-attention, T != S


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(splash, "attention", lambda *a, **kw: calls.append(kw) or a[0])
    q, k, v, _ = qkv(2, 128, 128, 2, 2, 64)
    seg = jnp.ones((2, 128), jnp.int32)
    index = jnp.arange(128)[None]
    def traced(fn):  # dispatch is decided while tracing: nothing compiled
        return jax.eval_shape(fn)

    with layers.target_platform("tpu"):
        mask = layers.causal_segment_mask(seg)
        traced(lambda: layers.attention(q, k, v, mask))
        assert calls and calls[-1]["causal"] and calls[-1]["window"] is None
        traced(lambda: layers.attention(q, k, v, seg.astype(bool)[:, None, None, :]))  # key padding (encoders)
        assert len(calls) == 2 and not calls[-1]["causal"]
        traced(lambda: layers.attention(q, k, v, mask, dropout_rate=0.1, rng=jax.random.key(0)))  # dropout: XLA
        traced(lambda: layers.attention(q, k, v, mask, bias=jnp.zeros((1, 2, 128, 128))))  # T5's bias: XLA
        traced(lambda: layers.attention(q, k, v, mask, implementation="xla"))  # cached decoding asks for XLA
        traced(lambda: layers.attention(q, k, v, layers.causal_mask(seg, seg, index, index)))  # dense mask: XLA
        short = layers.causal_segment_mask(seg[:, :100])
        out = traced(lambda: layers.attention(q[:, :100], k[:, :100], v[:, :100], short))  # T % 128: XLA
        assert len(calls) == 2 and out.shape == (2, 100, 2, 64)
    with layers.target_platform("tpu"):  # a PackedMask (GPU's) reaching a TPU step: its dense mask, on XLA
        packed = layers.packed_mask(seg, layers.causal_mask(seg, seg, index, index))
        traced(lambda: layers.attention(q, k, v, packed))
        assert len(calls) == 2
    with pytest.raises(ValueError, match="dense mask"):
        traced(lambda: layers.attention(q, k, v, layers.causal_mask(seg, seg, index, index),
                                        implementation="splash"))
    # elsewhere the decoders' masks stay dense arrays, as before
    _, mask_for = layers.decoder_context(seg, None, None, None, None, False)
    assert isinstance(mask_for(), jax.Array) and mask_for().shape == (2, 1, 128, 128)
    with layers.target_platform("tpu"):
        _, mask_for = layers.decoder_context(seg, None, None, None, None, False)
        assert isinstance(mask_for(4), layers.SegmentMask) and mask_for(4).window == 4
        _, mask_for = layers.decoder_context(seg, jnp.ones((2, 128)), index, None, 0, True)  # cached: dense
        assert isinstance(mask_for(), jax.Array)


def test_block_sizes_and_sharding_specs():
    assert [splash._block(n) for n in (128, 256, 384, 512, 1024, 1536)] == [128, 256, 128, 512, 512, 512]
    devices = np.array(jax.devices() * 8)[:8] if len(jax.devices()) < 8 else np.array(jax.devices()[:8])
    mesh = jax.sharding.Mesh(np.asarray(devices, object).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    P = jax.sharding.PartitionSpec
    assert splash._specs(mesh, 8, 8, 2) == (P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None), 4)
    assert splash._specs(mesh, 6, 8, 1) == (P(None, None, None, None), P(None, None), 8)  # neither divides


def test_decoder_model_on_tpu_matches_xla(interpret, monkeypatch):
    tf = pytest.importorskip("transformers")
    from flax import nnx

    from jaxsft.models import Functional, build_model, flatten_state

    cfg = tf.MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=40, pad_token_id=0, initializer_range=0.2)
    ids = np.random.RandomState(0).randint(3, 101, (2, 128)).astype(np.int32)
    seg = np.asarray(packed_segments(128, [[50, 60], [128]]))
    ids = np.where(seg == 0, 0, ids)
    model = build_model(cfg, "causal_lm", jnp.float32, 0, {"scan_layers": True, "remat": "full"})  # through scan, remat
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    f = Functional(model)
    ref = np.asarray(jax.jit(functools.partial(apply_logits, f))(params, ids, seg))
    calls = []
    kernel = splash.attention
    monkeypatch.setattr(splash, "attention", lambda *a, **kw: calls.append(kw["window"]) or kernel(*a, **kw))
    with layers.target_platform("tpu"):  # traced for TPU (a new function: jit's cache has no platform key)
        ours = np.asarray(jax.jit(functools.partial(apply_logits, f))(params, ids, seg))
    assert calls == [40], calls  # one scanned layer body, its sliding window: splash, no dense mask
    real = seg > 0
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    assert np.isfinite(ours).all() and ref[real].std() > 0.05


def apply_logits(f, params, ids, seg):
    return f.apply(params, ids, None, segment_ids=seg)


@pytest.mark.tpu_aot
def test_sharded_splash_compiles_for_a_tpu_topology():
    """Forward + backward of the splash path under a (data 2, fsdp 1, tensor 2) mesh of a v5e:2x2 topology, lowered
    and compiled by libtpu on this host (no TPU): the kernels are Mosaic custom calls, per shard under shard_map."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no /tmp/libtpu_lockfile: other jax processes may run

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    except Exception as e:  # noqa: BLE001 - a libtpu that cannot describe it: nothing to check here
        pytest.skip(f"no v5e:2x2 topology from libtpu: {e}")
    mesh = jax.sharding.Mesh(np.asarray(topology.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    b, t, h, kvh, d = 4, 256, 4, 2, 128

    def step(q, k, v, seg, keys):
        with layers.activations_on(mesh):
            def loss(q, k, v):
                causal = layers.attention(q, k, v, layers.causal_segment_mask(seg, None))
                window = layers.attention(q, k, v, layers.causal_segment_mask(seg, 64))
                encoder = layers.attention(q, k, v, keys[:, None, None, :])
                return sum(x.astype(jnp.float32).sum() for x in (causal, window, encoder))

            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=batch),
            jax.ShapeDtypeStruct((b, t, kvh, d), jnp.bfloat16, sharding=batch),
            jax.ShapeDtypeStruct((b, t, kvh, d), jnp.bfloat16, sharding=batch),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch),
            jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=batch)]
    lowered = jax.jit(step).lower(*args)
    text = lowered.as_text()
    assert text.count("tpu_custom_call") == 9  # 3 calls x (forward, dq, dkv)
    compiled = lowered.compile()
    assert compiled.as_text().count("custom-call") >= 9
