"""Pieces every family shares: dense/embedding/norm constructors, activations, dropout, attention dispatch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


def dense(features_in: int, features_out: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02,
          use_bias: bool = True) -> nnx.Linear:
    """A Linear with float32 master weights computing in `dtype` (HF init: normal(std), zero bias)."""
    return nnx.Linear(features_in, features_out, use_bias=use_bias, dtype=dtype, param_dtype=F32,
                      kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros, rngs=rngs)


def embed(num: int, features: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Embed:
    return nnx.Embed(num, features, dtype=dtype, param_dtype=F32, embedding_init=nnx.initializers.normal(std),
                     rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm computed in float32 whatever the activations' dtype; returns the input dtype."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs):
        super().__init__(features, epsilon=eps, dtype=F32, param_dtype=F32, rngs=rngs)

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
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def sub_rng(rng, *ids: int):
    """A distinct dropout key per call site; None stays None."""
    if rng is None:
        return None
    for i in ids:
        rng = jax.random.fold_in(rng, i)
    return rng


def attention(q, k, v, mask, *, dropout_rate: float = 0.0, rng=None):
    """Scaled dot-product attention over (batch, length, heads, head_dim) with a boolean mask.

    Training with attention-probability dropout takes the explicit path (no fused kernel has dropout); otherwise
    `jax.nn.dot_product_attention` picks the kernel: cuDNN on GPU for half-precision inputs, XLA elsewhere.
    """
    if rng is not None and dropout_rate > 0.0:
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = jnp.einsum("btnh,bsnh->bnts", q, k).astype(F32) * scale
        scores = jnp.where(mask, scores, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = dropout(probs, dropout_rate, rng).astype(v.dtype)
        return jnp.einsum("bnts,bsnh->btnh", probs, v)
    impl = None
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
