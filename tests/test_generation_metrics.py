"""Generation metrics during SFT (decode.eval_samples, decode.eval_metrics): the scores against hand counts and the
reference libraries, bad metric names refused, and end to end: the run's evals carry eval_gen_* and write the
completions (W/generations/step_N.jsonl, TensorBoard text), and jaxsft.evaluate of the checkpoint gives the same."""

from __future__ import annotations

import json
from types import SimpleNamespace

import ml_collections
import pytest
from conftest import alpaca_rows, make_tiny_decoder, write_jsonl
from test_sft import cli, last_json

from jaxsft import config as config_lib
from jaxsft.defaults import base_config
from jaxsft.errors import UserError
from jaxsft.tasks import causal_lm


def _config(metrics, fmt=None, samples=3):
    c = base_config()
    c.task = "causal_lm"
    c.data.format = fmt
    c.decode.eval_samples = samples
    c.decode.eval_metrics = metrics
    return c


def test_scores_equal_hand_counts_and_the_reference_libraries():
    from sacrebleu.metrics import BLEU, CHRF

    hyps = ["the cat sat", " blue ", "one two three four"]
    refs = ["the cat sat down", "blue", "four three two one"]
    feats = SimpleNamespace(references=refs + ["never decoded"], prompts=["a", "b", "c", "d"])
    m = causal_lm.generation_metrics(hyps, feats, _config(["exact_match", "rouge_l", "bleu", "chrf"]))
    assert m["eval_gen_samples"] == 3
    assert m["eval_gen_exact_match"] == pytest.approx(100 / 3)  # " blue " == "blue" once stripped
    # ROUGE-L F1 by hand: LCS 3 of 3 / 4 → F 6/7; 1; LCS 1 of 4 / 4 → 1/4
    assert m["eval_gen_rouge_l"] == pytest.approx(100 * (6 / 7 + 1 + 1 / 4) / 3)
    assert m["eval_gen_bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs[:3]]).score)
    assert m["eval_gen_chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs[:3]]).score)
    only = causal_lm.generation_metrics(hyps, feats, _config(["exact_match"]))
    assert set(only) == {"eval_gen_samples", "eval_gen_exact_match"}


def test_which_prompts_are_decoded():
    feats = SimpleNamespace(prompts=list("abcdef"), references=list("ABCDEF"))
    assert causal_lm.generation_prompts(feats, _config([], samples=2)) == ["a", "b"]
    assert causal_lm.generation_prompts(feats, _config([], samples=-1)) == list("abcdef")
    assert causal_lm.generation_prompts(feats, _config([], fmt="translation", samples=0)) == list("abcdef")
    assert not causal_lm.eval_generates(_config([], samples=0)) and causal_lm.eval_generates(_config([], samples=2))
    rows = causal_lm.generation_rows(["x", "y"], feats, _config([]))
    assert rows == [{"index": 0, "prompt": "a", "reference": "A", "completion": "x"},
                    {"index": 1, "prompt": "b", "reference": "B", "completion": "y"}]


def test_unknown_metric_is_one_line():
    c = _config(["exact_match", "meteor"])
    with pytest.raises(UserError, match=r"config\.decode\.eval_metrics: unknown metric 'meteor' \(one of exact_match"):
        config_lib.check_values(c)
    assert isinstance(c, ml_collections.ConfigDict)


@pytest.mark.slow
def test_sft_run_scores_and_writes_generations_and_evaluate_agrees(tmp_path):
    model = make_tiny_decoder(tmp_path / "m")
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(48))
    evals = write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(8, seed=5))
    w = tmp_path / "w"
    cli("run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={train}", f"--config.data.eval={evals}", "--config.max_steps=6",
        "--config.eval_every_steps=3", "--config.max_length=128", "--config.batch_size=4", "--config.dtype=float32",
        "--config.learning_rate=1e-2", "--config.warmup_steps=0", "--config.decode.eval_samples=5",
        "--config.decode.max_new_tokens=6", "--config.decode.eval_metrics=exact_match,rouge_l,chrf")
    rows = [json.loads(ln) for ln in (w / "metrics.jsonl").read_text().splitlines()]
    evals_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals_rows] == [3, 6]
    for r in evals_rows:
        assert r["eval_gen_samples"] == 5 and {"eval_gen_exact_match", "eval_gen_rouge_l", "eval_gen_chrf"} <= set(r)
        assert 0 <= r["eval_gen_rouge_l"] <= 100
    gens = [json.loads(ln) for ln in (w / "generations" / "step_6.jsonl").read_text().splitlines()]
    assert len(gens) == 5 and [g["index"] for g in gens] == list(range(5))
    assert all(g["prompt"] and g["reference"] and isinstance(g["completion"], str) for g in gens)
    assert (w / "generations" / "step_3.jsonl").is_file()
    events = b"".join(p.read_bytes() for p in (w / "tensorboard").glob("events.*"))
    assert b"eval_generations" in events and b"eval_gen_rouge_l" in events
    # the same checkpoint scored by jaxsft.evaluate gives the same generation metrics
    out = last_json(cli("evaluate", "--workdir", w).stdout)
    for k in ("eval_gen_exact_match", "eval_gen_rouge_l", "eval_gen_chrf"):
        assert out[k] == pytest.approx(evals_rows[-1][k], abs=1e-6), k
