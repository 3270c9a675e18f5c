"""A workdir that cannot be created or written: exit 2 with one line naming it, before any model or data is
loaded (the model and data paths below do not exist, so reaching them would give another error)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import run_args

from jaxsft import run as run_lib
from jaxsft.errors import run_cli


@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.chdir(ROOT)
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level


def read_only_dir(tmp: Path) -> Path:
    d = tmp / "read_only"
    d.mkdir()
    d.chmod(0o555)
    return d / "w"


CASES = {  # name: (workdir under tmp, substring of the error line)
    "parent-is-a-file": (lambda t: (t / "notes.txt").write_text("x") and t / "notes.txt" / "w",
                         "notes.txt is a file, so the folder cannot be created"),
    "grandparent-is-a-file": (lambda t: (t / "notes.txt").write_text("x") and t / "notes.txt" / "a" / "w",
                              "notes.txt is a file, so the folder cannot be created"),
    "under-proc": (lambda t: Path("/proc/jaxsft-no-such-dir/w"), "cannot be created (making a folder in /proc failed"),
    "proc-folder": (lambda t: Path("/proc/self"), "is not writable (creating a file in it failed"),
    "read-only-parent": (read_only_dir, "read_only failed: Permission denied"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unusable_workdir_exits_2_with_one_line_before_loading_anything(case, tmp_path, cli_env, capsys):
    if case == "read-only-parent" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    make, expect = CASES[case]
    w = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        run_cli(run_lib.main, run_args(tmp_path / "no_model", tmp_path / "no_data.tsv", "", w)[2:])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --workdir {w}") and expect in lines[0], lines[0]
    assert "no_model" not in lines[0] and "no_data" not in lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, not even a probe


def test_object_store_workdir_without_gcsfs_or_of_another_scheme_is_one_line(monkeypatch):
    """gs:// needs gcsfs (the `gcs` extra): without it one line naming the install; s3:// etc. are refused. Neither
    becomes a local folder called "gs:" (tests/test_gcs_workdir.py runs a gs:// workdir end to end)."""
    import sys

    from jaxsft.errors import UserError
    from jaxsft.train import check_workdir

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs raises ImportError
    with pytest.raises(UserError, match=r"^--workdir gs://bucket/run1: gs:// workdirs need gcsfs: pip install "
                                        r"'jaxsft\[gcs\]'$"):
        check_workdir("gs://bucket/run1")
    with pytest.raises(UserError, match=r"^--workdir s3://bucket/run1: s3:// is not supported; use a local folder "
                                        r"or gs://bucket/path$"):
        check_workdir("s3://bucket/run1")
    assert not Path("gs:").exists() and not Path("s3:").exists()
