"""Packing variable-length examples into fixed-capacity rows (pure numpy).

Best-fit decreasing: examples are placed longest first (ties by index), each into the fullest row that still has
room, else a new row. Deterministic, never splits an example, and leaves little room unused on mixed lengths.
"""

from __future__ import annotations

import numpy as np


def pack(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Example indices of each row; every example appears in exactly one row, each row sums to <= capacity."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 0):
        raise ValueError(f"example lengths must lie in 0..{capacity}, got {lengths.min()}..{lengths.max()}")
    # free[r] = how many rows have exactly r slots left; by_free[r] = a stack of those rows.
    free = np.zeros(capacity + 1, dtype=np.int64)
    by_free: list[list[int]] = [[] for _ in range(capacity + 1)]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        fits = np.flatnonzero(free[n:])
        if len(fits):
            r = by_free[n + int(fits[0])].pop()
            free[room[r]] -= 1
        else:
            r = len(rows)
            rows.append([])
            room.append(capacity)
        rows[r].append(int(i))
        room[r] -= n
        free[room[r]] += 1
        by_free[room[r]].append(r)
    return [np.asarray(r, dtype=np.int64) for r in rows]


def segment_layout(segment_lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids 1..k, positions restarting at 0) for segments of these lengths laid end to end."""
    seg = np.repeat(np.arange(1, len(segment_lengths) + 1, dtype=np.int32), segment_lengths)
    starts = np.repeat(np.cumsum([0] + list(segment_lengths[:-1])), segment_lengths)
    return seg, (np.arange(len(seg)) - starts).astype(np.int32)


def next_token_targets(input_ids: np.ndarray, segment_ids: np.ndarray,
                       loss_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(targets, loss_mask) for (B, L) rows: the target at t is token t+1 of the same segment (0 and mask 0 where
    t+1 is padding or another segment); `loss_tokens` marks which tokens are to be predicted."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    targets = np.zeros_like(input_ids, dtype=np.int32)
    mask = np.zeros(input_ids.shape, dtype=np.float32)
    targets[:, :-1] = np.where(same, input_ids[:, 1:], 0)
    mask[:, :-1] = same & (loss_tokens[:, 1:] > 0)
    return targets, mask
