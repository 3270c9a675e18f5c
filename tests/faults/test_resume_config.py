"""Rerunning a workdir with a changed config: a key that defines the run (model, data, labels, tokenizer,
max_length, seed, LoRA ...) differing from W/config.json is refused with exit 2 and one line listing each
`key: old → new`, before anything is loaded or written, unless --force; schedule and bookkeeping keys may change,
and a raised max_steps trains on from the last checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_collections
import pytest
from conftest import ROOT
from helpers import data, run_args

from jaxsft import cli
from jaxsft import config as config_lib
from jaxsft import run as run_lib
from jaxsft import train as train_lib
from jaxsft.errors import UserError, run_cli


@pytest.fixture
def cli_env(monkeypatch, caplog):
    """run_cli in this process: cwd at the project root; root logging handlers put back afterwards."""
    monkeypatch.chdir(ROOT)
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level


def cli_exit(argv: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as e:
        run_cli(run_lib.main, argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_changes_tells_keys_that_define_the_run_from_schedule_keys():
    saved = json.loads(config_lib.to_json(config_lib.load_config_file(str(ROOT / "configs" / "classify.py"))))
    saved["data"]["label_names"] = ["negative", "positive"]  # as a finished run records its resolved labels
    new = ml_collections.ConfigDict(saved)
    new.seed, new.data.train, new.lora.rank, new.max_length = 7, "other.tsv", 8, 32
    new.max_steps, new.eval_every_steps, new.keep_checkpoints, new.mesh.data = 100, 5, 9, 2
    defining, allowed = config_lib.run_changes(saved, new)
    assert defining == [f"data.train: {saved['data']['train']!r} → 'other.tsv'", "lora.rank: 0 → 8",
                        "max_length: 64 → 32", "seed: 42 → 7"]
    assert allowed == ["eval_every_steps: -1 → 5", "keep_checkpoints: 2 → 9", "max_steps: -1 → 100",
                       "mesh.data: -1 → 2"]
    unset = ml_collections.ConfigDict(saved)
    unset.data.label_names = None  # left for the run to infer from the data: compared once resolved
    assert config_lib.run_changes(saved, unset, unresolved=True) == ([], [])
    assert config_lib.run_changes(saved, unset)[0] == ["data.label_names: ['negative', 'positive'] → None"]


def test_a_changed_run_defining_key_exits_2_listing_the_changes_before_loading_anything(tmp_path, cli_env, capsys):
    w = tmp_path / "w"
    model = tmp_path / "no_such_model"  # never loaded: the refusal comes first
    args = run_args(model, tmp_path / "train.tsv", "", w)[2:]
    w.mkdir()
    config, _ = cli.config_from_args(args)
    (w / "config.json").write_text(config_lib.to_json(config) + "\n")  # as the first run of `args` left it
    before = snapshot(w)

    code, lines = cli_exit(args + ["--config.seed=7", "--config.max_length=32", "--config.max_steps=9"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --workdir {w} holds a run with another config ({w / 'config.json'}); "
                               "changed: max_length: 64 → 32; seed: 42 → 7. "), lines[0]
    assert "--force" in lines[0] and "max_steps" not in lines[0]  # a schedule key is not a reason to refuse
    assert snapshot(w) == before

    # --force, or only schedule keys changed: past the check, on to loading (here: the missing model, exit 2)
    for extra in (["--config.seed=7", "--force"], ["--config.max_steps=9", "--config.checkpoint_every_steps=3"]):
        code, lines = cli_exit(args + extra, capsys)
        assert code == 2 and str(model) in lines[-1] and "another config" not in lines[-1], lines
        assert snapshot(w) == before


@pytest.mark.slow  # ~40 s: a short run, then two resumes
def test_raising_max_steps_trains_on_and_force_resumes_with_a_changed_key(tiny_bert, tmp_path, cli_env, caplog):
    caplog.set_level(logging.INFO, logger="jaxsft")
    w = tmp_path / "w"
    args = run_args(tiny_bert, data(tmp_path)[0], "", w, "--config.max_steps=2", "--config.data.buckets=[64]")[2:]

    def train(*extra):
        config, _ = cli.config_from_args(args + list(extra))
        force = "--force" in extra
        return train_lib.train_and_evaluate(config, w, force=force)

    assert train()["step"] == 2
    before = snapshot(w)
    with pytest.raises(UserError, match="changed: seed: 42 → 7"):
        train("--config.seed=7")
    assert snapshot(w) == before

    caplog.clear()
    assert train("--config.max_steps=4")["step"] == 4
    assert "resuming from step 2 " in caplog.text and "max_steps: 2 → 4" in caplog.text
    assert json.loads((w / "config.json").read_text())["max_steps"] == 4

    caplog.clear()
    assert train("--config.max_steps=4", "--config.learning_rate=0.002", "--force")["step"] == 4
    assert any("--force" in r.getMessage() and "learning_rate: 0.001 → 0.002" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    assert json.loads((w / "config.json").read_text())["learning_rate"] == 0.002
