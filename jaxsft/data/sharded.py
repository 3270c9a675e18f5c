"""Training features of which each process tokenizes only its own share (multi-process runs).

A 1-process run tokenizes its whole training split up front (`task.featurize`). With several processes that would
make every host tokenize and hold every example, so instead (grain's model: a global index plan, each process
reading just the records its devices consume, plus a length pass):
1. process p of P tokenizes the contiguous slice p/P of the data set and keeps only what planning needs per example
   (`task.scan`: lengths, labels, loss flags, a 64-bit key per example for the duplicate count; a few bytes each);
2. every process gathers those summaries (one allgather) and so holds the same global lengths: the batch plan,
   bucket choice and packing are the same as a 1-process run's, whatever the number of processes;
3. the token arrays of a batch are made on demand, for the rows this process's devices hold
   (`OnDemand`: `task.featurize` of just those data set rows, cached in a bounded window).
A bad row found on any process stops every process with that process's one-line message.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable, Sequence

import numpy as np

from jaxsft.errors import UserError

log = logging.getLogger("jaxsft")


def part_of(n: int, count: int, index: int) -> range:
    """The contiguous data set rows process `index` of `count` scans."""
    return range(n * index // count, n * (index + 1) // count)


def key_of(*values) -> int:
    """A 64-bit key for the duplicate count (equal values, equal keys; other collisions ~2^-64 per pair); bytes
    (token ids) are hashed as they are, other values by their repr."""
    h = hashlib.blake2b(digest_size=8)
    for v in values:
        data = v if isinstance(v, bytes) else repr(v).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


def keys_of(rows) -> np.ndarray:
    return np.fromiter((key_of(*r) for r in rows), dtype=np.uint64)


def duplicates(keys: np.ndarray) -> int:
    return int(len(keys) - len(np.unique(keys)))


def scan_part(task, ds, tokenizer, config, key: str, spec: str, rows: range) -> dict | None:
    """`task.scan` of these data set rows; None for no rows (a data set smaller than the number of processes)."""
    if not len(rows):
        return None
    return task.scan(ds.select(rows), tokenizer, config, key, spec, first_row=rows.start)


def merge(parts: list[dict | None]) -> dict:
    """Per-process scan summaries → one: arrays concatenated in process order (= data set order), counts summed,
    None where any part has None; processes that scanned no rows (None) are left out."""
    parts = [p for p in parts if p is not None]
    out = {}
    for k in parts[0]:
        values = [p[k] for p in parts]
        if any(v is None for v in values):
            out[k] = None
        elif isinstance(values[0], np.ndarray):
            out[k] = np.concatenate(values)
        else:
            out[k] = sum(values)
    return out


def gather_parts(scan: Callable[[], dict]) -> dict:
    """Runs this process's `scan` and returns every process's summaries merged (a collective: all processes call
    it). A UserError on any process is raised on all of them (the lowest failing process's message), so none is
    left waiting in a collective the others have left."""
    import jax
    from jax.experimental import multihost_utils

    try:
        part, error = scan(), None
    except UserError as e:
        part, error = None, str(e)
    blob = np.frombuffer(pickle.dumps((part, error)), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:blob.size] = blob
    got = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), -1)
    results = [pickle.loads(got[i, :int(s)].tobytes()) for i, s in enumerate(sizes)]
    for _, err in results:
        if err is not None:
            raise UserError(err)
    return merge([p for p, _ in results])


WINDOW_TOKENS = 1 << 22  # rows kept made: about 4M token slots (~55 MB of arrays for causal-LM rows)


class OnDemand:
    """Feature rows made when first asked for: `build(indices)` → one dict of fields per index (sorted, unique
    indices in, in that order). Keeps at most `window` rows (default: WINDOW_TOKENS / max_length); `fetch` makes a
    whole batch's rows in one call."""

    def __init__(self, n: int, build: Callable[[np.ndarray], list[dict]], max_length: int = 128,
                 window: int | None = None):
        window = window or max(64, WINDOW_TOKENS // max(1, max_length))
        self.n, self.build, self.window, self.cache = n, build, window, {}
        self.built = 0  # rows made so far (a test checks a process makes only its share)

    def fetch(self, indices) -> None:
        missing = sorted({int(i) for i in np.asarray(indices).reshape(-1)} - self.cache.keys())
        if not missing:
            return
        if len(self.cache) + len(missing) > self.window:
            self.cache.clear()
        for i, row in zip(missing, self.build(np.asarray(missing, dtype=np.int64))):
            self.cache[i] = row
        self.built += len(missing)

    def row(self, i: int) -> dict:
        i = int(i)
        if i not in self.cache:
            self.fetch([i])
        return self.cache[i]

    def field(self, name: str) -> Field:
        return Field(self, name)


class Field(Sequence):
    """One per-row field of features backed by an OnDemand (indexable like the list it stands for)."""

    def __init__(self, rows: OnDemand, name: str):
        self.rows, self.name = rows, name

    def __len__(self) -> int:
        return self.rows.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.rows.row(i)[self.name]


def prefetch(rows: OnDemand, batches: list[np.ndarray], at: int, share: slice, chunk: int | None = None) -> None:
    """When batch `at`'s rows in `share` (this process's) are not made yet, makes those of the batches from `at` on,
    about `chunk` rows (default: a quarter of the window) in one call: one data set read and tokenizer call
    instead of one per batch."""
    if all(int(i) in rows.cache for i in batches[at][share]):
        return
    per = max(1, (chunk or rows.window // 4) // max(1, share.stop - share.start))
    rows.fetch(np.concatenate([b[share] for b in batches[at:at + per]]))


def featurize(task, ds, tokenizer, config, key: str, spec: str):
    """A labelled split's features for training and its loss-based eval: the whole split tokenized (1 process), or
    this process's share scanned, the summaries gathered and the token rows made on demand (several processes; see
    the module's text). Not for outputs that need every text (predictions files, decoding)."""
    import jax

    if jax.process_count() == 1:
        return task.featurize(ds, tokenizer, config, key, spec, need_labels=True)
    rows = part_of(len(ds), jax.process_count(), jax.process_index())
    meta = gather_parts(lambda: scan_part(task, ds, tokenizer, config, key, spec, rows))
    log.warning("%s: process %d tokenized rows %d:%d of %d for the batch plan; each batch's own rows are tokenized "
                "as it comes", key, jax.process_index(), rows.start, rows.stop, len(ds))
    return task.from_scan(meta, ds, tokenizer, config, key, spec)
