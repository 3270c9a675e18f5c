"""Pieces every family shares: dense/embedding/norm constructors, activations, dropout, rotary embeddings,
attention masks and dispatch, the KV cache, last-token pooling."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

F32 = jnp.float32


def dense(features_in: int, features_out: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02,
          use_bias: bool = True) -> nnx.Linear:
    """A Linear with float32 master weights computing in `dtype` (HF init: normal(std), zero bias)."""
    return nnx.Linear(features_in, features_out, use_bias=use_bias, dtype=dtype, param_dtype=F32,
                      kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros, rngs=rngs)


def embed(num: int, features: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Embed:
    return Embed(num, features, dtype=dtype, param_dtype=F32, embedding_init=nnx.initializers.normal(std), rngs=rngs)


ONE_HOT_GRAD_ROWS = 4096  # on GPU / TPU, tables up to this many rows take their gradient as a one-hot matmul


class Embed(nnx.Embed):
    """nnx.Embed whose lookup reads the float32 table and casts the rows, so the table's gradient is accumulated
    in float32 (`embedding_lookup`), never scatter-added in the compute dtype."""

    def __call__(self, inputs, out_sharding=None):
        if out_sharding is not None or self.num_embeddings == 1 or not jnp.issubdtype(inputs.dtype, jnp.integer):
            return super().__call__(inputs, out_sharding)
        return embedding_lookup(self.embedding[...], inputs, self.dtype or self.embedding[...].dtype)


def embedding_lookup(table, ids, dtype):
    """`jnp.take(table, ids, axis=0).astype(dtype)` with a float32 gradient and no write contention.

    The plain lookup on a bf16 copy of the table differentiates into a bf16 scatter-add: every token adds its row's
    gradient into the table in bf16. Rows many tokens share (BERT's token type 0 and its positions, T5's relative
    buckets, the padding id) then serialise on a GPU's compare-and-swap loop, and the sum is rounded to bf16 at
    every add: on an H200 that one scatter took 85-119 ms of a 140-170 ms BERT-base step at batch 256 (GPU
    profile, benchmarks/README.md). Here the gradient is summed in float32: for small tables on GPU / TPU as a
    one-hot matmul (no scatter), otherwise a float32 segment sum."""
    num = table.shape[0]
    one_hot = num <= ONE_HOT_GRAD_ROWS and platform() in ("gpu", "tpu")
    return _lookup(table, ids, jnp.dtype(dtype).name, num, one_hot)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lookup(table, ids, dtype: str, num: int, one_hot: bool):
    return jnp.take(table, ids, axis=0).astype(dtype)


def _lookup_fwd(table, ids, dtype, num, one_hot):
    return _lookup(table, ids, dtype, num, one_hot), ids


def _lookup_bwd(dtype, num, one_hot, ids, g):
    flat_ids, flat_g = ids.reshape(-1), g.reshape(-1, g.shape[-1])
    if one_hot:
        grad = jnp.einsum("nv,nd->vd", jax.nn.one_hot(flat_ids, num, dtype=g.dtype), flat_g,
                          preferred_element_type=F32)
    else:
        grad = jax.ops.segment_sum(flat_g.astype(F32), flat_ids, num_segments=num)
    return grad.astype(F32), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm computed in float32 whatever the activations' dtype; returns the input dtype."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, use_bias: bool = True):
        super().__init__(features, epsilon=eps, use_bias=use_bias, dtype=F32, param_dtype=F32, rngs=rngs)

    def __call__(self, x):
        return super().__call__(x.astype(F32)).astype(x.dtype)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


def dropout(x, rate: float, rng):
    """Inverted dropout; a no-op when `rng` is None (evaluation) or the rate is 0."""
    if rng is None or rate <= 0.0:
        return x
    return jnp.where(dropout_keep(rng, x.shape, rate), x / (1.0 - rate), jnp.zeros_like(x))


def _mix32(h):
    """lowbias32 (C. Wellons' hash-prospector): a bijective uint32 hash with near-ideal avalanche."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def dropout_keep(rng, shape: tuple, rate: float):
    """Where dropout keeps a value (probability 1 - rate): a counter-based hash of (key, element index).

    Not threefry (jax.random.bernoulli): its 20 rounds per pair of words cost about 15% of a BERT training step on
    CPU and ~2 s of compile per batch shape (measured, MiniLM batch 32); two rounds of an integer hash over the
    element's index, seeded by the site's key (sub_rng: distinct per step, layer and site), are enough for masks.
    The index is built from per-axis iotas, so a sharded activation hashes its own slice and the mask does not depend
    on the mesh. Arrays of 2**32 elements or more fall back to jax.random.bernoulli."""
    size = math.prod(shape)
    if size >= 2**32:
        return jax.random.bernoulli(rng, 1.0 - rate, shape)
    words = jax.random.key_data(rng).reshape(-1).astype(jnp.uint32)
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    bits = index
    for w in (words[0], words[-1]):  # threefry keys have 2 words, rbg 4
        bits = _mix32(bits ^ w)
    return bits >= jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))


NEFTUNE_KEY = 7919  # folded into the step's key for the embedding noise, apart from every dropout site's


def neftune(x, alpha: float, rng):
    """NEFTune (Jain et al., 2023) as transformers' `neftune_post_forward_hook` defines it: while training (a key
    given), the input embeddings (batch, L, d) get uniform noise in [-alpha / sqrt(L * d), +alpha / sqrt(L * d)],
    L the batch's padded length; unchanged in evaluation and decoding, or with alpha 0."""
    if not alpha or rng is None:
        return x
    mag = alpha / math.sqrt(x.shape[1] * x.shape[2])
    noise = jax.random.uniform(jax.random.fold_in(rng, NEFTUNE_KEY), x.shape, F32, -mag, mag)
    return (x.astype(F32) + noise).astype(x.dtype)


def sub_rng(rng, *ids: int):
    """A distinct dropout key per call site; None stays None."""
    if rng is None:
        return None
    for i in ids:
        rng = jax.random.fold_in(rng, i)
    return rng


# ---- packed segments for cuDNN's variable-length kernel (GPU only; UNMEASURED in jaxsft so far) ---------------

MAX_PACKED_SEGMENTS = 64  # per row, the trailing padding counted as one; rows with more take the dense-mask path


class PackedMask(NamedTuple):
    """A segment-causal mask of packed rows, with the layout cuDNN's packed (THD-style) kernel takes: per row the
    segment lengths `seqlens` (B, M) and segment STARTS `offsets` (B, M + 1), both -1 after the row's last segment
    (no end offset; ../shared/perf/README.md). The trailing padding of a row is one more segment, so every token
    belongs to one (padding sees padding only, as `causal_mask` lets it see itself). `fits`: every row has
    contiguous segments 1..k then padding, at most M in all; otherwise `dense` is used."""

    dense: jax.Array  # boolean (B, 1, T, T), the same mask for every other path
    seqlens: jax.Array
    offsets: jax.Array
    fits: jax.Array


def packed_mask(segment_ids, dense, max_segments: int = MAX_PACKED_SEGMENTS) -> PackedMask:
    seg = segment_ids.astype(jnp.int32)
    k = seg.max(axis=1, keepdims=True)
    seg = jnp.where(seg == 0, k + 1, seg)  # trailing padding: segment k + 1
    step = jnp.diff(seg, axis=1)
    fits = (seg[:, 0] == 1).all() & ((step == 0) | (step == 1)).all() & (seg.max() <= max_segments)
    member = seg[:, :, None] == jnp.arange(1, max_segments + 1, dtype=jnp.int32)  # (B, T, M)
    lengths = member.sum(axis=1, dtype=jnp.int32)
    starts = jnp.argmax(member, axis=1).astype(jnp.int32)
    present = lengths > 0
    fill = jnp.full((seg.shape[0], 1), -1, jnp.int32)
    return PackedMask(dense, jnp.where(present, lengths, -1),
                      jnp.concatenate([jnp.where(present, starts, -1), fill], axis=1), fits)


def _cudnn_packed():
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        return fa
    except Exception:  # noqa: BLE001 - a JAX without it: the dense-mask path
        return None


# ---- segment masks for splash attention (TPU; jaxsft.models.splash) ---------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """A mask given by per-token segment ids, as Pallas splash attention takes it (no (B, 1, T, S) array): query t
    sees key s iff q_segments[t] == kv_segments[s] and, when `causal`, s <= t and (with a sliding `window`)
    t - s < window. Made on TPU only (`causal_segment_mask`); attention() hands it to splash where the kernel
    takes the call, and uses `dense` (the same mask as a boolean (B, 1, T, S)) everywhere else."""

    q_segments: jax.Array  # int32 (B, T)
    kv_segments: jax.Array  # int32 (B, S)
    causal: bool = dataclasses.field(default=True, metadata={"static": True})
    window: int | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def dense(self):
        visible = self.q_segments[:, :, None] == self.kv_segments[:, None, :]
        if self.causal:
            qi = jnp.arange(self.q_segments.shape[1], dtype=jnp.int32)[:, None]
            ki = jnp.arange(self.kv_segments.shape[1], dtype=jnp.int32)[None, :]
            visible &= ki <= qi
            if self.window is not None:
                visible &= ki > qi - self.window
        return visible[:, None]


def causal_segment_mask(segments, window: int | None = None):
    """Causal self-attention over T slots of (B, T) segments (0: padding), uncached: `causal_mask`'s mask, as a
    SegmentMask on TPU (each padding token its own segment, a unique negative id, so it sees itself alone, as
    `causal_mask` lets it) and as the dense array elsewhere."""
    if platform() != "tpu":
        index = jnp.arange(segments.shape[1], dtype=jnp.int32)[None]
        return causal_mask(segments, segments, index, index, window)
    seg = segments.astype(jnp.int32)
    ids = jnp.where(seg == 0, -1 - jnp.arange(seg.shape[1], dtype=jnp.int32)[None], seg)
    return SegmentMask(ids, ids, True, window)


def _splash(q, k, v, mask, bias, no_dropout: bool, scale: float, forced: bool):
    """Splash attention's output where the kernel takes the call (a SegmentMask, a (B, 1, 1, S) key-padding mask
    or none; sequence lengths multiples of 128; no bias, no dropout); None otherwise, or an error when `forced`
    (implementation="splash")."""
    from jaxsft.models import splash

    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if isinstance(mask, SegmentMask):
        q_seg, kv_seg, causal, window = mask.q_segments, mask.kv_segments, mask.causal, mask.window
    elif mask is None:
        q_seg = kv_seg = None
        causal, window = False, None
    elif getattr(mask, "ndim", 0) == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.dtype == jnp.bool_:
        # Key padding (encoders, cross-attention): every query sees the real keys; a row without any (batch
        # filler) sees every key instead of none (finite, as XLA's uniform average over it is; ignored downstream).
        keys = jnp.broadcast_to(mask.reshape(mask.shape[0], s), (b, s))
        kv_seg = jnp.where(keys.any(axis=1, keepdims=True), keys, True).astype(jnp.int32)
        q_seg, causal, window = jnp.ones((b, t), jnp.int32), False, None
    else:
        causal = window = None
    dense = f"a dense mask of shape {mask.shape}" if hasattr(mask, "shape") else f"a {type(mask).__name__}"
    reason = (dense if causal is None else
              splash.unsupported(q, k, v, bias=bias, dropout=not no_dropout, causal=causal, window=window))
    if reason is not None:
        if forced:
            raise ValueError(f"splash attention cannot take this call: {reason}")
        if reason not in _WARNED:  # said once per reason, never silently
            _WARNED.add(reason)
            import logging

            logging.getLogger("jaxsft").warning("attention: XLA instead of splash (%s)", reason)
        return None
    return splash.attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal, window=window,
                            scale=scale, mesh=_STEP_MESH.get())


# ---- which platform the step is built for ------------------------------------------------------------------------

_PLATFORM: contextvars.ContextVar = contextvars.ContextVar("jaxsft_platform", default=None)


def target_platform(name: str | None):
    """Inside the `with` block, attention dispatches as on `name` ("gpu" | "tpu" | "cpu") whatever this process
    runs on: how a step is lowered for CUDA (`jax.export(..., platforms=["cuda"])`) or compiled for a TPU
    topology on a CPU host."""
    return context_value(_PLATFORM, {"cuda": "gpu", "rocm": "gpu"}.get(name, name))


def platform() -> str:
    """The platform the traced step will run on: `target_platform`'s, else the step mesh's devices', else JAX's
    default backend."""
    name = _PLATFORM.get()
    if name is not None:
        return name
    mesh = _STEP_MESH.get()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def use_packed_attention() -> bool:
    """Whether decoders hand attention() a PackedMask: on GPU, where cuDNN's packed kernel exists, unless the
    environment says JAXSFT_PACKED_ATTENTION=0 (then the dense segment mask goes to cuDNN, as before)."""
    if os.environ.get("JAXSFT_PACKED_ATTENTION", "1") == "0":
        return False
    return platform() == "gpu" and _cudnn_packed() is not None


_WARNED: set = set()


def _fallback(reason: str) -> str:
    """XLA attention where cuDNN cannot take the call: said once per reason, never silently."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        import logging

        logging.getLogger("jaxsft").warning("attention: XLA instead of cuDNN (%s)", reason)
    return "xla"


def attention_kernel(q, k, *, biased: bool, implementation: str | None = None) -> str:
    """"cudnn" | "xla": the kernel a dropout-free attention call takes. On GPU with half-precision inputs, cuDNN's
    fused attention unless its rules refuse the shapes (head dim a multiple of 8 up to 128 (256 from Hopper on;
    jaxsft keeps to 128 so one step fits every GPU), and with an additive bias, even query and key lengths,
    which its backward pass needs); XLA elsewhere."""
    if implementation is not None:
        return implementation
    if platform() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return "xla"
    d = q.shape[-1]
    if d % 8 or d > 128:
        return _fallback(f"head dim {d} is not a multiple of 8 up to 128")
    if biased and (q.shape[1] % 2 or k.shape[1] % 2):
        return _fallback(f"odd sequence length {q.shape[1]}x{k.shape[1]} with a bias or mask")
    return "cudnn"


def _xla_attention(q, k, v, mask, bias, scale):
    if bias is not None:  # XLA adds it to float32 scores
        bias = bias.astype(F32)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")


def _right_padded_lengths(mask):
    """(lengths (B,) int32, whether every row of the (B, 1, 1, S) key-padding mask is 1...1 0...0)."""
    keys = mask.reshape(mask.shape[0], mask.shape[-1])
    lengths = keys.sum(axis=-1, dtype=jnp.int32)
    right = (keys == (jnp.arange(keys.shape[1], dtype=jnp.int32)[None] < lengths[:, None])).all()
    return lengths, right


def _cudnn_attention(q, k, v, mask, bias, scale):
    """cuDNN's fused attention with the mask in a form it takes. A key-padding mask (B, 1, 1, S) becomes key
    lengths (cuDNN's padding mask: no bias tensor, no T % 2 rule) when every row is right-padded, as jaxsft's
    batches are; other rows take XLA (exact, never cuDNN's bias layout check: `Bias must have same seq length as
    QKV`). Any other mask is broadcast to (B, 1, T, S) and added as a bias."""
    if bias is not None:
        bias = bias.astype(q.dtype)
    if mask is not None and mask.shape[-2] == 1 and mask.ndim == 4 and mask.shape[1] == 1:
        lengths, right = _right_padded_lengths(mask)

        def padded(q, k, v):  # an all-padding row (batch filler) reads key 0: finite, and ignored downstream
            return jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=jnp.maximum(lengths, 1),
                                                scale=scale, implementation="cudnn")

        return jax.lax.cond(right, padded, lambda q, k, v: _xla_attention(q, k, v, mask, bias, scale), q, k, v)
    if mask is not None:
        b, t, s = q.shape[0], q.shape[1], k.shape[1]
        mask = jnp.broadcast_to(mask, (b if mask.shape[0] != 1 else 1, 1, t, s))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")


FORCED_ATTENTION: str | None = None  # config.model.attention="xla": every call takes XLA's path (set_attention)


def set_attention(choice: str | None) -> None:
    """config.model.attention: "auto" (the platform's kernel: cuDNN on GPU, splash on TPU, XLA elsewhere) or "xla"
    (XLA's explicit path everywhere: to compare kernels, or to step around one). Set for the process before the
    model is traced."""
    global FORCED_ATTENTION
    FORCED_ATTENTION = None if choice in (None, "", "auto") else choice


def attention(q, k, v, mask, *, bias=None, dropout_rate: float = 0.0, rng=None, scale: float | None = None,
              implementation: str | None = None):
    """Scaled dot-product attention: q (batch, T, heads, head_dim), k/v (batch, S, kv_heads, head_dim), a boolean
    mask broadcastable to (batch, heads, T, S). Grouped-query attention when kv_heads < heads (K/V not repeated).
    `bias`: an optional additive float bias on the scaled scores, broadcastable to (batch, heads, T, S) (T5's
    relative position bias).

    Training with attention-probability dropout takes the explicit path (no fused kernel has dropout); otherwise
    the kernel is `attention_kernel`'s choice for the platform the step is built for (`platform()`): cuDNN on GPU
    for half-precision inputs, XLA elsewhere, or the kernel named by `implementation` ("xla" | "cudnn").
    `mask` may be a PackedMask (packed decoder rows): on GPU with half-precision inputs and no bias or dropout,
    cuDNN's packed kernel runs (segment lengths + starts; fwd + bwd at 8 x 2048, GQA 32/8 x 64 on an H200: 2.49 ms
    vs 3.85 ms for the dense mask, benchmarks/gpu_check.sh), falling back to the dense mask for rows it cannot describe;
    everywhere else its dense mask is used.
    On TPU (or with implementation="splash") Pallas splash attention runs where it takes the call (`_splash`: a
    SegmentMask, a key-padding mask or none; lengths multiples of 128; no bias, no dropout); else XLA, a
    SegmentMask as its dense mask.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    no_dropout = not (rng is not None and dropout_rate > 0.0)
    implementation = implementation or FORCED_ATTENTION
    if implementation == "splash" or (implementation is None and platform() == "tpu"):  # TPU: Pallas splash
        out = _splash(q, k, v, mask, bias, no_dropout, scale, forced=implementation == "splash")
        if out is not None:
            return out
    if isinstance(mask, SegmentMask):
        mask = mask.dense
    if isinstance(mask, PackedMask):
        fa = _cudnn_packed()
        if (fa is not None and no_dropout and bias is None
                and attention_kernel(q, k, biased=True, implementation=implementation) == "cudnn"):
            def packed(q, k, v):
                return fa.dot_product_attention(q, k, v, q_seqlen=mask.seqlens, kv_seqlen=mask.seqlens,
                                                q_offsets=mask.offsets, kv_offsets=mask.offsets, scale=scale,
                                                mask_type=fa.MaskType.CAUSAL)

            def dense(q, k, v):
                return _cudnn_attention(q, k, v, mask.dense, None, scale)

            return jax.lax.cond(mask.fits, packed, dense, q, k, v)
        mask = mask.dense
    if not no_dropout:
        b, t, h, d = q.shape
        kvh = k.shape[2]
        qg = q.reshape(b, t, kvh, h // kvh, d)  # query head i reads kv head i // (h // kvh), as HF's repeat_kv
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(F32).reshape(b, h, t, -1) * scale
        if bias is not None:
            scores = scores + bias.astype(F32)
        scores = jnp.where(mask, scores, jnp.finfo(F32).min)
        probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, rng).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.reshape(b, kvh, h // kvh, t, -1), v)
        return out.reshape(b, t, h, d)
    padding_only = mask is not None and mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1
    biased = bias is not None or (mask is not None and not padding_only)
    if attention_kernel(q, k, biased=biased, implementation=implementation) == "cudnn":
        return _cudnn_attention(q, k, v, mask, bias, scale)
    return _xla_attention(q, k, v, mask, bias, scale)


REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(name: str | None):
    """config.model.remat → a jax.checkpoint policy; None: no rematerialisation. "dots" keeps the matmul outputs
    without batch dimensions (dots_with_no_batch_dims_saveable) and recomputes the rest; "full" keeps nothing."""
    if name in (None, "none"):
        return None
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    from jaxsft.errors import UserError

    raise UserError(f"config.model.remat: {name!r} is not one of {', '.join(REMAT_POLICIES)}")


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 whatever the activations' dtype; returns the input dtype. Param `scale`."""

    def __init__(self, features: int, *, eps: float):
        self.scale = nnx.Param(jnp.ones((features,), F32))
        self.eps = eps

    def __call__(self, x):
        y = x.astype(F32)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class Conv1D(nnx.Module):
    """GPT-2's Conv1D: a dense layer whose `weight` is stored (in, out), so its HF name needs no transpose."""

    def __init__(self, features_in: int, features_out: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.weight = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (features_in, features_out), F32))
        self.bias = nnx.Param(jnp.zeros((features_out,), F32))
        self.dtype = dtype

    def __call__(self, x):
        return x.astype(self.dtype) @ self.weight[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


# ---- rotary position embeddings -------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(cfg) -> dict:
    """The config's RoPE settings as transformers v5 spells them (`rope_parameters`), also from v4 fields."""
    params = getattr(cfg, "rope_parameters", None)
    if params is None:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rotary_inv_freq(params: dict, head_dim: int) -> tuple[float, ...]:
    """Inverse frequencies of RoPE (default, linear or llama3 scaling), as transformers computes them."""
    kind = params["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    inv = 1.0 / (np.float32(params["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv = inv.astype(np.float64)
    if kind == "linear":
        inv = inv / params["factor"]
    elif kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return tuple(float(f) for f in inv.astype(np.float32))


def rotary_tables(positions, inv_freq: tuple[float, ...]):
    """(cos, sin), each (batch, T, 1, head_dim / 2) in float32, for `apply_rotary`."""
    angles = positions[..., None].astype(F32) * jnp.asarray(inv_freq, F32)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rotary(x, rope):
    """Rotates (batch, T, heads, head_dim) with `rotary_tables` output, halves layout (HF's rotate_half), in fp32.
    Tables narrower than head_dim / 2 (partial_rotary_factor < 1) rotate the first 2 * width dims, pass the rest."""
    cos, sin = rope
    rotated = 2 * cos.shape[-1]
    x1, x2 = jnp.split(x[..., :rotated].astype(F32), 2, axis=-1)
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rotated < x.shape[-1]:
        out.append(x[..., rotated:].astype(F32))
    return jnp.concatenate(out, axis=-1).astype(x.dtype)


# ---- decoder masks, positions, KV cache --------------------------------------------------------------------------

def causal_mask(q_segments, kv_segments, q_index, kv_index, window: int | None = None):
    """Boolean (batch, 1, T, S): query t sees key s iff both are in the same nonzero segment, s is not later than t
    and (with a sliding window) closer than `window` slots. Every query also sees its own slot, so padding rows
    are never empty (no NaN from a kernel; real tokens never see padding)."""
    qs, ks = q_segments[:, :, None], kv_segments[:, None, :]
    qi, ki = q_index[:, :, None], kv_index[:, None, :]
    visible = (qs == ks) & (qs != 0) & (ki <= qi)
    if window is not None:
        visible &= ki > qi - window
    return (visible | (ki == qi))[:, None]


def default_positions(attention_mask):
    """0, 1, 2, ... over real tokens (left padding included): clip(cumsum(mask) - 1, 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def segment_positions(segment_ids):
    """Positions restarting at 0 at each segment start of packed rows."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def decoder_context(input_ids, attention_mask, positions, segment_ids, cache_index, cached: bool):
    """(positions, mask_for(window)) for a causal decoder call.

    Uncached: `segment_ids` (or else `attention_mask`) are the segments, positions default to per-segment ones.
    Cached: `attention_mask` (batch, max_length) marks valid cache slots; the T new tokens sit in slots
    [cache_index, cache_index + T) and `positions` must be given.
    """
    b, t = input_ids.shape
    if cached:
        if positions is None or attention_mask is None or cache_index is None:
            raise ValueError("decoding with a cache needs positions, cache_index and a (batch, max_length) "
                             "attention_mask over cache slots")
        q_seg, kv_seg = jnp.ones((b, t), jnp.int32), attention_mask.astype(jnp.int32)
        q_idx = (cache_index + jnp.arange(t, dtype=jnp.int32))[None]
        kv_idx = jnp.arange(attention_mask.shape[1], dtype=jnp.int32)[None]
    else:
        if segment_ids is None:
            seg = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
            positions = default_positions(seg) if positions is None else positions
        else:
            seg = segment_ids.astype(jnp.int32)
            if attention_mask is not None:
                seg = jnp.where(attention_mask == 0, 0, seg)
            positions = segment_positions(seg) if positions is None else positions
        q_seg = kv_seg = seg
        q_idx = kv_idx = jnp.arange(t, dtype=jnp.int32)[None]
        if platform() == "tpu":  # segment ids for splash attention, no (B, 1, T, T) array
            return positions.astype(jnp.int32), lambda window=None: causal_segment_mask(seg, window)
    return positions.astype(jnp.int32), lambda window=None: causal_mask(q_seg, kv_seg, q_idx, kv_idx, window)


def init_kv_cache(num_layers: int, batch_size: int, max_length: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """Zeros: {"layers.<i>.k" | "layers.<i>.v": (batch, max_length, kv_heads, head_dim)}."""
    shape = (batch_size, max_length, kv_heads, head_dim)
    return {f"layers.{i}.{n}": jnp.zeros(shape, dtype) for i in range(num_layers) for n in ("k", "v")}


def write_kv(cache: dict, layer: int, k, v, index):
    """Writes new keys/values at slots [index, index + T) of one layer; returns that layer's full (k, v)."""
    start = (0, jnp.asarray(index, jnp.int32), 0, 0)
    ck, cv = cache[f"layers.{layer}.k"], cache[f"layers.{layer}.v"]
    return (jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start),
            jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start))


def index_positions(input_ids):
    """0..T-1 in every row, pads included (transformers' default position_ids)."""
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def last_token_hidden(hidden, input_ids, pad_token_id: int | None):
    """Hidden state of the rightmost token that is not `pad_token_id`, as transformers' decoder
    *ForSequenceClassification pools (the last token when pad_token_id is None, batch size 1 only)."""
    if pad_token_id is None:
        if input_ids.shape[0] != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id).")
        return hidden[:, -1]
    index = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
    last = jnp.argmax(index * (input_ids != pad_token_id).astype(jnp.int32), axis=-1)
    return hidden[jnp.arange(hidden.shape[0]), last]


# ---- heads shared by decoder families --------------------------------------------------------------------------

class CausalLM(nnx.Module):
    """A decoder backbone (attribute `base_prefix`) + `lm_head`; with tied embeddings there is no lm_head and
    logits = hidden @ (the backbone's `embedding_name` table).T. Families subclass it to name the backbone."""

    base_prefix = ""
    embedding_name = ""

    def __init__(self, backbone: nnx.Module, cfg, dtype, rngs: nnx.Rngs, *, tied: bool, kv_heads: int,
                 head_dim: int):
        setattr(self, self.base_prefix, backbone)
        self.lm_head = None if tied else dense(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs,
                                               std=cfg.initializer_range, use_bias=False)
        self.dtype, self.cache_dims = dtype, (cfg.num_hidden_layers, kv_heads, head_dim)

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, rng=None, cache=None,
                 cache_index=None, hidden_only: bool = False):
        """Logits float32 (batch, T, vocab); with a cache, (logits, new_cache); `hidden_only`: the final hidden
        states (batch, T, hidden) instead of logits (for a chunked loss, see `head_kernel`)."""
        backbone = getattr(self, self.base_prefix)
        hidden, new_cache = backbone(input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                                     rng=rng, cache=cache, cache_index=cache_index)
        if hidden_only:
            return hidden
        if self.lm_head is None:
            logits = getattr(backbone, self.embedding_name).attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(F32) if cache is None else (logits.astype(F32), new_cache)

    def head_kernel(self):
        """The LM head as a float32 (hidden, vocab) matrix (the embedding table transposed when tied), so that
        logits = hidden.astype(dtype) @ kernel.astype(dtype) equal __call__'s; None when the head is not a plain
        linear map (a LoRA-adapted lm_head)."""
        if self.lm_head is None:
            return getattr(getattr(self, self.base_prefix), self.embedding_name).embedding[...].T
        if type(self.lm_head) is not nnx.Linear:
            return None
        return self.lm_head.kernel[...]

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """An empty KV cache: {"layers.<i>.k" | "layers.<i>.v": zeros (batch, max_length, kv_heads, head_dim)}."""
        layers, kv_heads, head_dim = self.cache_dims
        return init_kv_cache(layers, batch_size, max_length, kv_heads, head_dim, dtype or self.dtype)


class LastTokenClassifier(nnx.Module):
    """A decoder backbone → `score` (no bias) at the last non-pad token, as transformers' decoder
    *ForSequenceClassification. Positions are 0..T-1, pads included (transformers' default position_ids)."""

    base_prefix = ""

    def __init__(self, backbone: nnx.Module, cfg, dtype, rngs: nnx.Rngs):
        setattr(self, self.base_prefix, backbone)
        self.score = dense(cfg.hidden_size, cfg.num_labels, dtype=dtype, rngs=rngs, std=cfg.initializer_range,
                           use_bias=False)
        self.pad_token_id = getattr(cfg, "pad_token_id", None)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        """Logits float32 (batch, num_labels); token_type_ids are accepted for a uniform interface and ignored."""
        backbone = getattr(self, self.base_prefix)
        hidden, _ = backbone(input_ids, attention_mask, positions=index_positions(input_ids), rng=rng)
        return self.score(last_token_hidden(hidden, input_ids, self.pad_token_id)).astype(F32)


# ---- encoder-decoder (seq2seq) models ----------------------------------------------------------------------------

def padding_mask(attention_mask):
    """(batch, S) of 1/0 → boolean (batch, 1, 1, S): every query sees the real keys (encoder and cross-attention)."""
    return attention_mask.astype(bool)[:, None, None, :]


def seq2seq_decoder_slots(decoder_input_ids, decoder_attention_mask, cache, cache_index):
    """(query slots (T,), key slots (S,), causal self-attention mask (batch, 1, T, S)) of a seq2seq decoder call.

    Teacher forcing (no cache): the T tokens are slots 0..T-1; pads marked in `decoder_attention_mask` (right
    padding) are hidden. With a cache of max_length slots the T new tokens fill [cache_index, cache_index + T) and
    see every slot up to their own. The decoder side has no left padding, so a token's slot is its position."""
    b, t = decoder_input_ids.shape
    if cache is None:
        slots = jnp.arange(t, dtype=jnp.int32)
        seg = jnp.ones((b, t), jnp.int32) if decoder_attention_mask is None else decoder_attention_mask
        seg = seg.astype(jnp.int32)
        return slots, slots, causal_segment_mask(seg)  # the dense causal_mask; a SegmentMask on TPU
    q = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    kv = jnp.arange(cache["layers.0.k"].shape[1], dtype=jnp.int32)
    return q, kv, jnp.broadcast_to(kv[None, :] <= q[:, None], (b, 1, t, kv.shape[0]))


def self_attention_kv(k, v, cache, layer: int, cache_index, new_cache: dict):
    """Teacher forcing: (k, v) unchanged. With a cache: writes them at `cache_index`, records the layer's updated
    cache in `new_cache` and returns its full (k, v) in k's dtype."""
    if cache is None:
        return k, v
    ck, cv = write_kv(cache, layer, k, v, cache_index)
    new_cache[f"layers.{layer}.k"], new_cache[f"layers.{layer}.v"] = ck, cv
    return ck.astype(k.dtype), cv.astype(v.dtype)


class Seq2SeqLM(nnx.Module):
    """The call interface every encoder-decoder family shares: teacher forcing, `encode`, `cross_kv`, cached `decode`.

    A family provides `encode(input_ids, attention_mask, *, rng)`, `cross_attentions()` (its decoder layers'
    cross-attention modules, each with `kv(encoder_hidden)` → (k, v)), `run_decoder(decoder_input_ids, cross,
    attention_mask, decoder_attention_mask, *, rng, cache, cache_index)` → (hidden, new_cache), `logits(hidden)`,
    and the attributes `dtype` and `cache_dims` = (decoder layers, heads, head_dim).
    """

    base_prefix = ""

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None, *, rng=None):
        """Teacher-forced logits float32 (batch, T, vocab); `decoder_input_ids` are already shifted right."""
        encoded = self.encode(input_ids, attention_mask, rng=sub_rng(rng, 0))
        hidden, _ = self.run_decoder(decoder_input_ids, self.cross_kv(encoded), attention_mask, decoder_attention_mask,
                                     rng=sub_rng(rng, 1))
        return self.logits(hidden)

    def cross_kv(self, encoder_hidden) -> dict:
        """Cross-attention keys/values of every decoder layer, computed once per source batch:
        {"layers.<i>.k" | "layers.<i>.v": (batch, S, heads, head_dim)}."""
        out = {}
        for i, attn in enumerate(self.cross_attentions()):
            out[f"layers.{i}.k"], out[f"layers.{i}.v"] = attn.kv(encoder_hidden)
        return out

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """Empty self-attention K/V: {"layers.<i>.k" | "layers.<i>.v": zeros (batch, max_length, heads, head_dim)}."""
        layers, heads, head_dim = self.cache_dims
        return init_kv_cache(layers, batch_size, max_length, heads, head_dim, dtype or self.dtype)

    def decode(self, decoder_input_ids, cross: dict, attention_mask, *, cache: dict, cache_index):
        """(logits float32 (batch, T, vocab), new cache) for T decoder tokens at slots [cache_index, cache_index + T),
        attending the cached slots up to their own and, through `cross`, the source tokens `attention_mask` marks."""
        hidden, new_cache = self.run_decoder(decoder_input_ids, cross, attention_mask, None, rng=None, cache=cache,
                                             cache_index=cache_index)
        return self.logits(hidden), new_cache


# ---- partition rules (regex over flat param names → PartitionSpec; see parallel.py) -----------------------------
# Kernels are (in, out). The task heads every family shares: an untied LM head splits the vocabulary over 'tensor'
# (logits come out vocabulary-sharded), classification heads are small and shard only their input over 'fsdp'.
HEAD_RULES = (
    (r"(^|\.)lm_head\.kernel$", P("fsdp", "tensor")),
    (r"(^|\.)final_logits_bias$", P(None, "tensor")),
    (r"^(classifier|score)(\.dense|\.out_proj)?\.kernel$", P("fsdp")),
)


# ---- activation sharding ----------------------------------------------------------------------------------------

_STEP_MESH: contextvars.ContextVar = contextvars.ContextVar("jaxsft_step_mesh", default=None)
# JAXSFT_ACTIVATION_SHARDING=0: leave activation layouts to XLA alone (for comparison; benchmarks/collectives.py)
ACTIVATION_SHARDING = os.environ.get("JAXSFT_ACTIVATION_SHARDING", "1") != "0"


@contextlib.contextmanager
def context_value(var: contextvars.ContextVar, value):
    """`var` holds `value` inside the `with` block: what a function reads while it is being traced."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def activations_on(mesh):
    """While a step is traced for `mesh`: `split_batch` pins activations to its batch axes (None: a no-op)."""
    return context_value(_STEP_MESH, mesh)


def split_batch(x):
    """An activation (batch first) kept split over the mesh's (data, fsdp) axes and whole over `tensor`: the
    residual stream as FSDP and Megatron-style tensor parallelism keep it. Without it XLA's propagation may follow
    a weight sharded over `fsdp` instead and gather the whole global batch's activations (and logits) onto every
    device. Outside `activations_on`, or when the batch does not divide, `x` is returned as it is."""
    mesh = _STEP_MESH.get()
    if mesh is None or mesh.size == 1 or not ACTIVATION_SHARDING:
        return x
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if x.shape[0] % shards:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(("data", "fsdp"))))
