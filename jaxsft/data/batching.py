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


def pad_rows(rows: list[np.ndarray], length: int, pad_id: int, batch_size: int) -> np.ndarray:
    out = np.full((batch_size, length), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r[:length]
    return out


def padding_share(lengths: np.ndarray, batches: list[np.ndarray], batch_size: int, buckets: list[int]) -> float:
    """Fraction of token slots in these batches that are padding."""
    total = sum(batch_size * bucket_for(int(lengths[b].max()), buckets) for b in batches)
    return 1.0 - float(lengths.sum()) / max(total, 1)
