"""Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) for TPU steps.

XLA's attention materialises float32 scores (batch, heads, T, S) per layer, and packed rows a dense (B, 1, T, T)
mask; splash attention is a flash-attention kernel whose mask is static (causal, sliding window, full: the kernel
skips the blocks it hides) and-ed with per-token segment ids (packed rows, padding), so neither is ever built.

`attention(q, k, v, ...)` takes jaxsft's layout, q (B, T, H, D) and k/v (B, S, KVH, D): query t sees key s iff
`q_segment_ids[t] == kv_segment_ids[s]` and, when causal, s <= t (and t - s < window). Grouped-query attention
goes to the kernel as it is (query head i reads kv head i // (H // KVH), as HF's repeat_kv). The scale is applied
to q before the kernel (it has no scale of its own). Under a step mesh (`layers.activations_on`) the kernel runs
per shard under `shard_map`: batch split over the mesh's ("data", "fsdp") axes, heads over "tensor" when both H
and KVH divide; a batch that does not divide stays whole.

`supported(...)` says whether a call fits the kernel (sequence lengths multiples of 128, no additive bias, no
dropout); `layers.attention` takes this path on TPU when it does and XLA's otherwise. `INTERPRET = True` runs the
kernel in Pallas interpret mode (tests on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

INTERPRET = False  # tests: run the Pallas kernel in interpret mode (any backend, slow)

LANES = 128  # the kernel's sequence blocks are multiples of the TPU lane width
MAX_BLOCK = 512  # MaxText's default splash block sizes
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _block(n: int) -> int:
    """The largest of 512, 256, 128 dividing a sequence length (a multiple of 128)."""
    b = MAX_BLOCK
    while n % b:
        b //= 2
    return b


def unsupported(q, k, v=None, *, bias=None, dropout: bool = False, causal: bool = False,
                window: int | None = None) -> str | None:
    """Why the kernel cannot take this call, or None when it can."""
    if bias is not None:
        return "an additive attention bias"
    if dropout:
        return "attention dropout"
    if q.ndim != 4 or k.ndim != 4:
        return f"ranks {q.ndim}/{k.ndim}, not (batch, length, heads, head_dim)"
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or (v is not None and v.shape != k.shape):
        return f"shapes q {q.shape} k {k.shape} v {None if v is None else v.shape}"
    if h % kvh:
        return f"{h} query heads not a multiple of {kvh} kv heads"
    if t % LANES or s % LANES:
        return f"sequence lengths {t}x{s} not multiples of {LANES}"
    if causal and t != s:
        return f"causal attention with query length {t} != key length {s}"
    if window is not None and (not causal or window < 1):
        return f"window {window} (only causal windows of at least 1)"
    if v is not None and (q.dtype != k.dtype or q.dtype != v.dtype):
        return f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    return None


def supported(q, k, v=None, *, bias=None, dropout: bool = False, causal: bool = False,
              window: int | None = None) -> bool:
    return unsupported(q, k, v, bias=bias, dropout=dropout, causal=causal, window=window) is None


def _lib():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    return kernel, masks


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, t: int, s: int, causal: bool, window: int | None, bq: int, bkv: int, interpret: bool):
    """The splash kernel of one static (local heads, lengths, mask) form; its mask tables are numpy-built once."""
    kernel, masks = _lib()
    if not causal:
        one = masks.FullMask((t, s))
    elif window is None or window >= t:
        one = masks.CausalMask((t, s))
    else:  # jaxsft's window: key s visible from query t iff t - window < s <= t
        one = masks.LocalMask((t, s), window_size=(window - 1, 0), offset=0)
    sizes = kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                              block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                              block_q_dq=bq, block_kv_dq=bkv)
    with jax.ensure_compile_time_eval():  # concrete mask tables, never tracers of the step that first asks
        return kernel.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def _specs(mesh, b: int, h: int, kvh: int):
    """(q/k/v/out spec over (B, L, heads, D), segment spec over (B, L), local heads) for `mesh`."""
    names = mesh.axis_names
    batch = tuple(a for a in BATCH_AXES if a in names)
    shards = 1
    for a in batch:
        shards *= mesh.shape[a]
    batch_spec = batch if batch and b % shards == 0 else None
    tp = mesh.shape[HEAD_AXIS] if HEAD_AXIS in names else 1
    head_spec = HEAD_AXIS if tp > 1 and h % tp == 0 and kvh % tp == 0 else None
    return P(batch_spec, None, head_spec, None), P(batch_spec, None), h // (tp if head_spec else 1)


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool, window: int | None = None,
              scale: float, mesh=None, interpret: bool | None = None):
    """Splash attention: q (B, T, H, D), k/v (B, S, KVH, D) → (B, T, H, D) in q's dtype. Segment ids (B, T) /
    (B, S) int32 (both or neither); every query must see at least one key (the caller's segment ids make sure).
    `mesh`: the step mesh (None or one device: no shard_map)."""
    interpret = INTERPRET if interpret is None else interpret
    reason = unsupported(q, k, v, causal=causal, window=window)
    if reason is not None:
        raise ValueError(f"splash attention cannot take this call: {reason}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("splash attention: give both q_segment_ids and kv_segment_ids, or neither")
    b, t, h, _ = q.shape
    s, kvh = k.shape[1], k.shape[2]
    q = q * jnp.asarray(scale, q.dtype)
    segmented = q_segment_ids is not None
    if segmented:
        q_segment_ids = jnp.broadcast_to(q_segment_ids.astype(jnp.int32), (b, t))
        kv_segment_ids = jnp.broadcast_to(kv_segment_ids.astype(jnp.int32), (b, s))

    def local(q, k, v, qs, ks):  # one shard: (b', L, h', D) blocks
        kern = _kernel(q.shape[2], t, s, causal, window, _block(t), _block(s), interpret)
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # the kernel's (heads, L, D) per batch row
        if segmented:
            kernel_lib, _ = _lib()
            out = jax.vmap(lambda q, k, v, qs, ks: kern(q, k, v, segment_ids=kernel_lib.SegmentIds(q=qs, kv=ks)))(
                q, k, v, qs, ks)
        else:
            out = jax.vmap(lambda q, k, v: kern(q, k, v))(q, k, v)
        return jnp.swapaxes(out, 1, 2)

    if mesh is None or mesh.size == 1:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    x_spec, seg_spec, _ = _specs(mesh, b, h, kvh)
    if not segmented:  # shard_map wants arrays: dummies the kernel never reads
        q_segment_ids = kv_segment_ids = jnp.zeros((b, 1), jnp.int32)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec, seg_spec),
                            out_specs=x_spec, check_vma=False)
    return sharded(q, k, v, q_segment_ids, kv_segment_ids)
