"""Data source specs → HF `datasets.Dataset`: local .tsv/.csv/.json/.jsonl/.parquet files or hub specs."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from jaxsft.errors import UserError

log = logging.getLogger("jaxsft")

FORMATS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _looks_like_path(spec: str) -> bool:
    return Path(spec).suffix.lower() in FORMATS or spec.startswith((".", "/", "~")) or Path(spec).exists()


def load_source(spec: str, key: str):
    """Reads one data spec; `key` (e.g. `data.train`) names the config key in every error."""
    import datasets

    datasets.disable_progress_bars()
    if not spec:
        raise UserError(f"{key} is not set")
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"{key}: file not found: {spec}")
        if path.is_dir():
            raise UserError(f"{key}: {spec} is a directory, not a data file")
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"{key}: unknown file format {path.suffix!r} for {spec} "
                            f"(use one of {', '.join(FORMATS)})")
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
