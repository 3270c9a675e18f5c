"""Compile every batch shape a run will use before the first step, several at a time.

XLA compiles one program on one thread, and a jitted step is compiled once per padded batch shape (length
bucket). Compiled lazily, each shape stalls the loop while the other cores idle; compiled up front in a thread pool
(the compiler releases the GIL), they take about 1/cores of that wall time. The jitted function then finds the
executables in its own cache, so the loop calls it as usual.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax

from jaxsft import parallel

log = logging.getLogger("jaxsft")


def signature(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def distinct_batches(collate, batches, limit_s: float = 5.0) -> list[dict]:
    """One batch per distinct shape signature among `batches`: `collate(indices)` gives its arrays, or only their
    shapes and dtypes (GlobalBatches.shapes). Looks for at most `limit_s` seconds; shapes found later compile
    lazily when the loop meets them."""
    seen: dict[tuple, dict] = {}
    t0 = time.perf_counter()
    for idx in batches:
        batch = collate(idx)
        seen.setdefault(signature(batch), batch)
        if time.perf_counter() - t0 > limit_s:
            break
    return list(seen.values())


def abstract_batch(batch: dict, mesh) -> dict:
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


def workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def compile_all(jobs: list[tuple], what: str = "") -> float:
    """Compiles the jobs of Ahead.jobs (their arguments arrays or ShapeDtypeStructs) in parallel threads; returns
    the seconds it took."""
    if not jobs:
        return 0.0
    t0 = time.perf_counter()
    log.info("compiling %d %sbatch shapes before the first step, %d at a time (a rerun of the same shapes loads "
             "them from the compilation cache)...", len(jobs), what, min(workers(), len(jobs)))

    def one(job):
        ahead, sig, args = job
        ahead.compiled[sig] = ahead.jitted.lower(*args).compile()

    n = min(workers(), len(jobs))
    if n == 1:
        for job in jobs:
            one(job)
    else:
        with ThreadPoolExecutor(n, thread_name_prefix="jaxsft-compile") as pool:
            list(pool.map(one, jobs))
    seconds = time.perf_counter() - t0
    log.info("compiled %d %sbatch shapes in %.1f s (%d at a time)", len(jobs), what, seconds, n)
    return seconds


class Ahead:
    """A jitted step plus executables compiled ahead of time for some batch shapes. A call whose batch (argument
    `batch_arg`) has one of those shapes runs that executable directly (no retrace); any other goes through the
    jitted function, which compiles it on first use as usual."""

    def __init__(self, jitted, batch_arg: int):
        self.jitted, self.batch_arg = jitted, batch_arg
        self.compiled: dict[tuple, object] = {}
        self.planned = False  # compile_all has run for this step's upcoming shapes

    def __call__(self, *args):
        exe = self.compiled.get(signature(args[self.batch_arg]))
        return (exe or self.jitted)(*args)

    def jobs(self, args: tuple, collate, batches, mesh) -> list[tuple]:
        """One job per distinct batch shape in `batches`; `args` are the other arguments, the batch's slot None."""
        out = []
        for batch in distinct_batches(collate, batches):
            sig = signature(batch)
            if sig not in self.compiled:
                full = list(args)
                full[self.batch_arg] = abstract_batch(batch, mesh)
                out.append((self, sig, tuple(full)))
        return out

    @property
    def compilations(self) -> int:
        """Programs compiled for this step: ahead of time, plus by the jitted function on first use."""
        return len(self.compiled) + self.jitted._cache_size()
