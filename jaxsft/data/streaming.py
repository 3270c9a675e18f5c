"""data.streaming: the training source read as a `datasets.IterableDataset`, tokenized a chunk at a time and batched
as it comes, so a training set need not fit in memory (evaluation data is still read whole).

Order. Each epoch, this process's share of the stream (`datasets.distributed.split_dataset_by_node`) goes through a
shuffle buffer of data.shuffle_buffer_size examples seeded by `seed` and the epoch (`IterableDataset.shuffle`,
`set_epoch`; 0: the stream's own order). CHUNK examples at a time are tokenized by the task's own `featurize`
(causal_lm packs them into rows there, data.packing), and the rows go out in batches in that order; with
data.group_by_length and unpacked rows, a chunk's rows go out length-sorted in runs of a batch, the runs in a seeded
order. Padded lengths: data.buckets, else powers of two up to max_length (there is no whole set to choose them from);
several processes pad every batch to max_length, so that all build the same shapes without talking.

Position. After each batch the loop keeps {epoch, example, row, batch}: the examples of the epoch's stream read
before the chunk the batch ended in, the rows of that chunk used, and the batches of the epoch. A resumed run reads
the stream again up to `example` (reading only, no tokenizing), remakes that chunk and goes on at `row`: the same
batches as an uninterrupted run. datasets' `IterableDataset.state_dict` is not used: it does not keep the contents
of a shuffle buffer, so a shuffled stream would resume in another order.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from pathlib import Path

import numpy as np

from jaxsft.data.batching import default_buckets
from jaxsft.errors import UserError, first_line

log = logging.getLogger("jaxsft")

CHUNK = 1024  # examples tokenized (and, for causal_lm, packed) at a time
TASKS = ("classification", "causal_lm")
# What a task's collate reads of its Features, per row (lists of arrays, or one array of all rows).
ROW_FIELDS = {"classification": ("input_ids", "token_type_ids"), "causal_lm": ("input_ids", "segment_ids",
                                                                             "positions", "loss_tokens")}
ARRAY_FIELDS = {"classification": ("lengths", "labels"), "causal_lm": ("lengths",)}


class Rows:
    """The rows of one process's batch, gathered from the chunks they came from; `task.collate` takes it as Features."""

    on_demand = None

    def __init__(self, fields: dict):
        self.__dict__.update(fields)

    def __len__(self) -> int:
        return len(self.lengths)


@contextlib.contextmanager
def _info_quiet():
    """jaxsft's per-split info lines (packing, dropped examples) are said once a chunk: kept below INFO here."""
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def resolve_labels(task, config, stream, sample) -> None:
    """task.resolve_labels from a sample of the stream (causal_lm: the format from its columns); classification
    needs the class names up front: data.label_names, or the data set's ClassLabel names (hub data)."""
    d = config.data
    if config.task == "classification" and config.model.num_labels != 1 and not d.label_names:
        feature = (getattr(stream, "features", None) or {}).get(d.label_field)
        if type(feature).__name__ == "ClassLabel" and feature.names:
            d.label_names = list(feature.names)
        else:
            raise UserError("data.streaming=True: classification needs config.data.label_names (a stream's labels "
                            "cannot all be read up front to find them), or model.num_labels=1 for regression")
    task.resolve_labels(config, sample)


class TrainStream:
    """The training batches of one process, read from a stream: `batches(position)` yields (local arrays, examples,
    tokens, end of epoch, position after) from `position` on, epoch after epoch."""

    num_empty = num_truncated = num_duplicates = 0  # not counted over a stream (the in-memory path reports them)
    on_demand = None

    def __init__(self, task, stream, tokenizer, config, spec: str, *, batch_size: int, index: int = 0,
                 count: int = 1):
        if config.task not in TASKS:
            raise UserError(f"data.streaming=True supports the tasks {', '.join(TASKS)}; {config.task} reads its "
                            "data whole (set data.streaming=False)")
        self.task, self.stream, self.tokenizer, self.config, self.spec = task, stream, tokenizer, config, spec
        self.batch_size, self.index, self.count = batch_size, index, count
        packed = config.task == "causal_lm" and config.data.packing
        self.group = bool(config.data.group_by_length) and not packed
        if count > 1:  # every process pads to one length: no process needs the others' rows to pick it
            self.buckets = [config.max_length]
        elif config.data.buckets:
            self.buckets = sorted({*(int(b) for b in config.data.buckets), config.max_length})
            self.buckets = [b for b in self.buckets if b <= config.max_length]
        else:
            self.buckets = default_buckets(config.max_length)
        sample = self._read(itertools.islice(iter(stream), 64), 0)  # the stream's first rows: columns, labels
        if not sample:
            raise UserError(f"data.train: {spec} has no rows")
        import datasets

        resolve_labels(task, config, stream, datasets.Dataset.from_list(sample))

    def epoch_stream(self, epoch: int):
        """This process's share of the stream in epoch `epoch`'s order."""
        from datasets.distributed import split_dataset_by_node

        ds = self.stream if self.count == 1 else split_dataset_by_node(self.stream, self.index, self.count)
        buffer = int(self.config.data.shuffle_buffer_size)
        if buffer > 0:
            ds = ds.shuffle(seed=self.config.seed, buffer_size=buffer)
            ds.set_epoch(epoch)
        return ds

    def _read(self, it, at: int) -> list[dict]:
        """The examples of `it` (a list); a reader error is one line naming the source (for a local file, the
        line found by sources.diagnose)."""
        try:
            return list(it)
        except Exception as e:  # noqa: BLE001 - malformed rows found as the stream reaches them
            from jaxsft.data import sources

            for spec in self.spec.split(" + "):  # pipeline.train_spec joins a mixture's specs so
                path = Path(spec).expanduser()
                found = sources.diagnose(path, spec) if path.is_file() else None
                if found:
                    raise UserError(f"data.train: {found}") from None
            raise UserError(f"data.train: cannot read {self.spec} (streamed, near example {at}): "
                            f"{type(e).__name__}: {first_line(e)}") from None

    def _featurize(self, examples: list[dict], first: int, epoch: int):
        """The task's features (rows) of one chunk of examples, and the order its rows go out in."""
        import datasets

        ds = datasets.Dataset.from_list(examples)
        key = f"data.train (streamed examples {first}..{first + len(examples) - 1})"
        kwargs = {"first_row": first} if self.config.task == "classification" else {}
        try:
            with _info_quiet():
                f = self.task.featurize(ds, self.tokenizer, self.config, key, self.spec, need_labels=True, **kwargs)
        except UserError as e:
            if "has a loss token" in str(e):  # causal_lm: no example of this chunk trains anything: no rows
                return None, np.zeros(0, np.int64)
            raise
        order = np.arange(len(f))
        if self.group and len(f):
            order = np.argsort(-np.asarray(f.lengths), kind="stable")
            runs = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            rng = np.random.default_rng([self.config.seed, epoch, first, len(examples)])
            order = np.concatenate([runs[i] for i in rng.permutation(len(runs))])
        return f, order

    def rows(self, parts: list) -> Rows:
        """The per-row fields of (features, row) pairs, in that order."""
        name = self.config.task
        out = {k: [getattr(f, k)[i] for f, i in parts] for k in ROW_FIELDS[name]}
        for k in ARRAY_FIELDS[name]:
            values = [getattr(f, k) for f, _ in parts]
            out[k] = None if any(v is None for v in values) else np.asarray([v[i] for v, (_, i) in zip(values, parts)])
        return Rows(out)

    def collate(self, parts: list) -> dict:
        """This process's rows of one batch (rows past `parts` are padding, weight 0)."""
        rows = self.rows(parts)
        return self.task.collate(rows, np.arange(len(rows)), batch_size=self.batch_size, buckets=self.buckets,
                                 pad_id=self.tokenizer.pad_token_id)

    def _epoch(self, epoch: int, example: int, row: int, batch: int):
        """(rows of a batch, position after it) from position (epoch, example, row) to the end of the epoch."""
        it = iter(self.epoch_stream(epoch))
        self._read(itertools.islice(it, example), 0)  # a resumed run: read up to its position, nothing tokenized
        start, parts = example, []
        while True:
            examples = self._read(itertools.islice(it, CHUNK), start)
            if not examples:
                break
            f, order = self._featurize(examples, start, epoch)
            for k in range(row, len(order)):
                parts.append((f, int(order[k])))
                if len(parts) == self.batch_size:
                    batch += 1
                    done = k + 1 == len(order)
                    yield parts, {"epoch": epoch, "example": start + len(examples) if done else start,
                                  "row": 0 if done else k + 1, "batch": batch}
                    parts = []
            start, row = start + len(examples), 0
        if parts:  # the epoch's last, partial batch
            yield parts, {"epoch": epoch, "example": start, "row": 0, "batch": batch + 1}

    def batches(self, position: dict | None = None):
        """(local arrays, examples, tokens, end of epoch, position after) of each batch from `position` on (None:
        the start), epoch after epoch; the last batch of an epoch says so (read one batch ahead)."""
        p = dict(position or {"epoch": 0, "example": 0, "row": 0, "batch": 0})
        while True:
            ahead = None
            for item in self._epoch(p["epoch"], p["example"], p["row"], p["batch"]):
                if ahead is not None:
                    yield self._out(*ahead, end=False)
                ahead = item
            if ahead is not None:
                yield self._out(*ahead, end=True)
            elif p["example"] == 0 and p["row"] == 0:  # a whole epoch without a row: it would never end
                raise UserError(f"data.train: {self.spec}: no example of this process's share of the stream trains "
                                f"anything (process {self.index} of {self.count})")
            p = {"epoch": p["epoch"] + 1, "example": 0, "row": 0, "batch": 0}

    def _out(self, parts, position, end: bool):
        if end:  # the next batch starts the next epoch
            position = {"epoch": position["epoch"] + 1, "example": 0, "row": 0, "batch": 0}
        arrays = self.collate(parts)
        tokens = int(sum(int(f.lengths[i]) for f, i in parts))
        return arrays, len(parts), tokens, end, position
