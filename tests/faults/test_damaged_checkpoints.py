"""A checkpoint that is not whole — a save cut short by kill -9, or the newest checkpoint damaged on disk (a file
truncated, a file deleted): the same command again skips it with a warning naming the step and what is wrong,
resumes from the previous checkpoint and finishes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import ENV, data, run_args
from saved import committed_steps

from jaxsft import cli
from jaxsft import train as train_lib
from jaxsft.checkpoint import MANIFEST, Checkpoints, abstract
from jaxsft.errors import RunFailed

EXTRA = ("--config.max_steps=6", "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=3",
         "--config.data.buckets=[64]")


def rerun(args: list[str]) -> dict:
    """`python -m jaxsft.run ARGS` in this process (the same config and workdir as the command line)."""
    config, rest = cli.config_from_args(args[2:])
    return train_lib.train_and_evaluate(config, rest[rest.index("--workdir") + 1])


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def in_root(monkeypatch, caplog):
    monkeypatch.chdir(ROOT)  # configs/classify.py is relative
    caplog.set_level(logging.INFO, logger="jaxsft")


@pytest.mark.slow  # ~40 s: a CLI run that kills itself, then the rerun
def test_a_save_cut_short_by_kill_9_is_ignored_and_the_run_resumes_from_the_previous_checkpoint(
        tiny_bert, tmp_path, in_root, caplog):
    w = tmp_path / "w"
    args = run_args(tiny_bert, data(tmp_path)[0], "", w, *EXTRA)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env={**ENV, "JAXSFT_KILL_DURING_SAVE": "4"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = [p for p in (w / "checkpoints").iterdir() if p.name.startswith("4.orbax-checkpoint-tmp")]
    assert committed_steps(w) == [2] and len(partial) == 1, os.listdir(w / "checkpoints")
    assert any(f.is_file() for f in partial[0].rglob("*"))  # files written, never committed

    assert rerun(args)["step"] == 6
    assert any(f"ignoring {partial[0]}: an incomplete checkpoint of step 4" in m for m in warnings(caplog))
    assert "resuming from step 2 " in caplog.text
    assert not partial[0].exists() and committed_steps(w) == [2, 4, 6]


@pytest.fixture(scope="module")
def crashed(tiny_bert, tmp_path_factory) -> tuple[Path, list[str]]:
    """A workdir whose run crashed after step 4, with checkpoints at steps 2 and 4, and its command line."""
    tmp = tmp_path_factory.mktemp("crashed")
    args = run_args(tiny_bert, data(tmp)[0], "", tmp / "w", *EXTRA)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setattr(train_lib, "_FAIL_AFTER_STEP", 4)
        with pytest.raises(RuntimeError, match="injected failure after step 4"):
            rerun(args)
    assert committed_steps(tmp / "w") == [2, 4]
    return tmp / "w", args


def files_by_size(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size, reverse=True)


def truncate(step_dir: Path) -> str:
    big = files_by_size(step_dir / "state")[0]  # the largest array data
    os.truncate(big, big.stat().st_size // 2)
    return f"{big.relative_to(step_dir)} is {big.stat().st_size} bytes"


def delete(step_dir: Path) -> str:
    victim = files_by_size(step_dir / "state")[1]
    victim.unlink()
    return f"missing: {victim.relative_to(step_dir)}"


@pytest.mark.slow  # ~20 s each: a resumed run of a few steps
@pytest.mark.parametrize("damage", [truncate, delete], ids=["truncated-file", "deleted-file"])
def test_a_damaged_newest_checkpoint_is_named_skipped_and_the_previous_one_resumes(damage, crashed, tmp_path,
                                                                                  in_root, caplog):
    w = tmp_path / "w"
    shutil.copytree(crashed[0], w)
    args = [a.replace(str(crashed[0]), str(w)) for a in crashed[1]]
    what = damage(w / "checkpoints" / "4")

    assert rerun(args)["step"] == 6
    named = [m for m in warnings(caplog) if "checkpoint at step 4" in m and "is damaged" in m]
    assert len(named) == 1 and what in named[0], warnings(caplog)
    assert "resuming from step 2 " in caplog.text
    assert (w / "checkpoints" / "4.damaged").is_dir()  # kept aside, not deleted
    assert committed_steps(w) == [2, 4, 6]


@pytest.fixture
def two_checkpoints(tmp_path):
    """Checkpoints of a small state at steps 1 and 2 (no model, no training)."""
    import jax.numpy as jnp

    ck = Checkpoints(tmp_path / "checkpoints", keep=5)
    for step in (1, 2):
        state = {"params": {"w": jnp.full((256, 64), float(step))}, "opt_state": {"count": jnp.int32(step)}}
        ck.save(step, state, {"step": step})
    ck.close()
    return tmp_path / "checkpoints", abstract(state)


def restore_latest(directory, target):
    ck = Checkpoints(directory, keep=5)
    try:
        return ck.restore_latest(target)
    finally:
        ck.close()


@pytest.mark.parametrize("damage", [truncate, delete], ids=["truncated-file", "deleted-file"])
def test_restore_latest_names_the_damage_and_falls_back_to_the_previous_checkpoint(damage, two_checkpoints,
                                                                                    caplog):
    directory, target = two_checkpoints
    what = damage(directory / "2")
    state, meta = restore_latest(directory, target)
    assert meta["step"] == 1 and float(state["params"]["w"][0, 0]) == 1.0
    named = [m for m in warnings(caplog) if "checkpoint at step 2" in m and "is damaged" in m]
    assert len(named) == 1 and what in named[0], warnings(caplog)
    assert (directory / "2.damaged").is_dir() and Checkpoints(directory, read_only=True).steps() == [1]


def test_without_a_file_list_the_orbax_error_is_named_and_if_nothing_restores_the_run_stops(two_checkpoints,
                                                                                           caplog):
    directory, target = two_checkpoints
    for step in (1, 2):  # no jaxsft_files.json (as after a crash right after the commit): Orbax itself fails
        (directory / str(step) / MANIFEST).unlink()
        (directory / str(step) / "meta" / "metadata").unlink()
    with pytest.raises(RunFailed) as e:
        restore_latest(directory, target)
    msg = str(e.value)
    assert msg.startswith(f"no checkpoint in {directory} restores (step 2: ") and "step 1: " in msg, msg
    assert "meta/metadata" in msg and "\n" not in msg
    assert sum("is damaged" in m and "FileNotFoundError" in m for m in warnings(caplog)) == 2
    assert Checkpoints(directory, read_only=True).steps() == [1, 2]  # nothing moved when nothing restores


def test_an_incomplete_save_is_removed_with_a_warning_and_never_read(two_checkpoints, caplog):
    directory, target = two_checkpoints
    partial = directory / "3.orbax-checkpoint-tmp"
    shutil.copytree(directory / "2", partial)
    assert Checkpoints(directory, read_only=True).steps() == [1, 2]  # Orbax never lists it
    state, meta = restore_latest(directory, target)
    assert meta["step"] == 2 and not partial.exists()
    assert any(f"ignoring {partial}: an incomplete checkpoint of step 3" in m for m in warnings(caplog))
