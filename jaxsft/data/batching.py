"""Fixed-shape batches: examples grouped by length into a few padded length buckets.

Every batch has exactly `batch_size` rows (a short last batch is filled with weight-0 rows) and a length from
`buckets`, so an epoch compiles at most len(buckets) shapes. Order is a pure function of (seed, epoch), so a
resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np


def default_buckets(max_length: int, smallest: int = 16) -> list[int]:
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return out + [max_length]


def choose_buckets(batch_lengths, count: int, max_length: int, multiple: int = 8) -> list[int]:
    """At most `count` padded lengths (multiples of `multiple`, capped at max_length) that minimise the padded
    tokens of these batches, each batch padded to the smallest length that holds its longest row (an exact
    1-D partition by dynamic programming over the distinct rounded lengths). The step cost grows about linearly
    with the padded length, so this also minimises step time for a fixed number of compiled shapes."""
    rounded = np.minimum(-(-np.asarray(batch_lengths, np.int64) // multiple) * multiple, max_length)
    if rounded.size == 0:
        return [max_length]
    values, counts = np.unique(np.maximum(rounded, 1), return_counts=True)
    m, k = len(values), max(1, min(count, len(values)))
    # Splitting a group of distinct lengths always saves padding, so the best uses exactly k groups (k <= m).
    # cost[j]: least padded tokens of values[0..j] in g groups, the last padded to values[j]; prev[g][j]: where
    # the group before it ends.
    upto = np.concatenate([[0], np.cumsum(counts)])  # batches with a value below index j: upto[j]
    cost, prev = values * upto[1:], []
    for g in range(1, k):
        new, arg = np.full(m, np.iinfo(np.int64).max), np.zeros(m, np.int64)
        for j in range(g, m):
            i = np.arange(g - 1, j)
            total = cost[i] + values[j] * (upto[j + 1] - upto[i + 1])
            arg[j] = i[np.argmin(total)]
            new[j] = total.min()
        cost = new
        prev.append(arg)
    out, j = [int(values[-1])], m - 1
    for arg in reversed(prev):
        j = int(arg[j])
        out.append(int(values[j]))
    return sorted(out)


def bucket_for(length: int, buckets: list[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


class BatchPlan:
    """Which example indices form each batch of an epoch."""

    def __init__(self, lengths: np.ndarray, batch_size: int, *, seed: int, shuffle: bool,
                 group_by_length: bool = True, group_batches: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed, self.shuffle = seed, shuffle
        self.group_by_length, self.group_batches = group_by_length, group_batches

    @property
    def num_batches(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            # Evaluation: sort by length (least padding); callers put results back by index.
            order = np.argsort(-self.lengths, kind="stable") if self.group_by_length else np.arange(n)
            return [order[i:i + bs] for i in range(0, n, bs)]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n)
        if self.group_by_length:
            chunk = bs * self.group_batches
            perm = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                   for c in np.split(perm, range(chunk, n, chunk))])
        batches = [perm[i:i + bs] for i in range(0, n, bs)]
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


def local_part(indices: np.ndarray, batch_size: int, rows: slice | None) -> tuple[np.ndarray, int]:
    """(indices, batch size) of the rows `rows` of a batch (a process's share, parallel.GlobalBatches); rows past
    the batch's examples stay padding. None: the whole batch."""
    if rows is None:
        return indices, batch_size
    return indices[rows.start:rows.stop], rows.stop - rows.start


def pad_rows(rows: list[np.ndarray], length: int, pad_id: int, batch_size: int) -> np.ndarray:
    out = np.full((batch_size, length), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r[:length]
    return out


def padding_share(lengths: np.ndarray, batches: list[np.ndarray], batch_size: int, buckets: list[int]) -> float:
    """Fraction of token slots in these batches that are padding."""
    total = sum(batch_size * bucket_for(int(lengths[b].max()), buckets) for b in batches)
    return 1.0 - float(lengths.sum()) / max(total, 1)
