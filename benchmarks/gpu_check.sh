#!/usr/bin/env bash
# Device check for issue 6 "Speed on the accelerator", in ONE call of the device tool (kind nvidia-h200).
#
# Here first (PyPI access), once:   bash benchmarks/prepare_gpu_wheels.sh
#   (.whl/: the wheels of benchmarks/gpu_wheels.txt, what the benchmark imports and the GPU image lacks;
#    .peer/: a copy of ../shared/perf, the PyTorch peer. Both are git-ignored and travel with `carry`.)
# Then:   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".peer"], timeout_s=590)
#
# Steps, each under its own `timeout` (they add up to at most 545 s with the kill grace, so the whole fits a
# 590 s call); the logs and tables land in ${OUT:-/tmp/gpu_check} (at most 8 files, what the device tool returns):
#   1. installs .whl/*.whl into /tmp/site (pip --no-index; nothing else is installed)      20 s  summary.txt
#   2. benchmarks/gpu_e2e.py: every task's CLIs on tiny random checkpoints in bf16 / fp16 (run with evaluation,
#      evaluate, generate; BERT, RoBERTa, Marian, T5, Llama side by side), eval losses against float32's   170 s  e2e.txt
#   3. versions, devices, jaxsft's cuDNN packed attention against the dense mask
#      (fwd + bwd, bf16, 8 x 2048, GQA 32/8 x 64; error and time)                           50 s  check.txt
#   4. the PyTorch peer, .peer/gpu_baseline.py --only fast (no torch.compile), FIRST, so a
#      table cut short still has its comparison                                             70 s  peer.txt, baseline.json
#   5. benchmarks/throughput.py, the table (GPU_CHECK_CASES, default all five cases), each case
#      in its own process, bounded by --budget 180; beside the peer's figures              205 s  throughput.txt/.json/.log
# If the packed path fails or is inexact, the table runs with JAXSFT_PACKED_ATTENTION=0 (the dense-mask cuDNN path).
# Exit status: throughput.py's (0 when every case ran) or else gpu_e2e.py's, or 2 when .whl is missing, 1 when
# installing it failed.
#
# Options: --tiny   CPU smoke test of this script (small shapes everywhere; not a measurement)
#          -h, --help
# Environment: OUT (results folder), GPU_CHECK_CASES (comma-separated throughput.py cases, e.g. bert32,bert256
# for a second call when the first ran out of budget).
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=()
case "${1:-}" in
  -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
  --tiny) TINY=(--tiny) ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--tiny] [-h|--help]" >&2; exit 2 ;;
esac

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/summary.txt"; }

# ---- 1. the wheels ---------------------------------------------------------------------------------------------
if ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_check.sh: no wheels in .whl/: run benchmarks/prepare_gpu_wheels.sh first (on a machine with PyPI" \
       "access), then name .whl in the device call's carry" | tee -a "$OUT/summary.txt" >&2
  exit 2
fi
if [ ${#TINY[@]} -gt 0 ]; then  # the wheels are built for the image's Python 3.12; a smoke test uses this environment
  elapsed "--tiny: .whl/ not installed (this environment's packages are used)"
else
  elapsed "installing $(printf '%s ' .whl/*.whl)into /tmp/site"
  if ! timeout -k 5 20 python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    elapsed "installing .whl/*.whl failed"
    exit 1
  fi
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# ---- 2. the CLIs end to end in half precision ------------------------------------------------------------------
rc_e2e=0
if [ -d .peer/tokenizer ] && [ ${#TINY[@]} -eq 0 ]; then
  elapsed "end to end: gpu_e2e.py (classify bert/roberta, translate marian/t5, sft llama; bf16/fp16 vs float32)"
  timeout -k 5 170 python3 benchmarks/gpu_e2e.py --tokenizer .peer/tokenizer --budget 160 \
      --step-timeout 80 2>&1 | tee "$OUT/e2e.txt" || rc_e2e=$?
  elapsed "end to end done (exit $rc_e2e)"
else
  elapsed "no .peer/tokenizer (or --tiny): end-to-end step skipped"
fi

# ---- 3. versions and the packed attention check ----------------------------------------------------------------
elapsed "versions + packed attention: cuDNN packed path vs dense mask (fwd + bwd, bf16, GQA 32/8 x 64)"
rc_check=0
GPU_CHECK_TINY=${#TINY[@]} timeout -k 5 50 python3 - <<'PY' 2>&1 | tee "$OUT/check.txt" || rc_check=$?
import importlib, os, sys, time
for m in ("jax", "jaxlib", "flax", "optax", "ml_collections", "transformers", "numpy", "orbax.checkpoint", "torch"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), os.path.dirname(getattr(mod, "__file__", None) or "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__, e)
import jax, jax.numpy as jnp, numpy as np
print("python", sys.version.split()[0], "| devices", jax.devices())
from jaxsft.models import layers
print("cudnn packed kernel importable:", layers._cudnn_packed() is not None, "| used:", layers.use_packed_attention())
tiny = os.environ.get("GPU_CHECK_TINY") == "1"
B, T, N, K, H = (2, 256, 4, 2, 16) if tiny else (8, 2048, 32, 8, 64)
rng = np.random.default_rng(0)
seg = np.zeros((B, T), np.int32)
for b in range(B):  # 5-7 segments, then padding
    cuts = np.sort(rng.choice(np.arange(T // 32, T - T // 32), size=6, replace=False))
    for s, (lo, hi) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
        seg[b, lo:hi] = s + 1
seg = jnp.asarray(seg)
idx = jnp.arange(T)[None]
dense = layers.causal_mask(seg, seg, idx, idx)
packed = layers.packed_mask(seg, dense)
ks = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16)
do = jax.random.normal(ks[3], (B, T, N, H), jnp.bfloat16)
real = (seg > 0)[:, :, None, None]
def fb(m, impl):
    def f(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: layers.attention(q, k, v, m, implementation=impl), q, k, v)
        return o, vjp(do.astype(o.dtype))
    return jax.jit(f)
ref_o, ref_g = fb(dense, "xla")(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
print(f"shape B={B} T={T} heads {N}/{K} x {H}; fits", bool(packed.fits))
for name, m, impl in (("packed (PackedMask, cuDNN)", packed, None),
                      ("dense mask XLA (--tiny)" if tiny else "dense mask cuDNN", dense, "xla" if tiny else "cudnn")):
    try:
        f = fb(m, impl)
        o, g = jax.block_until_ready(f(q, k, v))
        t = time.perf_counter()
        for _ in range(20):
            out = f(q, k, v)
        jax.block_until_ready(out)
        ms = (time.perf_counter() - t) / 20 * 1e3
        err = lambda a, b: float(jnp.linalg.norm(jnp.where(real, a.astype(jnp.float32) - b, 0))
                                 / jnp.linalg.norm(jnp.where(real, b, 0)))
        errs = (err(o, ref_o), err(g[0], ref_g[0]), err(g[1], ref_g[1]), err(g[2], ref_g[2]))
        print(f"{name:<28} {ms:7.2f} ms  rel.err out {errs[0]:.2e}  dq {errs[1]:.2e}  dk {errs[2]:.2e}  "
              f"dv {errs[3]:.2e}")
        if impl is None and max(errs) < 2e-2:
            print("PACKED_OK")
    except Exception as e:  # noqa: BLE001
        print(f"{name:<28} failed: {type(e).__name__}: {str(e)[:300]}")
PY
elapsed "check done (exit $rc_check)"
if ! grep -q PACKED_OK "$OUT/check.txt"; then  # keep the table measurable: the dense-mask path
  export JAXSFT_PACKED_ATTENTION=0
  elapsed "cuDNN packed path failed or inexact: the table runs with JAXSFT_PACKED_ATTENTION=0"
fi

# ---- 4. the PyTorch peer, first ----------------------------------------------------------------------------------
rc_peer=0
PEER_ARGS=()
if [ -f .peer/gpu_baseline.py ]; then
  elapsed "peer: .peer/gpu_baseline.py --only fast (HF + PyTorch eager, no torch.compile)"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 70 python3 .peer/gpu_baseline.py --out "$OUT" --only fast \
      "${TINY[@]}" 2>&1 | tee "$OUT/peer.txt" || rc_peer=$?
  elapsed "peer done (exit $rc_peer)"
  PEER_ARGS=(--peer-results "$OUT" --peer-scripts gpu_baseline)
else
  elapsed "no .peer/gpu_baseline.py (prepare_gpu_wheels.sh copies ../shared/perf there): no peer"
fi

# ---- 5. the table ------------------------------------------------------------------------------------------------
CASES=${GPU_CHECK_CASES:-llama,llama_tuned,llama_packed,bert32,bert256}
elapsed "throughput table: $CASES"
rc_table=0
timeout -k 5 205 python3 benchmarks/throughput.py --json "$OUT/throughput.json" --cases "$CASES" --budget 180 \
    --case-timeout 150 "${PEER_ARGS[@]}" "${TINY[@]}" 2> "$OUT/throughput.log" | tee "$OUT/throughput.txt" \
    || rc_table=$?
elapsed "done: e2e exit $rc_e2e, check exit $rc_check, peer exit $rc_peer, table exit $rc_table (124: timed out)"
[ "$rc_table" -ne 0 ] && exit "$rc_table"
exit "$rc_e2e"
