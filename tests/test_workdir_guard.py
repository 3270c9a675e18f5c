"""A workdir is new, empty, or a jaxsft run: anything else is refused with one line and left untouched."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_bad_input import good_args, run_in_process
from test_bad_input import models as models  # noqa: F401 - the tiny-model fixture

from jaxsft.errors import UserError
from jaxsft.train import check_is_run_folder


def test_new_empty_and_run_folders_are_accepted(tmp_path):
    check_is_run_folder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".lock").write_text("")
    check_is_run_folder(tmp_path / "empty")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "classification", "model": {"name_or_path": "x"}}))
    (run / "checkpoints").mkdir()
    check_is_run_folder(run)


@pytest.mark.parametrize("content", ["hf_model", "other_files"])
def test_other_folders_are_refused(tmp_path, content):
    w = tmp_path / "w"
    w.mkdir()
    if content == "hf_model":
        (w / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        (w / "model.safetensors").write_bytes(b"x")
        want = "not a jaxsft config"
    else:
        (w / "notes.txt").write_text("mine")
        want = "notes.txt"
    with pytest.raises(UserError, match=want):
        check_is_run_folder(w)


def test_an_hf_model_folder_given_as_workdir_is_refused_and_untouched(tmp_path, models, capsys, monkeypatch):
    """The run used to overwrite the folder's own config.json and exit 0."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in models["model"].iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in hf.iterdir()}
    train = tmp_path / "t.tsv"
    train.write_text("sentence\tlabel\na good film\tpositive\na bad film\tnegative\n")
    paths = {"model": models["model"], "good": train}
    r = run_in_process(good_args(paths, hf), capsys, monkeypatch)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith("error: --workdir"), r.stderr
    assert "not a jaxsft run" in r.stderr
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in hf.iterdir()} == before


def test_an_empty_workdir_argument_is_refused(tmp_path, models, capsys, monkeypatch):
    """`--workdir=` used to write a whole run into the current folder."""
    train = tmp_path / "t.tsv"
    train.write_text("sentence\tlabel\na good film\tpositive\na bad film\tnegative\n")
    args = good_args({"model": models["model"], "good": train}, tmp_path)
    args[3] = ""
    r = run_in_process(args, capsys, monkeypatch)
    assert r.returncode == 2 and "--workdir is empty" in r.stderr.splitlines()[-1], r.stderr
