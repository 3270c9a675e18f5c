"""The embedding lookup's gradient: float32 accumulation, the same values on every path, no half-precision scatter.

A plain `jnp.take` on the bf16 copy of a table differentiates into a bf16 scatter-add, which on a GPU serialises on
rows many tokens share (BERT's token type 0) and rounds the sum at every add (benchmarks/README.md, the H200
profile); layers.embedding_lookup sums in float32, as a one-hot matmul for small tables on GPU / TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft.models import layers


def _grad(table, ids, dtype, platform):
    def loss(t):
        with layers.target_platform(platform):
            out = layers.embedding_lookup(t, ids, dtype)
        return (out.astype(jnp.float32) * jnp.arange(out.shape[-1], dtype=jnp.float32)).sum()

    return jax.grad(loss)(table)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])  # segment sum; one-hot matmul
def test_lookup_gradient_equals_the_plain_take_in_float32(platform):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 50, (4, 7)))
    ids = ids.at[:, :3].set(0)  # a shared row
    want = jax.grad(lambda t: (jnp.take(t, ids, axis=0) * jnp.arange(8.0)).sum())(table)
    np.testing.assert_allclose(np.asarray(_grad(table, ids, "float32", platform)), np.asarray(want), rtol=1e-6)
    with layers.target_platform(platform):
        np.testing.assert_array_equal(np.asarray(layers.embedding_lookup(table, ids, jnp.float32)),
                                      np.asarray(jnp.take(table, ids, axis=0)))


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_bf16_lookup_gradient_of_a_shared_row_is_summed_in_float32(platform):
    """4096 tokens of one id, each adding 1 + 2**-10: bf16 additions stall at 256 (its 8-bit mantissa), float32
    gets the exact 4100."""
    table = jnp.zeros((4, 2), jnp.float32)
    ids = jnp.zeros((4096,), jnp.int32)

    def loss(t):
        with layers.target_platform(platform):
            out = layers.embedding_lookup(t, ids, "bfloat16")
        return (out * jnp.asarray(1 + 2 ** -10, jnp.bfloat16)).astype(jnp.float32).sum()

    g = jax.grad(loss)(table)
    # bf16 rounds 1 + 2**-10 to 1: the exact float32 sum of 4096 ones; a bf16 accumulator stops at 256
    np.testing.assert_array_equal(np.asarray(g[0]), [4096.0, 4096.0])
    assert float(jnp.abs(g[1:]).max()) == 0.0


def test_embed_module_matches_nnx_embed_and_keeps_attend():
    mine = layers.embed(30, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ref = nnx.Embed(30, 8, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ref.embedding.value = mine.embedding.value
    ids = jnp.asarray([[0, 3, 29], [5, 5, 1]])
    np.testing.assert_array_equal(np.asarray(mine(ids), np.float32), np.asarray(ref(ids), np.float32))
    q = jnp.ones((2, 8), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(mine.attend(q), np.float32), np.asarray(ref.attend(q), np.float32))


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_no_half_precision_scatter_in_the_gradient(platform):
    table = jnp.ones((5000, 8), jnp.float32)  # above ONE_HOT_GRAD_ROWS: the segment-sum path on GPU too
    ids = jnp.zeros((2, 3), jnp.int32)
    text = str(jax.make_jaxpr(lambda t: _grad(t, ids, "bfloat16", platform))(table))
    scatters = [line for line in text.splitlines() if "scatter" in line]
    assert scatters and not any("bf16[" in line.split("=")[0] for line in scatters), scatters
