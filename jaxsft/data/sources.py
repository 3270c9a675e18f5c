"""Data source specs → HF `datasets.Dataset`: .tsv/.csv/.json/.jsonl/.parquet files (local or `gs://`), two line-aligned
plain-text files (`train.en,train.de`, source first), hub specs, or prepared TensorFlow Datasets
(`tfds:NAME[:SPLIT]`, read through `tfds.data_source`: ArrayRecord, no TensorFlow)."""

from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import json
import logging
import re
from pathlib import Path

from jaxsft import fs
from jaxsft.errors import UserError, first_line

log = logging.getLogger("jaxsft")

FORMATS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TFDS_PREFIX = "tfds:"
TFDS_EXTRA = "pip install 'jaxsft[tfds]' (tensorflow-datasets, array_record; no TensorFlow needed)"


@contextlib.contextmanager
def _quiet(name: str):
    """Logger `name` says nothing below CRITICAL inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _looks_like_path(spec: str) -> bool:
    return Path(spec).suffix.lower() in FORMATS or spec.startswith((".", "/", "~")) or fs.is_remote(spec) or \
        Path(spec).exists()


def load_source(spec: str, key: str, *, source_field: str = "source", target_field: str = "target",
                tfds_data_dir: str | None = None, streaming: bool = False):
    """Reads one data spec; `key` (e.g. `data.train`) names the config key in every error. `streaming`: a file or
    hub spec as a `datasets.IterableDataset` (read as it is iterated; data.streaming, jaxsft.data.streaming).

    `a.en,a.de` (a comma, and no file of that whole name) is a pair of line-aligned files: see `load_parallel`.
    `tfds:NAME[:SPLIT]` is a prepared TensorFlow Datasets split under `tfds_data_dir`: see `load_tfds`.
    """
    import datasets

    datasets.disable_progress_bars()
    if not spec:
        raise UserError(f"{key} is not set")
    pair = "," in spec and (fs.is_remote(spec) or not Path(spec).expanduser().exists())
    if streaming and (spec.startswith(TFDS_PREFIX) or pair):
        raise UserError(f"{key}: {spec}: data.streaming reads data files ({', '.join(FORMATS)}) and hub data sets; "
                        "tfds: specs and line-aligned text pairs are read whole (set data.streaming=False)")
    if spec.startswith(TFDS_PREFIX):
        return load_tfds(spec, key, tfds_data_dir)
    if pair:
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
            with _quiet("datasets"):  # its readers log their own error line; the one below says it all
                ds = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train",
                                           streaming=streaming, **kwargs)
        except Exception as e:  # malformed rows, bad JSON, another encoding, only a header, ...
            # datasets' own message hides the cause; a second pass over the file (only now) finds the line.
            raise UserError(f"{key}: {diagnose(path, spec) or f'cannot read {spec}: {_root_cause(e)}'}") from None
        if streaming:  # rows are read (and bad ones found) as the stream goes
            return ds
        _check_loaded(ds, builder, path, spec, key)
    else:
        name, _, split = spec.partition(":")
        parts = name.split("/")
        # "glue/sst2:train" → load_dataset("glue", "sst2"); "org/name:split" also works as a repo id.
        path_name, config_name = (parts[0], parts[1]) if len(parts) == 2 and parts[0] == "glue" else (name, None)
        try:
            ds = datasets.load_dataset(path_name, config_name, split=split or "train", streaming=streaming)
        except Exception as e:
            raise UserError(f"{key}: cannot load data set {spec!r} ({type(e).__name__}: "
                            f"{first_line(e)})") from None
        if streaming:
            return ds
    if len(ds) == 0:
        raise UserError(f"{key}: {spec} has no rows")
    return ds


def _columns(ds) -> list[str]:
    """A data set's column names; a stream that does not know them yet (CSV) shows its first row's."""
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds), {}).keys())


def load_mixture(specs: list[str], weights: list[float], stopping: str, seed: int, **fields):
    """data.mixture: each spec read as `load_source` does, then interleaved by datasets.interleave_datasets with
    the normalised weights (none: in turn), seeded; one line when the sources cannot be mixed. `streaming=True`:
    streams interleaved as they are read (datasets draws them in another order than in-memory mixtures)."""
    import datasets

    if stopping not in ("first_exhausted", "all_exhausted"):
        raise UserError(f"config.data.mixture_stopping must be first_exhausted or all_exhausted, got {stopping!r}")
    if weights and len(weights) != len(specs):
        raise UserError(f"config.data.mixture_weights: {len(weights)} weights for {len(specs)} data.mixture sources")
    if weights and (min(weights) < 0 or sum(weights) <= 0):
        raise UserError(f"config.data.mixture_weights must be >= 0 with a positive sum, got {list(weights)}")
    parts = [load_source(spec, f"data.mixture[{i}] ({spec})", **fields) for i, spec in enumerate(specs)]
    for i, p in enumerate(parts[1:], 1):
        if sorted(_columns(p)) != sorted(_columns(parts[0])):
            raise UserError(f"data.mixture[{i}] ({specs[i]}): columns {sorted(_columns(p))} differ from "
                            f"data.mixture[0]'s {sorted(_columns(parts[0]))}; mix sources of one format")
        if p.features != parts[0].features and None not in (p.features, parts[0].features):
            try:
                parts[i] = p.cast(parts[0].features)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"data.mixture[{i}] ({specs[i]}): its column types cannot take data.mixture[0]'s "
                                f"({type(e).__name__}: {first_line(e)[:200]})") from None
    total = float(sum(weights)) if weights else 0.0
    return datasets.interleave_datasets(parts, probabilities=[w / total for w in weights] if weights else None,
                                        seed=seed, stopping_strategy=stopping)


def require_columns(ds, columns: list[str], key: str, spec: str, hint: str) -> None:
    for col in columns:
        if col not in ds.column_names:
            raise UserError(f"{key}: {spec} has no column {col!r} (columns: {', '.join(ds.column_names)}); "
                            f"set {hint}")


class _Found(Exception):
    """What a diagnostic pass found wrong with a file: one line, naming the file (and the line)."""


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception behind `e` (datasets wraps the reader's own error)."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _not_utf8(spec: str, raw: bytes, err: UnicodeDecodeError | None, n: int) -> str:
    if err is None:  # decoded, but holds NUL bytes: UTF-16/32 without a byte-order mark
        return f"{spec} is not UTF-8 text (a NUL byte at line {n}, as UTF-16 has); re-encode it as UTF-8"
    hint = ""
    if n == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        hint = ", a UTF-16 byte-order mark"
    return f"{spec} is not UTF-8 (byte 0x{raw[err.start]:02x} at line {n}{hint}); re-encode it as UTF-8"


def _text_lines(path: Path, spec: str):
    """(line number, text) of each line of a UTF-8 file, counted as editors and `wc -l` do (split on "\n", the
    "\n" kept); a leading UTF-8 byte-order mark is dropped. Raises _Found at the first byte that is not UTF-8."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Found(_not_utf8(spec, raw, e, n)) from None
            if "\0" in text:
                raise _Found(_not_utf8(spec, raw, None, n))
            yield n, text


def _is_blank(line: str) -> bool:
    return not line.strip("\r\n")


def _csv_records(path: Path, spec: str, delimiter: str):
    """(first line, fields) of each non-blank record, as pandas reads a GLUE TSV (tab, no quote processing) or a
    CSV (quoted fields may span lines)."""
    if delimiter == "\t":
        for n, line in _text_lines(path, spec):
            if not _is_blank(line):
                yield n, line.rstrip("\r\n").split("\t")
        return
    lines = _text_lines(path, spec)
    counter = {"n": 0}

    def feed():
        for n, line in lines:
            counter["n"] = n
            yield line

    start = 1
    for fields in csv.reader(feed()):
        if fields:  # pandas skips blank lines
            yield start, fields
        start = counter["n"] + 1


def _unclosed_quote(path: Path, spec: str) -> str | None:
    """A CSV quote that is never closed swallows the rest of the file (pandas: "EOF inside string")."""
    lines = (line for _, line in _text_lines(path, spec))
    reader = csv.reader(lines, strict=True)
    start = 1
    try:
        for _ in reader:
            start = reader.line_num + 1
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            return f"{spec} line {start}: a quoted field (\") is never closed; the file ends inside it"
    return None


def _diagnose_table(path: Path, spec: str, delimiter: str) -> str | None:
    what = "tab-separated" if delimiter == "\t" else "comma-separated"
    header = None
    rows = 0
    for n, fields in _csv_records(path, spec, delimiter):
        if header is None:
            header = fields
            continue
        if len(fields) > len(header):  # fewer are read as empty fields
            return f"{spec} line {n}: {len(fields)} {what} fields, the header has {len(header)}"
        rows += 1
    if header is None:
        return f"{spec} has only blank lines"
    if delimiter != "\t":
        found = _unclosed_quote(path, spec)
        if found:
            return found
    if rows == 0:
        return f"{spec} has a header but no rows"
    return None


def _json_error(spec: str, n: int, e: json.JSONDecodeError) -> str:
    return f"{spec} line {n}: invalid JSON ({e.msg} at column {e.colno})"


def _json_kind(value) -> str:
    return {list: "a JSON array", str: "a JSON string", bool: "a JSON boolean", type(None): "JSON null"}.get(
        type(value), "a JSON number")


def _diagnose_json(path: Path, spec: str) -> str | None:
    """JSON lines (one object per line), or one JSON document (an array of objects), as datasets reads them."""
    first = None
    for n, line in _text_lines(path, spec):  # also checks the whole file is UTF-8
        if first is None and line.strip():
            first = (n, line)
    if first is None:
        return f"{spec} has only blank lines"
    try:
        json.loads(first[1])
        lines_format = True
    except json.JSONDecodeError:
        lines_format = False  # one document over several lines
    if not lines_format or first[1].lstrip().startswith("["):
        text = path.read_text(encoding="utf-8-sig")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            end = len(text.rstrip())
            if e.pos >= end:  # e.g. a missing `]`: name the last line, not the one after it
                return f"{spec} line {text.count(chr(10), 0, end) + 1}: invalid JSON (the file ends inside a " \
                       f"value: {e.msg})"
            return _json_error(spec, e.lineno, e)
        if isinstance(doc, list) and not doc:
            return f"{spec} has no rows (an empty JSON array)"
        return None
    rows = 0
    for n, line in _text_lines(path, spec):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return _json_error(spec, n, e)
        if not isinstance(value, dict):
            return f"{spec} line {n}: {_json_kind(value)}, not an object (one {{\"field\": value, ...}} per line)"
        rows += 1
    return None if rows else f"{spec} has no rows"


def _diagnose_parquet(path: Path, spec: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # noqa: BLE001 - pyarrow's errors name the cause
        first = first_line(e) or type(e).__name__
        return f"{spec} is not a readable Parquet file ({first})"
    if meta.num_rows == 0:
        return f"{spec} has no rows"
    try:
        pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        first = first_line(e) or type(e).__name__
        return f"{spec} is a damaged Parquet file ({first})"
    return None


def diagnose(path: Path, spec: str) -> str | None:
    """The first thing wrong with local data file `path` (the user's `spec` names it): `SPEC line N: reason`, or a
    reason for the whole file; None if this pass finds nothing. Run only once the normal reader has failed, so
    the happy path reads a file once."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            return _diagnose_table(path, spec, "\t" if suffix == ".tsv" else ",")
        if suffix in (".json", ".jsonl"):
            return _diagnose_json(path, spec)
        if suffix == ".parquet":
            return _diagnose_parquet(path, spec)
    except _Found as found:
        return str(found)
    return None


def _check_loaded(ds, builder: str, path: Path, spec: str, key: str) -> None:
    """What datasets reads without an error but wrongly: CSV rows with more fields than the header (pandas makes
    the first column an index), strings that are not UTF-8 (the JSON reader keeps the bytes). Cheap: column
    names, and one C-speed pass over the loaded Arrow data for JSON."""
    if builder == "csv" and any(c.startswith("__index_level_") for c in ds.column_names):
        raise UserError(f"{key}: {diagnose(path, spec) or f'{spec}: its rows have more fields than the header'}")
    if builder == "json":
        import pyarrow as pa

        try:
            ds.data.table.validate(full=True)
        except pa.ArrowInvalid as e:
            raise UserError(f"{key}: {diagnose(path, spec) or f'cannot read {spec}: {_root_cause(e)}'}") from None


def line_of_row(spec: str, key: str, row: int) -> int | None:
    """The 1-based line (as an editor shows it) where data row `row` (0-based, in file order) of a TSV, CSV or
    JSON-lines file, or of a line-aligned pair, starts; None where rows have no line (Parquet, a JSON array, hub and
    TFDS data sets) or the file cannot be read. For messages only: it reads the file again."""
    try:
        if not spec or spec.startswith(TFDS_PREFIX) or row < 0:
            return None
        if "," in spec and (fs.is_remote(spec) or not Path(spec).expanduser().exists()):
            return row + 1  # load_parallel: line i of each file is row i - 1
        path = fs.local_file(spec, key)
        suffix = path.suffix.lower()
        if suffix in (".tsv", ".csv"):
            records = _csv_records(path, spec, "\t" if suffix == ".tsv" else ",")
            next(records, None)  # the header
        elif suffix in (".json", ".jsonl"):
            records = ((n, line) for n, line in _text_lines(path, spec) if line.strip())
            first = next(records, None)
            if first is None or first[1].lstrip().startswith("["):
                return None
            records = itertools.chain([first], records)
        else:
            return None
        return next((n for i, (n, _) in enumerate(records) if i == row), None)
    except Exception:  # noqa: BLE001 - only a message's detail
        return None


def where_row(spec: str, key: str, row: int) -> str:
    """`train.tsv line 12 (row 10)` where the row has a line in the file, else `row 10`: for messages."""
    line = line_of_row(spec, key, row)
    return f"{spec} line {line} (row {row})" if line else f"row {row}"


def _read_lines(path: Path, key: str, spec: str) -> list[str]:
    if not path.exists():
        raise UserError(f"{key}: file not found: {spec}")
    if path.is_dir():
        raise UserError(f"{key}: {spec} is a directory, not a text file")
    if path.stat().st_size == 0:
        raise UserError(f"{key}: {spec} is empty")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        try:
            for _ in _text_lines(path, spec):
                pass
        except _Found as found:
            raise UserError(f"{key}: {found}") from None
        raise
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise UserError(f"{key}: {_not_utf8(spec, b'', None, line)}")
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
        first = first_line(e)
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
    ds = _with_class_names(ds, source)
    log.info("%s: %s: %d rows from TFDS %s split %s (columns %s)", key, spec, n, name, split,
             ", ".join(ds.column_names))
    return ds


def _with_class_names(ds, source):
    """Top-level TFDS ClassLabel features become `datasets.ClassLabel` columns: the ids stay, and their names
    travel with the data (classification takes them as label names when `data.label_names` is not set)."""
    import datasets

    try:
        features = source.dataset_info.features
        import tensorflow_datasets as tfds
        named = {k: list(f.names) for k, f in features.items()
                 if isinstance(f, tfds.features.ClassLabel) and f.names and k in ds.column_names}
    except Exception:  # no info on this source: the ids alone
        return ds
    for column, names in named.items():
        values = ds[column]
        if all(isinstance(v, int) and 0 <= v < len(names) for v in values):
            ds = ds.cast_column(column, datasets.ClassLabel(names=names))
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
