"""Data source specs → HF `datasets.Dataset`: local .tsv/.csv/.json/.jsonl/.parquet files, two line-aligned
plain-text files (`train.en,train.de`, source first), or hub specs."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from jaxsft.errors import UserError

log = logging.getLogger("jaxsft")

FORMATS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _looks_like_path(spec: str) -> bool:
    return Path(spec).suffix.lower() in FORMATS or spec.startswith((".", "/", "~")) or Path(spec).exists()


def load_source(spec: str, key: str, *, source_field: str = "source", target_field: str = "target"):
    """Reads one data spec; `key` (e.g. `data.train`) names the config key in every error.

    `a.en,a.de` (a comma, and no file of that whole name) is a pair of line-aligned files: see `load_parallel`.
    """
    import datasets

    datasets.disable_progress_bars()
    if not spec:
        raise UserError(f"{key} is not set")
    if "," in spec and not Path(spec).expanduser().exists():
        return load_parallel(spec, key, source_field, target_field)
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
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
    src, tgt = (_read_lines(Path(p).expanduser(), key, p) for p in paths)
    if len(src) != len(tgt):
        raise UserError(f"{key}: {paths[0]} has {len(src)} lines but {paths[1]} has {len(tgt)}; "
                        "line-aligned files need the same number of lines")
    return datasets.Dataset.from_dict({source_field: src, target_field: tgt})
