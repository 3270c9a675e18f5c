"""Ahead-of-time compilation of every batch shape (jaxsft.precompile): the executables are used, equal the jitted
function's results, and the jitted function compiles nothing more for those shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import parallel, precompile


def _collate(lengths):
    def collate(idx):
        t = max(8, int(2 ** np.ceil(np.log2(max(lengths[i] for i in idx)))))
        ids = np.ones((2, t), np.int32) * np.asarray(idx, np.int32)[:, None]
        return {"ids": ids, "mask": np.ones((2, t), np.int32)}
    return collate


def test_shapes_compiled_ahead_run_without_the_jitted_function_compiling():
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    lengths = {0: 3, 1: 5, 2: 7, 3: 6, 4: 30, 5: 31}
    batches = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    collate = _collate(lengths)

    def step(w, batch, n):
        return w + n * jnp.sum(batch["ids"] * batch["mask"]) / batch["ids"].shape[1]

    jitted = jax.jit(step)
    ahead = precompile.Ahead(jitted, batch_arg=1)
    jobs = ahead.jobs((jnp.float32(1.0), None, np.int32(0)), collate, batches, mesh)
    assert len(jobs) == 2  # lengths 8 and 32: batches 0 and 1 share a shape
    precompile.compile_all(jobs)
    assert len(ahead.compiled) == 2 and jitted._cache_size() == 0
    assert ahead.jobs((jnp.float32(1.0), None, np.int32(0)), collate, batches, mesh) == []  # nothing left to do

    w = jnp.float32(1.0)
    for i, idx in enumerate(batches):
        batch = parallel.to_global(collate(idx), mesh)
        np.testing.assert_array_equal(np.asarray(ahead(w, batch, np.int32(i))), np.asarray(step(w, batch, i)))
    assert jitted._cache_size() == 0  # every call ran an executable compiled ahead
    assert ahead.compilations == 2

    odd = {"ids": np.ones((2, 64), np.int32), "mask": np.ones((2, 64), np.int32)}  # a shape nobody planned
    ahead(w, parallel.to_global(odd, mesh), np.int32(0))
    assert jitted._cache_size() == 1 and ahead.compilations == 3


def test_distinct_batches_keeps_one_batch_per_shape_in_first_seen_order():
    collate = _collate({0: 3, 1: 20, 2: 4, 3: 17})
    found = precompile.distinct_batches(collate, [np.array([0, 2]), np.array([1, 3]), np.array([2, 0])])
    assert [b["ids"].shape for b in found] == [(2, 8), (2, 32)]
