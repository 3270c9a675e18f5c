"""benchmarks/profile_kernels.py: a GPU trace's kernels summed per kernel and per kind (read from an XSpace built
here, as jax.profiler writes them on a GPU: stream lines hold the kernels, derived `XLA Ops` lines repeat them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

profiler = pytest.importorskip("jax.profiler")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_kernels  # noqa: E402

TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(Compute)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 6000000000 stats { metadata_id: 10 str_value: "scatter.7" } }
    events { metadata_id: 2 offset_ps: 6000000000 duration_ps: 1000000000 }
    events { metadata_id: 2 offset_ps: 7000000000 duration_ps: 1000000000 } }
  lines { id: 2 name: "Stream #14(Compute)"
    events { metadata_id: 3 offset_ps: 0 duration_ps: 2000000000 } }
  lines { id: 3 name: "XLA Ops" events { metadata_id: 1 offset_ps: 0 duration_ps: 6000000000 } }
  event_metadata { key: 1 value { id: 1 name: "input_scatter_fusion" } }
  event_metadata { key: 2 value { id: 2 name: "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT" } }
  event_metadata { key: 3 value { id: 3 name: "cudnn_generated_fort_native_sdpa_sm90" } }
  stat_metadata { key: 10 value { id: 10 name: "hlo_op" } }
}
planes { id: 2 name: "/host:CPU" lines { id: 1 name: "python" events { metadata_id: 1 duration_ps: 9000000000 } }
  event_metadata { key: 1 value { id: 1 name: "host work" } } }
"""


def trace():
    data = profiler.ProfileData
    return data.from_serialized_xspace(data.text_proto_to_serialized_xspace(TRACE))


def test_kernels_are_summed_over_streams_without_the_derived_lines_or_the_host():
    rows = profile_kernels.kernel_times(trace())
    assert set(rows) == {"input_scatter_fusion", "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT",
                         "cudnn_generated_fort_native_sdpa_sm90"}
    assert rows["input_scatter_fusion"] == {"ns": 6e6, "calls": 1, "hlo_op": "scatter.7"}
    assert rows["nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT"]["calls"] == 2


def test_summary_is_per_step_and_by_kind():
    text = profile_kernels.summary(trace(), steps=2)
    assert text.startswith("GPU kernel time 5.00 ms per step over 2 step(s), 2 kernels per step")
    kinds = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and " ms " in ln and "%" in ln}
    assert "3.00 ms   60.0%" in kinds["XLA"]  # the scatter fusion: 6 ms over 2 steps, 60% of 10 ms
    assert "1.00 ms   20.0%" in kinds["matmul"] and "1.00 ms   20.0%" in kinds["attention"]
    assert "input_scatter_fusion" in text.split("top")[1].splitlines()[1]  # the largest kernel first
