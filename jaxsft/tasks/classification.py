"""Sequence classification (and regression with num_labels=1): labels, tokenization, batches, loss, metrics."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import optax

from jaxsft import metrics as metrics_lib
from jaxsft.data import sharded
from jaxsft.data.batching import bucket_for, local_part, pad_rows
from jaxsft.data.sources import require_columns, where_row
from jaxsft.errors import UserError

log = logging.getLogger("jaxsft")

name = "classification"


def checkpoint_metric(config) -> tuple[str, str]:
    """The default (checkpoint_metric, checkpoint_mode): accuracy, or loss for regression."""
    return ("eval_loss", "min") if config.model.num_labels == 1 else ("eval_accuracy", "max")


@dataclass
class Features:
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray | None  # int label ids, float targets, or None for unlabelled data
    raw_labels: list | None
    lengths: np.ndarray
    num_empty: int = 0
    num_truncated: int = 0
    num_duplicates: int = 0  # rows equal to an earlier row (texts and label); kept
    keys: np.ndarray | None = None  # per row, a 64-bit key of its texts and label (duplicates across processes)
    on_demand: sharded.OnDemand | None = None  # token rows made when a batch needs them (multi-process training)

    def __len__(self) -> int:
        return len(self.input_ids)


def _label_kind(values: list, key: str, column: str):
    kinds = {type(v) for v in values}
    if kinds <= {int, bool}:
        return int
    if kinds <= {int, float, bool}:
        return float
    if kinds == {str}:
        return str
    first: dict[type, tuple[int, object]] = {}  # one example row per type, to point at the culprit
    for i, v in enumerate(values):
        first.setdefault(type(v), (i, v))
    examples = ", ".join(f"{t.__name__} (row {i}: {v!r})" for t, (i, v) in first.items())  # in row order
    raise UserError(f"{key}: mixed label types in column {column!r}: {examples}; use one type for every label")


def _number(v) -> float | None:
    """`v` as a finite number (also a string that reads as one, as pandas leaves a TSV column holding `nan`)."""
    if isinstance(v, (bool, int, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return None


_MISSING = {"", "nan", "na", "n/a", "null", "none", "inf", "+inf", "-inf", "infinity", "-infinity"}


def _not_a_number(values: list, key: str, column: str, spec: str | None, first_row: int, regression: bool) -> None:
    """Refuses a label that is not a number among numbers, naming its row and file line: in regression any
    non-number; in classification NaN/inf, or a `nan`/`NA`/empty string in a column whose other labels all read as
    numbers (one such row turns a whole TSV column of numbers into strings)."""
    bad = None
    if regression:
        bad = next((i for i, v in enumerate(values) if _number(v) is None), None)
    else:
        nans = [i for i, v in enumerate(values) if isinstance(v, float) and not math.isfinite(v)]
        if nans:
            bad = nans[0]
        elif values and all(isinstance(v, str) for v in values):
            missing = [i for i, v in enumerate(values) if v.strip().lower() in _MISSING]
            if missing and len(missing) < len(values) and \
                    all(_number(v) is not None for v in values if v.strip().lower() not in _MISSING):
                bad = missing[0]
    if bad is None:
        return
    row = first_row + bad
    where = where_row(spec, key, row) if spec and key in ("data.train", "data.eval") else f"row {row}"
    why = "regression (model.num_labels=1) needs a number in every row" if regression else \
        "the other labels are numbers; fix or drop that row"
    raise UserError(f"{key}: {where}: label {values[bad]!r} in column {column!r} is not a number ({why})")


def resolve_labels(config, train_ds) -> None:
    """Fills `model.num_labels` and `data.label_names` from the training labels (the rules in the README)."""
    d = config.data
    require_columns(train_ds, [d.label_field], "data.train", d.train, "data.label_field")
    values = train_ds[d.label_field]
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise UserError(f"data.train: {where_row(d.train, 'data.train', i)} has no label in column "
                            f"{d.label_field!r}")
    _not_a_number(values, "data.train", d.label_field, d.train, 0, config.model.num_labels == 1)
    if config.model.num_labels == 1:  # regression
        if _label_kind(values, "data.train", d.label_field) is str:
            raise UserError(f"data.train: model.num_labels=1 (regression) needs numeric labels, got {values[0]!r}")
        d.label_names = None
        return
    kind = _label_kind(values, "data.train", d.label_field)
    feature = getattr(train_ds, "features", {}).get(d.label_field)
    class_names = list(feature.names) if type(feature).__name__ == "ClassLabel" and feature.names else None
    if d.label_names:
        names = list(d.label_names)
    elif class_names and kind is int and len(class_names) >= 2:  # the source names its classes (TFDS, HF)
        names = class_names
        log.info("data.train: label names from the data set's ClassLabel feature: %s", names[:20])
    else:
        uniq = sorted(set(values))
        if kind is float:
            raise UserError(f"data.train: labels are numbers like {uniq[0]!r}; set model.num_labels=1 for "
                            f"regression or data.label_names for classes")
        names = list(range(len(uniq))) if kind is int and uniq == list(range(len(uniq))) else uniq
    if config.model.num_labels and config.model.num_labels != len(names):
        if d.label_names or config.model.num_labels < len(names):
            raise UserError(f"model.num_labels={config.model.num_labels} but the labels are {names[:10]}")
        names = list(range(config.model.num_labels)) if kind is int else names
    if len(names) < 2:
        raise UserError(f"data.train: only one label value ({names[0]!r}); classification needs at least two")
    if not d.label_names and names is not class_names:
        log.info("data.train: %d labels inferred from the data: %s (data.label_names to set them)", len(names),
                 names[:20])
    d.label_names = names
    config.model.num_labels = len(names)


def label_ids(values: list, config, key: str, first_row: int = 0, spec: str | None = None) -> np.ndarray:
    if config.model.num_labels == 1:  # regression: no label names
        _not_a_number(values, key, config.data.label_field, spec, first_row, regression=True)
        return np.asarray(values, dtype=np.float32)
    names = list(config.data.label_names)
    index = {n: i for i, n in enumerate(names)}
    ints_by_position = all(isinstance(n, str) for n in names) and \
        _label_kind(values, key, config.data.label_field) is int
    out = np.empty(len(values), dtype=np.int32)
    for i, v in enumerate(values):
        if ints_by_position:  # integer labels with string label_names: an index into label_names
            if not 0 <= v < len(names):
                raise UserError(f"{key}: label {v} (row {first_row + i}) is outside 0..{len(names) - 1} "
                                "(data.label_names)")
            out[i] = v
        elif v in index:
            out[i] = index[v]
        else:
            _not_a_number(values, key, config.data.label_field, spec, first_row, regression=False)
            raise UserError(f"{key}: label {v!r} (row {first_row + i}) is not in the label set {names} "
                            "(data.label_names, or the labels seen in data.train)")
    return out


def featurize(ds, tokenizer, config, key: str, spec: str, *, need_labels: bool, first_row: int = 0) -> Features:
    """Tokenizes one split; labels are read when the column exists (required when `need_labels`). `first_row`: the
    data set row `ds` starts at (a slice of it), for messages."""
    d = config.data
    fields = list(d.text_fields)
    if not 1 <= len(fields) <= 2:
        raise UserError(f"data.text_fields: one field, or two for sentence pairs; got {fields}")
    require_columns(ds, fields, key, spec, "data.text_fields")
    has_labels = d.label_field in ds.column_names
    if need_labels and not has_labels:
        require_columns(ds, [d.label_field], key, spec, "data.label_field")
    texts = [["" if t is None else str(t) for t in ds[f]] for f in fields]
    num_empty = sum(1 for row in zip(*texts) if not any(s.strip() for s in row))
    enc = tokenizer(*texts, truncation=True, max_length=config.max_length)
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    types = [np.asarray(x, dtype=np.int32) for x in enc["token_type_ids"]] if "token_type_ids" in enc else \
        [np.zeros_like(x) for x in ids]
    lengths = np.asarray([len(x) for x in ids])
    raw = ds[d.label_field] if has_labels else None
    labels = label_ids(raw, config, key, first_row, spec) if has_labels else None
    keys = sharded.keys_of(zip(*texts, *([raw] if has_labels else [])))  # texts and label: for duplicates
    return Features(ids, types, labels, raw, lengths, num_empty, int((lengths >= config.max_length).sum()),
                    sharded.duplicates(keys), keys)


def scan(ds, tokenizer, config, key: str, spec: str, *, first_row: int = 0) -> dict:
    """What planning needs of these training rows (one process's slice; jaxsft.data.sharded)."""
    f = featurize(ds, tokenizer, config, key, spec, need_labels=True, first_row=first_row)
    return {"lengths": f.lengths, "labels": f.labels, "keys": f.keys, "num_empty": f.num_empty,
            "num_truncated": f.num_truncated}


def from_scan(meta: dict, ds, tokenizer, config, key: str, spec: str) -> Features:
    """Training features from the gathered scans: lengths and labels of every row, token ids made on demand."""
    def build(indices: np.ndarray) -> list[dict]:
        f = featurize(ds.select(indices), tokenizer, config, key, spec, need_labels=True)
        return [{"input_ids": a, "token_type_ids": b} for a, b in zip(f.input_ids, f.token_type_ids)]

    rows = sharded.OnDemand(len(meta["lengths"]), build, config.max_length)
    return Features(rows.field("input_ids"), rows.field("token_type_ids"), meta["labels"], None, meta["lengths"],
                    meta["num_empty"], meta["num_truncated"], sharded.duplicates(meta["keys"]), on_demand=rows)


def batch_lengths(features: Features, indices: np.ndarray, buckets: list[int]) -> tuple[int, ...]:
    """The padded length(s) of this batch: all its shapes follow from them."""
    return (bucket_for(int(features.lengths[indices].max()), buckets),)


def collate(features: Features, indices: np.ndarray, batch_size: int, buckets: list[int], pad_id: int,
            rows: slice | None = None) -> dict:
    """One fixed-shape numpy batch; rows past len(indices) are padding with weight 0. `rows`: only those rows of
    it (a process's share; the length still comes from the whole batch)."""
    (length,) = batch_lengths(features, indices, buckets)
    indices, batch_size = local_part(indices, batch_size, rows)
    if features.on_demand is not None:
        features.on_demand.fetch(indices)
    ids = pad_rows([features.input_ids[i] for i in indices], length, pad_id, batch_size)
    types = pad_rows([features.token_type_ids[i] for i in indices], length, 0, batch_size)
    mask = np.zeros((batch_size, length), dtype=np.int32)
    for r, i in enumerate(indices):
        mask[r, :min(features.lengths[i], length)] = 1
    weights = np.zeros((batch_size,), dtype=np.float32)
    weights[:len(indices)] = 1.0
    labels_dtype = np.float32 if features.labels is not None and features.labels.dtype.kind == "f" else np.int32
    labels = np.zeros((batch_size,), dtype=labels_dtype)
    if features.labels is not None:
        labels[:len(indices)] = features.labels[indices]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels, "weights": weights}


def forward(apply, params, batch, rng=None):
    return apply(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], rng=rng)


def loss(logits, batch, config):
    """(sum of per-example losses, number of real examples): the loop divides, so accumulation stays exact."""
    w = batch["weights"]
    if config.model.num_labels == 1:
        per = (logits[:, 0] - batch["labels"]) ** 2
    elif config.label_smoothing > 0:
        onehot = optax.smooth_labels(jnp.eye(logits.shape[-1])[batch["labels"]], config.label_smoothing)
        per = optax.softmax_cross_entropy(logits, onehot)
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return (per * w).sum(), w.sum()


def eval_outputs(logits, batch):
    """What evaluation keeps per row: the logits (metrics are computed on the host)."""
    return logits


def compute_metrics(outputs: np.ndarray, features: Features, config) -> dict[str, float]:
    if features.labels is None:
        return {}
    if config.model.num_labels == 1:
        m = metrics_lib.regression(outputs[:, 0], features.labels)
    else:
        m = metrics_lib.classification(outputs, features.labels)
    return {f"eval_{k}": v for k, v in m.items()}


def prediction_rows(outputs: np.ndarray, features: Features, config) -> list[dict]:
    rows = []
    names = list(config.data.label_names or [])
    probs = None if config.model.num_labels == 1 else np.exp(metrics_lib.log_softmax(outputs))
    for i in range(len(outputs)):
        row = {"index": i}
        if features.raw_labels is not None:
            row["label"] = features.raw_labels[i]
        if probs is None:
            row["prediction"] = float(outputs[i, 0])
        else:
            pid = int(outputs[i].argmax())
            row.update(pred_id=pid, pred_label=names[pid] if names else pid,
                       probabilities=[round(float(p), 6) for p in probs[i]])
        rows.append(row)
    return rows


def id2label(config) -> dict[int, str]:
    if config.model.num_labels == 1:
        return {0: "LABEL_0"}
    return {i: str(n) for i, n in enumerate(config.data.label_names)}


def set_label_config(hf_config, config) -> None:
    """Puts num_labels / id2label / label2id / problem_type on the HF config, as transformers would."""
    labels = id2label(config)
    hf_config.num_labels = config.model.num_labels
    hf_config.id2label = labels
    hf_config.label2id = {v: k for k, v in labels.items()}
    hf_config.problem_type = "regression" if config.model.num_labels == 1 else "single_label_classification"
