"""benchmarks/throughput.py --tiny: jaxsft's real train step at small shapes prints the table and writes the JSON."""

from __future__ import annotations

import json
import sys

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


def test_tiny_packed_case_reports_positive_figures(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert throughput.main(["--tiny", "--cases", "llama_packed", "--steps", "2", "--ceiling-n", "256", "--json",
                            str(out)]) == 0
    r = _check(out, capsys, ["llama_packed"])["results"][0]
    assert 0.5 < r["useful_share"] <= 1.0 and r["settings"]["model.scan_layers"] is True


@pytest.mark.slow
def test_tiny_full_table(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert throughput.main(["--tiny", "--json", str(out)]) == 0
    _check(out, capsys, list(throughput.CASES))
