"""Where a GPU step's time goes: the kernels of a jax.profiler trace, summed per kernel and per kind.

COMMAND:  python benchmarks/profile_kernels.py TRACE_DIR_OR_XPLANE_PB [--steps N] [--top 30]

Reads the device planes (`/device:GPU:*`) of an `*.xplane.pb` that `jax.profiler.trace` wrote (throughput.py
--profile DIR writes one per case), sums each kernel's time over every stream, and prints the top kernels per
step (time, calls, share) and a breakdown by kind: matmul (cuBLAS / cuBLASLt / CUTLASS / nvjet), attention (cuDNN
fused attention), XLA fusions (elementwise, reductions, layer norms, dropout masks: what XLA generated), copies
and memsets, other. The XLA op name (`hlo_op`) is shown where the trace records it. Works with jax's own
`jax.profiler.ProfileData` (no TensorBoard plugin needed).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

KINDS = (  # (kind, pattern over the kernel's name), first match wins
    ("attention (cuDNN)", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|sm\d+_.*_tn|cublas|ampere_|hopper_|matmul", re.I)),
    ("copy / memset", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction", re.compile(r"reduc", re.I)),
    ("XLA fusion", re.compile(r"fusion|loop_|input_|wrapped_|concatenate|transpose|broadcast|convert", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def xplane_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise SystemExit(f"profile_kernels: no *.xplane.pb under {p}")
        return found[-1]
    return p


def kernel_times(source) -> dict[str, dict]:
    """{kernel name: {"ns": total, "calls": n, "hlo_op": name or ""}} over the GPU planes' stream lines of a trace
    (a path, or a jax.profiler.ProfileData)."""
    from jax.profiler import ProfileData

    data = source if isinstance(source, ProfileData) else ProfileData.from_file(str(xplane_file(source)))
    out: dict[str, dict] = defaultdict(lambda: {"ns": 0.0, "calls": 0, "hlo_op": ""})
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("XLA") or line.name in ("Steps", "Framework Ops", "Framework Name Scope"):
                continue  # derived lines repeat the kernels' time
            for e in line.events:
                stats = dict(e.stats)
                row = out[e.name]
                row["ns"] += e.duration_ns
                row["calls"] += 1
                row["hlo_op"] = row["hlo_op"] or str(stats.get("hlo_op", "") or "")
    return dict(out)


def summary(source, steps: int = 1, top: int = 30) -> str:
    rows = kernel_times(source)
    if not rows:
        return "no GPU kernels in the trace (not a GPU trace?)"
    total = sum(r["ns"] for r in rows.values())
    lines = [f"GPU kernel time {total / 1e6 / steps:.2f} ms per step over {steps} step(s), "
             f"{sum(r['calls'] for r in rows.values()) / steps:.0f} kernels per step", "", "by kind:"]
    kinds: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for name, r in rows.items():
        k = kinds[kind_of(name)]
        k[0] += r["ns"]
        k[1] += r["calls"]
    for kind, (ns, calls) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {kind:<20} {ns / 1e6 / steps:9.2f} ms  {100 * ns / total:5.1f}%  {calls / steps:6.0f} calls")
    lines += ["", f"top {top} kernels (ms per step, calls per step, share, kind, XLA op):"]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["ns"])[:top]:
        lines.append(f"  {r['ns'] / 1e6 / steps:8.3f} ms {r['calls'] / steps:5.0f}x {100 * r['ns'] / total:5.1f}%  "
                     f"{kind_of(name):<18} {name[:90]}  {r['hlo_op'][:40]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", help="a folder jax.profiler.trace wrote, or an .xplane.pb file")
    ap.add_argument("--steps", type=int, default=1, help="steps the trace holds (figures are per step)")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args(argv)
    print(summary(a.trace, a.steps, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
