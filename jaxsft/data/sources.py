"""Data source specs → HF `datasets.Dataset`: .tsv/.csv/.json/.jsonl/.parquet files (local or `gs://`), two line-aligned
plain-text files (`train.en,train.de`, source first), hub specs, or prepared TensorFlow Datasets
(`tfds:NAME[:SPLIT]`, read through `tfds.data_source`: ArrayRecord, no TensorFlow)."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from jaxsft import fs
from jaxsft.errors import UserError

log = logging.getLogger("jaxsft")

FORMATS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TFDS_PREFIX = "tfds:"
TFDS_EXTRA = "pip install 'jaxsft[tfds]' (tensorflow-datasets, array_record; no TensorFlow needed)"


def _looks_like_path(spec: str) -> bool:
    return Path(spec).suffix.lower() in FORMATS or spec.startswith((".", "/", "~")) or fs.is_remote(spec) or \
        Path(spec).exists()


def load_source(spec: str, key: str, *, source_field: str = "source", target_field: str = "target",
                tfds_data_dir: str | None = None):
    """Reads one data spec; `key` (e.g. `data.train`) names the config key in every error.

    `a.en,a.de` (a comma, and no file of that whole name) is a pair of line-aligned files: see `load_parallel`.
    `tfds:NAME[:SPLIT]` is a prepared TensorFlow Datasets split under `tfds_data_dir`: see `load_tfds`.
    """
    import datasets

    datasets.disable_progress_bars()
    if not spec:
        raise UserError(f"{key} is not set")
    if spec.startswith(TFDS_PREFIX):
        return load_tfds(spec, key, tfds_data_dir)
    if "," in spec and (fs.is_remote(spec) or not Path(spec).expanduser().exists()):
        return load_parallel(spec, key, source_field, target_field)
    if _looks_like_path(spec):
        path = fs.local_file(spec, key)  # gs://: downloaded once per process
        if not path.exists():
            raise UserError(f"{key}: file not found: {spec}")
        if path.is_dir():
            raise UserError(f"{key}: {spec} is a directory, not a data file")
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"{key}: unknown file format {path.suffix!r} for {spec} "
                            f"(use one of {', '.join(FORMATS)}, or two line-aligned text files: SOURCE,TARGET)")
        if path.stat().st_size == 0:
            raise UserError(f"{key}: {spec} is empty")
        kwargs = {}
        if builder == "csv":
            # GLUE-style TSV: tab-separated, no quote processing; never turn "NA"/"null" texts into missing values.
            kwargs = {"na_filter": False}
            if path.suffix.lower() == ".tsv":
                kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            ds = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", **kwargs)
        except Exception as e:  # malformed rows, bad JSON, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{key}: cannot read {spec}: {first}") from None
    else:
        name, _, split = spec.partition(":")
        parts = name.split("/")
        # "glue/sst2:train" → load_dataset("glue", "sst2"); "org/name:split" also works as a repo id.
        path_name, config_name = (parts[0], parts[1]) if len(parts) == 2 and parts[0] == "glue" else (name, None)
        try:
            ds = datasets.load_dataset(path_name, config_name, split=split or "train")
        except Exception as e:
            raise UserError(f"{key}: cannot load data set {spec!r} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if len(ds) == 0:
        raise UserError(f"{key}: {spec} has no rows")
    return ds


def require_columns(ds, columns: list[str], key: str, spec: str, hint: str) -> None:
    for col in columns:
        if col not in ds.column_names:
            raise UserError(f"{key}: {spec} has no column {col!r} (columns: {', '.join(ds.column_names)}); "
                            f"set {hint}")


def _read_lines(path: Path, key: str, spec: str) -> list[str]:
    if not path.exists():
        raise UserError(f"{key}: file not found: {spec}")
    if path.is_dir():
        raise UserError(f"{key}: {spec} is a directory, not a text file")
    if path.stat().st_size == 0:
        raise UserError(f"{key}: {spec} is empty")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{key}: {spec} is not UTF-8 text (byte {e.start})") from None
    # Split on "\n" only (as `wc -l` counts): str.splitlines would also break at U+2028, form feeds, ...
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def load_parallel(spec: str, key: str, source_field: str = "source", target_field: str = "target"):
    """`src_file,tgt_file` → a Dataset with columns source_field, target_field: line i of one pairs with line i of
    the other. Blank lines stay in place as "" so every pair (and every hypothesis line) keeps its line number."""
    import datasets

    paths = [p.strip() for p in spec.split(",")]
    if len(paths) != 2 or not all(paths):
        raise UserError(f"{key}: {spec!r}: give two line-aligned text files, source first, e.g. train.en,train.de")
    if source_field == target_field:
        raise UserError(f"{key}: data.source_field and data.target_field are both {source_field!r}")
    src, tgt = (_read_lines(fs.local_file(p, key), key, p) for p in paths)
    if len(src) != len(tgt):
        raise UserError(f"{key}: {paths[0]} has {len(src)} lines but {paths[1]} has {len(tgt)}; "
                        "line-aligned files need the same number of lines")
    return datasets.Dataset.from_dict({source_field: src, target_field: tgt})


def load_tfds(spec: str, key: str, data_dir: str | None = None):
    """`tfds:NAME[:SPLIT]` (NAME may be `name/config[:1.2.0]`; SPLIT defaults to `train` and may slice:
    `train[:10%]`) →
    a Dataset, read with random access from a data set already prepared in ArrayRecord format under `data_dir`
    (config `data.tfds_data_dir`; None: TFDS's default, `~/tensorflow_datasets`). Nothing is downloaded.

    Text features become `str`, numbers Python scalars, arrays lists; ClassLabel features stay integer ids."""
    import datasets

    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    version = re.match(r"\d+\.\d+\.\d+(?=:|$)", split)
    if version:  # tfds:name:1.2.0:split
        name, split = f"{name}:{version.group()}", split[version.end() + 1:]
    split = split or "train"
    if not name:
        raise UserError(f"{key}: {spec!r}: give a TFDS name, e.g. tfds:imdb_reviews:train")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(f"{key}: {spec!r} needs TensorFlow Datasets ({e.name or 'tensorflow_datasets'} is not "
                        f"installed): {TFDS_EXTRA}") from None
    where = data_dir or "TFDS's default data_dir (set data.tfds_data_dir for another)"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except ImportError as e:  # e.g. array_record missing: tfds imports it lazily
        raise UserError(f"{key}: {spec!r} needs {e.name or 'a missing module'}: {TFDS_EXTRA}") from None
    except Exception as e:  # not found, not prepared, unknown split, TFRecord files, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{key}: cannot read TFDS data set {name!r} split {split!r} from {where} "
                        f"({type(e).__name__}: {first}); it must be prepared there in ArrayRecord format, e.g. with "
                        "`tfds build NAME --file_format=array_record --data_dir DIR`") from None
    n = len(source)
    if n == 0:
        raise UserError(f"{key}: {spec} has no rows")
    rows = []
    chunk = 1024
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        got = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
        rows.extend(_plain_record(r) for r in got)
    ds = datasets.Dataset.from_list(rows)
    log.info("%s: %s: %d rows from TFDS %s split %s (columns %s)", key, spec, n, name, split,
             ", ".join(ds.column_names))
    return ds


def _plain_record(value):
    """A decoded TFDS record (numpy scalars and arrays, bytes) → plain Python values datasets can type."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain_record(v) for k, v in value.items()}
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in ("S", "O"):
            return [_plain_record(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain_record(v) for v in value]
    return value
