"""Malformed data files: every reader names the file, the 1-based line (as an editor shows it) and the reason in
one line (a UserError: the CLI prints it as one `error:` line and exits 2).

Most cases call the reader (`jaxsft.data.sources.load_source`, the label checks of the classification task)
in-process with the file given by a relative name, so the whole message can be compared; three run the real
`python -m jaxsft.run` to prove the exit code, the single stderr line and the untouched workdir.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import pytest
from test_bad_input import SENTINEL, SENTINEL_TEXT, models, run_cli, run_in_process  # noqa: F401 - models: a fixture

from jaxsft.data import sources
from jaxsft.data.sources import load_source
from jaxsft.errors import UserError

GOOD = [("a good film", "positive"), ("a bad film", "negative"), ("great music", "positive"),
        ("awful plot", "negative"), ("fine fine cast", "positive"), ("boring and weak", "negative")]


def tsv(rows, header=("sentence", "label")) -> str:
    return "".join("\t".join(r) + "\n" for r in [header, *rows])


def jsonl(rows) -> str:
    return "".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows)


def _write(name: str, content: str | bytes) -> None:
    if isinstance(content, str):
        Path(name).write_text(content, encoding="utf-8")
    else:
        Path(name).write_bytes(content)


def _parquet(rows) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"sentence": pa.array([s for s, _ in rows], pa.string()),
                             "label": pa.array([y for _, y in rows], pa.string())}), buf)
    return buf.getvalue()


ELEVEN_ROWS = tsv(GOOD + GOOD[:4])  # header + 10 rows: the next line is line 12
BAD_JSON_LINE = '{"sentence": "a film" "label": "positive"}\n'  # a missing comma at column 23
CASES = {
    # id: ({file name: content}, spec, the whole expected message)
    "jsonl-invalid-json-line": (
        {"train.jsonl": jsonl(GOOD) + BAD_JSON_LINE}, "train.jsonl",
        "data.train: train.jsonl line 7: invalid JSON (Expecting ',' delimiter at column 23)"),
    "jsonl-line-not-an-object": (
        {"train.jsonl": jsonl(GOOD[:2]) + '["a film", "positive"]\n'}, "train.jsonl",
        'data.train: train.jsonl line 3: a JSON array, not an object (one {"field": value, ...} per line)'),
    "jsonl-latin-1": (
        {"train.jsonl": jsonl(GOOD[:3]).encode() + '{"sentence": "caf\xe9", "label": "positive"}\n'.encode("latin-1")},
        "train.jsonl", "data.train: train.jsonl is not UTF-8 (byte 0xe9 at line 4); re-encode it as UTF-8"),
    "jsonl-only-blank-lines": ({"train.jsonl": "\n\n  \n"}, "train.jsonl",
                               "data.train: train.jsonl has only blank lines"),
    "json-array-invalid": (
        {"train.json": '[{"sentence": "a", "label": "positive"},\n {"sentence": "b" "label": "negative"}]\n'},
        "train.json", "data.train: train.json line 2: invalid JSON (Expecting ',' delimiter at column 19)"),
    "json-empty-array": ({"train.json": "[]\n"}, "train.json",
                         "data.train: train.json has no rows (an empty JSON array)"),
    "json-array-cut-short": ({"train.json": '[{"sentence": "a", "label": "positive"},\n'}, "train.json",
                             "data.train: train.json line 1: invalid JSON (the file ends inside a value: "
                             "Expecting value)"),
    "tsv-extra-field": (
        {"train.tsv": ELEVEN_ROWS + "a film\tpositive\textra\n"}, "train.tsv",
        "data.train: train.tsv line 12: 3 tab-separated fields, the header has 2"),
    "tsv-latin-1": (
        {"train.tsv": tsv(GOOD[:2]).encode() + "caf\xe9 music\tpositive\n".encode("latin-1")}, "train.tsv",
        "data.train: train.tsv is not UTF-8 (byte 0xe9 at line 4); re-encode it as UTF-8"),
    "tsv-utf-16": (
        {"train.tsv": tsv(GOOD).encode("utf-16")}, "train.tsv",
        "data.train: train.tsv is not UTF-8 (byte 0xff at line 1, a UTF-16 byte-order mark); re-encode it as UTF-8"),
    "tsv-utf-16-without-bom": (
        {"train.tsv": tsv(GOOD).encode("utf-16-le")}, "train.tsv",
        "data.train: train.tsv is not UTF-8 text (a NUL byte at line 1, as UTF-16 has); re-encode it as UTF-8"),
    "tsv-header-only": ({"train.tsv": "sentence\tlabel\n"}, "train.tsv",
                        "data.train: train.tsv has a header but no rows"),
    "csv-extra-field-after-multiline-field": (
        {"train.csv": 'sentence,label\n"a, good film",positive\n"two\nlines",negative\nbad,row,here\n'}, "train.csv",
        "data.train: train.csv line 5: 3 comma-separated fields, the header has 2"),
    "csv-every-row-has-an-extra-field": (  # pandas would silently make the first column an index
        {"train.csv": "sentence,label\na film,positive,1\nmusic,negative,0\n"}, "train.csv",
        "data.train: train.csv line 2: 3 comma-separated fields, the header has 2"),
    "csv-unclosed-quote": (
        {"train.csv": 'sentence,label\na film,positive\n"never closed,negative\nmusic,positive\n'}, "train.csv",
        'data.train: train.csv line 3: a quoted field (") is never closed; the file ends inside it'),
    "csv-latin-1": (
        {"train.csv": b"sentence,label\n" + "na\xefve plot,negative\n".encode("latin-1")}, "train.csv",
        "data.train: train.csv is not UTF-8 (byte 0xef at line 2); re-encode it as UTF-8"),
    "csv-header-only": ({"train.csv": "sentence,label\n\n"}, "train.csv",
                        "data.train: train.csv has a header but no rows"),
    "parquet-not-parquet": (
        {"train.parquet": b"PAR1 this is not a parquet file"}, "train.parquet",
        "data.train: train.parquet is not a readable Parquet file (Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file.)"),
    "parquet-no-rows": ({"train.parquet": _parquet([])}, "train.parquet", "data.train: train.parquet has no rows"),
    "pairs-unequal-line-counts": (
        {"train.en": "a\nb\nc\n", "train.de": "A\nB\n"}, "train.en,train.de",
        "data.train: train.en has 3 lines but train.de has 2; line-aligned files need the same number of lines"),
    "pairs-latin-1": (
        {"train.en": "a\nb\n", "train.de": b"A\n" + "\xc4\n".encode("latin-1")}, "train.en,train.de",
        "data.train: train.de is not UTF-8 (byte 0xc4 at line 2); re-encode it as UTF-8"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_reader_names_file_line_and_reason(case, tmp_path, monkeypatch):
    files, spec, want = CASES[case]
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        _write(name, content)
    with pytest.raises(UserError) as info:
        load_source(spec, "data.train")
    assert str(info.value) == want
    assert "\n" not in str(info.value)


def test_causal_lm_jsonl_with_a_bad_line(tmp_path, monkeypatch):
    """The causal_lm task reads its SFT JSONL through the same reader (`load_splits` → `load_source`)."""
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"say {i}", "completion": f"{i}"} for i in range(4)]
    _write("sft.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n" + '{"prompt": "say 5", "completion": }\n')
    with pytest.raises(UserError) as info:
        load_source("sft.jsonl", "data.eval", source_field="source", target_field="target")
    assert str(info.value) == "data.eval: sft.jsonl line 6: invalid JSON (Expecting value at column 35)"


def test_gs_file_is_diagnosed_locally_but_named_as_given(tmp_path, monkeypatch):
    """A gs:// file is read from its downloaded copy (fs.local_file); the message names the user's URL."""
    local = tmp_path / "download" / "train.jsonl"
    local.parent.mkdir()
    local.write_text(jsonl(GOOD[:2]) + BAD_JSON_LINE)
    monkeypatch.setattr(sources.fs, "local_file", lambda p, key: local)
    with pytest.raises(UserError) as info:
        load_source("gs://bucket/data/train.jsonl", "data.train")
    assert str(info.value) == ("data.train: gs://bucket/data/train.jsonl line 3: invalid JSON "
                               "(Expecting ',' delimiter at column 23)")


@pytest.mark.parametrize("name,content", [
    ("ok.tsv", tsv(GOOD)),
    ("ok_bom.tsv", codecs.BOM_UTF8 + tsv(GOOD).encode()),
    ("ok.csv", 'sentence,label\n"a, quoted\nfilm",positive\nmusic,negative\n'),
    ("ok.jsonl", jsonl(GOOD) + "\n"),
    ("ok_bom.jsonl", codecs.BOM_UTF8 + jsonl(GOOD).encode()),
    ("ok.json", json.dumps([{"sentence": s, "label": y} for s, y in GOOD], indent=1)),
    ("ok.parquet", _parquet(GOOD)),
    ("ok_fewer_fields.tsv", tsv(GOOD) + "a film without a label\n"),  # read as an empty label: reported later
])
def test_good_files_still_load(name, content, tmp_path, monkeypatch):
    """The controls: well-formed files (and a UTF-8 byte-order mark) load as before."""
    monkeypatch.chdir(tmp_path)
    _write(name, content)
    ds = load_source(name, "data.train")
    assert ds.column_names[:2] == ["sentence", "label"] and len(ds) >= 2


# Labels: a `nan` (or empty) label among numbers names the row and its file line, and says it is not a number.
def _classify_config(train: str, label_names=("negative", "positive"), num_labels: int = 0):
    from jaxsft.defaults import base_config

    c = base_config()
    c.data.train = train
    c.data.text_fields = ["sentence"]
    c.data.label_names = list(label_names)
    c.model.num_labels = num_labels
    return c


@pytest.mark.parametrize("case", [
    ("tsv-nan-with-label-names", "train.tsv", tsv([("a", "1"), ("b", "0"), ("c", "nan"), ("d", "1")]),
     ("negative", "positive"), 0,
     "data.train: train.tsv line 4 (row 2): label 'nan' in column 'label' is not a number "
     "(the other labels are numbers; fix or drop that row)"),
    ("tsv-nan-inferred-labels", "train.tsv", tsv([("a", "1"), ("b", "0"), ("c", "1"), ("d", "NaN")]), (), 0,
     "data.train: train.tsv line 5 (row 3): label 'NaN' in column 'label' is not a number "
     "(the other labels are numbers; fix or drop that row)"),
    ("tsv-empty-label", "train.tsv", "sentence\tlabel\na\t1\n\nb\t\nc\t0\n", ("negative", "positive"), 0,
     "data.train: train.tsv line 4 (row 1) has no label in column 'label'"),
    ("jsonl-NaN-label", "train.jsonl",
     '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0}\n{"sentence": "c", "label": NaN}\n', (), 0,
     "data.train: train.jsonl line 3 (row 2): label nan in column 'label' is not a number "
     "(the other labels are numbers; fix or drop that row)"),
    ("tsv-regression-nan", "train.tsv", tsv([("a", "0.5"), ("b", "nan"), ("c", "1.5")]), (), 1,
     "data.train: train.tsv line 3 (row 1): label 'nan' in column 'label' is not a number "
     "(regression (model.num_labels=1) needs a number in every row)"),
    ("csv-nan-after-multiline-text", "train.csv", 'sentence,label\n"two\nlines",1\nb,0\nc,nan\n', (), 0,
     "data.train: train.csv line 5 (row 2): label 'nan' in column 'label' is not a number "
     "(the other labels are numbers; fix or drop that row)"),
], ids=lambda c: c[0])
def test_nan_label_names_row_and_line(case, tmp_path, monkeypatch):
    from jaxsft.tasks.classification import resolve_labels

    _, name, content, label_names, num_labels, want = case
    monkeypatch.chdir(tmp_path)
    _write(name, content)
    config = _classify_config(name, label_names, num_labels)
    with pytest.raises(UserError) as info:
        resolve_labels(config, load_source(name, "data.train"))
    assert str(info.value) == want


def test_nan_label_in_eval_file(tmp_path, monkeypatch):
    """Eval labels are checked by label_ids (featurize passes the spec): the same message, key data.eval."""
    from jaxsft.tasks.classification import label_ids

    monkeypatch.chdir(tmp_path)
    _write("eval.tsv", tsv([("a", "0"), ("b", "1"), ("c", "1"), ("d", "nan")]))
    config = _classify_config("train.tsv")
    config.model.num_labels = 2
    values = load_source("eval.tsv", "data.eval")["label"]
    with pytest.raises(UserError) as info:
        label_ids(values, config, "data.eval", 0, "eval.tsv")
    assert str(info.value) == ("data.eval: eval.tsv line 5 (row 3): label 'nan' in column 'label' is not a number "
                               "(the other labels are numbers; fix or drop that row)")


CLI_CASES = {  # id: (file name, content, the message after `error: data.train: TMP/`, a real subprocess?)
    "jsonl-invalid-json": ("train.jsonl", jsonl(GOOD) + BAD_JSON_LINE,
                           "train.jsonl line 7: invalid JSON (Expecting ',' delimiter at column 23)", True),
    "tsv-latin-1": ("train.tsv", tsv(GOOD[:2]).encode() + "caf\xe9\tpositive\n".encode("latin-1"),
                    "train.tsv is not UTF-8 (byte 0xe9 at line 4); re-encode it as UTF-8", False),
    "tsv-nan-label": ("train.tsv", tsv([("a", "1"), ("b", "0"), ("c", "nan"), ("d", "1")]),
                      "train.tsv line 4 (row 2): label 'nan' in column 'label' is not a number "
                      "(the other labels are numbers; fix or drop that row)", False),
}


@pytest.mark.parametrize("case", CLI_CASES, ids=list(CLI_CASES))
def test_cli_exits_2_with_one_line(case, models, tmp_path, capsys, monkeypatch):  # noqa: F811 - the fixture
    """`python -m jaxsft.run` (one real subprocess; the others through the CLI's own entry in-process, as
    tests/test_bad_input.py runs most of its cases): exit 2, exactly one stderr line, the workdir untouched."""
    name, content, want, real_process = CLI_CASES[case]
    data = tmp_path / name
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / SENTINEL).write_text(SENTINEL_TEXT)
    args = ["--config", "configs/classify.py", "--workdir", str(workdir),
            f"--config.model.name_or_path={models['model']}", f"--config.data.train={data}", "--config.max_steps=2",
            "--config.batch_size=4", "--config.max_length=16"]
    r = run_cli(args) if real_process else run_in_process(args, capsys, monkeypatch)
    report = f"exit {r.returncode}\n--- stdout\n{r.stdout[-2000:]}\n--- stderr\n{r.stderr[-4000:]}"
    assert r.returncode == 2, report
    assert r.stderr.splitlines() == [f"error: data.train: {tmp_path}/{want}"], report
    assert sorted(os.listdir(workdir)) == [SENTINEL], report
