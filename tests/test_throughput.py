"""benchmarks/throughput.py --tiny: jaxsft's real train step at small shapes prints the table and writes the JSON."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402

FIELDS = ("throughput", "tflops", "step_ms", "compile_s")


def _check(out, capsys, cases):
    text = capsys.readouterr().out
    assert "matmul ceiling" in text and "TFLOP/s" in text and "compile s" in text and "peak GiB" in text
    data = json.loads(out.read_text())
    assert data["tiny"] and data["matmul_ceiling_tflops"] > 0
    assert [r["case"] for r in data["results"]] == cases
    for r in data["results"]:
        assert "error" not in r, r
        assert r["case"] in text
        for k in FIELDS:
            assert r[k] > 0, (r["case"], k)
        assert "peak_mem_gib" in r and r["compilations"] == 1
    return data


@pytest.fixture
def synthetic_lengths(tmp_path, monkeypatch):
    """Synthetic [prompt, completion] token counts shaped like ../shared/perf/alpaca_demo_lengths.json (prompts
    12-157 tokens, completions 2-587) for llama_packed, so the tests need no ../shared (cases run in this process:
    --no-isolate)."""
    rng = np.random.default_rng(0)
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps([[int(rng.integers(12, 158)), int(rng.integers(2, 588))] for _ in range(300)]))
    monkeypatch.setattr(throughput, "LENGTHS", lengths)


def test_tiny_packed_case_reports_positive_figures(tmp_path, capsys, synthetic_lengths):
    out = tmp_path / "t.json"
    assert throughput.main(["--tiny", "--no-isolate", "--cases", "llama_packed", "--steps", "2", "--ceiling-n",
                            "256", "--json", str(out)]) == 0
    r = _check(out, capsys, ["llama_packed"])["results"][0]
    assert 0.5 < r["useful_share"] <= 1.0 and r["settings"]["model.scan_layers"] is True


@pytest.mark.slow
def test_tiny_full_table(tmp_path, capsys, synthetic_lengths):
    out = tmp_path / "t.json"
    assert throughput.main(["--tiny", "--no-isolate", "--json", str(out)]) == 0
    _check(out, capsys, list(throughput.CASES))


def test_flop_counts_equal_a_hand_count():
    """The FLOPs behind the TFLOP/s column, counted here by hand from the model numbers: 6 x matmul parameters per
    token (forward 2, backward 4) plus attention, causal (half of QK^T and AV: 6·L·heads·head_dim·n per token of an
    n-token segment) for Llama, bidirectional (12·L·hidden·seq per token) for BERT."""
    m = throughput.LLAMA_TINY
    assert (m["hidden_size"], m["num_hidden_layers"], m["num_attention_heads"], m["num_key_value_heads"],
            m["intermediate_size"], m["vocab_size"]) == (64, 2, 4, 2, 128, 1000)
    head_dim = 64 // 4  # 16; k and v have 2 heads of 16 = 32 columns
    q, k, v, o = 64 * 64, 64 * 32, 64 * 32, 64 * 64
    gate, up, down = 64 * 128, 64 * 128, 128 * 64
    per_layer = q + k + v + o + gate + up + down  # 4096 + 2048 + 2048 + 4096 + 3 * 8192 = 36864
    lm_head = 64 * 1000  # tied to the embedding, still a matmul (the embedding lookup is not)
    n_matmul = 2 * per_layer + lm_head
    assert n_matmul == 137728
    segments = [10, 30, 64]  # one packed row of three examples, and a second row
    tokens = 10 + 30 + 64
    attention = 6 * 2 * 4 * head_dim * (10 * 10 + 30 * 30 + 64 * 64)
    hand = 6 * n_matmul * tokens + attention
    assert hand == 85942272 + 3913728
    assert throughput.llama_flops(m, segments) == hand
    # Llama-3.2-1B: 1,235,814,400 parameters (its model card) less 33 RMSNorm vectors of 2048 (2 per layer + final)
    # are its matmul parameters, the tied LM head counted once.
    assert throughput.llama_matmul_params(throughput.LLAMA_1B) == 1235814400 - 33 * 2048

    b = throughput.BERT_TINY
    assert (b["hidden_size"], b["num_hidden_layers"], b["intermediate_size"]) == (64, 2, 128)
    per_layer = 4 * 64 * 64 + 2 * 64 * 128  # q, k, v, attention output; intermediate and output dense
    batch, seq = 4, 32
    per_token = 6 * 2 * per_layer + 12 * 2 * 64 * seq
    assert throughput.bert_flops(b, batch, seq) == per_token * batch * seq == 56623104
