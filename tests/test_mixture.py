"""Data mixtures (data.mixture, data.mixture_weights, data.mixture_stopping): which examples a mixture holds and in
what order (seeded, the same on every call), bad mixtures as one line, and an SFT run on a mixture that is killed
and rerun goes on exactly as the uninterrupted run (the same losses step by step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import alpaca_rows, make_tiny_decoder, write_jsonl

from jaxsft import pipeline
from jaxsft.data.sources import load_mixture
from jaxsft.defaults import base_config
from jaxsft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(60)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(20)])
    return str(a), str(b)


def test_weights_order_and_stopping(two_sources):
    a, b = two_sources
    mixed = load_mixture([a, b], [3, 1], "first_exhausted", 0)["prompt"]
    assert mixed == load_mixture([a, b], [0.75, 0.25], "first_exhausted", 0)["prompt"]  # normalised, seeded
    assert mixed != load_mixture([a, b], [3, 1], "first_exhausted", 1)["prompt"]  # another seed, another draw
    from_a = [p for p in mixed if p.startswith("a")]
    from_b = [p for p in mixed if p.startswith("b")]
    assert from_a == [f"a{i}" for i in range(len(from_a))] and from_b == [f"b{i}" for i in range(20)]  # in order
    assert 0.6 < len(from_a) / len(mixed) < 0.9  # about 3:1 until b (20 rows) runs out
    whole = load_mixture([a, b], [3, 1], "all_exhausted", 0)["prompt"]
    assert {f"a{i}" for i in range(60)} | {f"b{i}" for i in range(20)} <= set(whole)  # b repeats until a is seen
    in_turn = load_mixture([a, b], [], "first_exhausted", 0)["prompt"]
    assert in_turn[:4] == ["a0", "b0", "a1", "b1"] and len(in_turn) == 40


def test_bad_mixtures_are_one_line(tmp_path, two_sources):
    a, b = two_sources
    other = write_jsonl(tmp_path / "c.jsonl", [{"text": "t"}])
    with pytest.raises(UserError, match=r"^data\.mixture\[1\] \(.*c\.jsonl\): columns \['text'\] differ from "
                                        r"data\.mixture\[0\]'s \['completion', 'prompt'\]; mix sources of one format$"):
        load_mixture([a, str(other)], [], "first_exhausted", 0)
    with pytest.raises(UserError, match=r"^config\.data\.mixture_weights: 1 weights for 2 data\.mixture sources$"):
        load_mixture([a, b], [1.0], "first_exhausted", 0)
    with pytest.raises(UserError, match=r"mixture_stopping must be first_exhausted or all_exhausted"):
        load_mixture([a, b], [], "oversample", 0)
    with pytest.raises(UserError, match=r"^data\.mixture\[1\] \(.*nope\.jsonl\)"):
        load_mixture([a, str(tmp_path / "nope.jsonl")], [], "first_exhausted", 0)
    c = base_config()
    c.data.train, c.data.mixture = a, [a, b]
    with pytest.raises(UserError, match=r"^set data\.train or data\.mixture, not both$"):
        pipeline.load_splits(c)


def _run(args, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "jaxsft.run", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def _losses(w: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (w / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_sft_on_a_mixture_resumes_exactly_after_a_crash(tmp_path):
    model = make_tiny_decoder(tmp_path / "m")
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(24, seed=2))
    common = ["--config", "configs/sft.py", f"--config.model.name_or_path={model}", f"--config.data.mixture={a},{b}",
              "--config.data.mixture_weights=0.6,0.4", "--config.max_steps=6", "--config.log_every_steps=1",
              "--config.checkpoint_every_steps=3", "--config.max_length=128", "--config.batch_size=4",
              "--config.dtype=float32", "--config.learning_rate=1e-2", "--config.warmup_steps=0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = _run([*common, "--workdir", whole])
    assert p.returncode == 0, p.stderr[-2000:]
    p = _run([*common, "--workdir", cut], {"JAXSFT_FAIL_AFTER_STEP": "3"})
    assert p.returncode != 0 and "injected failure after step 3" in p.stderr
    p = _run([*common, "--workdir", cut])
    assert p.returncode == 0 and "resuming from step 3" in p.stderr, p.stderr[-2000:]
    expected, resumed = _losses(whole), _losses(cut)
    assert sorted(expected) == list(range(1, 7)) and sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step
