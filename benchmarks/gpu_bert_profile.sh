#!/usr/bin/env bash
# Why BERT-base trains slower than PyTorch on the GPU: one device call that times the bert cases with one change at
# a time, beside the PyTorch peer in the same call, and profiles the GPU kernels of each jaxsft variant.
#
# Here first, once:   bash benchmarks/prepare_gpu_wheels.sh     (.whl/ and .peer/, git-ignored, travel with carry)
# Then:   run(command="bash benchmarks/gpu_bert_profile.sh", carry=[".whl", ".peer"], timeout_s=480)
#
# Steps (each under its own timeout; results in ${OUT:-/tmp/gpu_bert}):
#   1. the wheels into /tmp/site
#   2. the peer: .peer/gpu_baseline.py's torch_bert (HF BertForSequenceClassification, SDPA, bf16 autocast, fused
#      AdamW, dropout on) at batch 256 and 32, seq 128                                          peer.txt
#   3. benchmarks/throughput.py --cases bert256 for each variant of BERT_VARIANTS below, with --profile: the GPU
#      kernels by time per step (benchmarks/profile_kernels.py)          table.txt; detail.tgz (logs, JSON, kernels)
#   4. the optimised HLO of the default train step (XLA's dump), hlo.tgz
# Environment: BERT_VARIANTS (space-separated names of the variants below), BERT_CASE (default bert256).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bert}
D=/tmp/gpu_bert_detail  # per-variant logs, JSON and kernel tables: packed into $OUT/detail.tgz (8 files come back)
mkdir -p "$OUT" "$D"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/table.txt"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  timeout -k 5 30 python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { say "installing .whl failed"; exit 1; }
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
CASE=${BERT_CASE:-bert256}
BATCH=${CASE#bert}

say "peer: HF BERT-base (SDPA, bf16 autocast, dropout on), batch $BATCH and 32, seq 128"
timeout -k 5 90 python3 - "$BATCH" <<'PY' 2>&1 | tee "$OUT/peer.txt"
import json, sys
sys.path.insert(0, ".peer")
import gpu_baseline as g
for b in dict.fromkeys((int(sys.argv[1]), 32)):
    print(json.dumps({f"torch_bert_b{b}": g.torch_bert(g.BERT_BASE, b, 128, 20, "cuda")}), flush=True)
PY

declare -A SETS=(
  [default]=""
  [no_attn_dropout]="--hf attention_probs_dropout_prob=0.0"
  [no_dropout]="--hf attention_probs_dropout_prob=0.0 --hf hidden_dropout_prob=0.0"
  [xla_no_dropout]="--hf attention_probs_dropout_prob=0.0 --hf hidden_dropout_prob=0.0 --set model.attention=xla"
  [rbg]="ENV:JAX_DEFAULT_PRNG_IMPL=rbg"
)
for v in ${BERT_VARIANTS:-default no_attn_dropout no_dropout xla_no_dropout}; do
  args=${SETS[$v]}
  envs=()
  if [[ $args == ENV:* ]]; then envs=("${args#ENV:}"); args=""; fi
  if [ "$v" = default ]; then
    envs+=("XLA_FLAGS=--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train.*")
  fi
  say "jaxsft $CASE, variant $v: $args ${envs[*]:-}"
  # shellcheck disable=SC2086
  env "${envs[@]}" timeout -k 5 150 python3 benchmarks/throughput.py --cases "$CASE" --no-isolate --ceiling-n 4096 \
      --json "$D/$v.json" --profile "/tmp/prof_$v" $args > "$D/$v.log" 2>&1
  say "  exit $?: $(grep -E "^$CASE " "$D/$v.log" | head -1)"
  cp "/tmp/prof_$v/${CASE}_kernels.txt" "$D/kernels_$v.txt" 2>/dev/null && head -12 "$D/kernels_$v.txt" | tee -a "$OUT/table.txt"
  tar czf "$OUT/detail.tgz" -C "$D" .
done
if [ -d /tmp/hlo ]; then
  tar czf "$OUT/hlo.tgz" -C /tmp/hlo $(cd /tmp/hlo && ls | grep -E 'after_optimizations.txt$|buffer-assignment' | head -20) 2>/dev/null
fi
cat "$D"/*.log | grep -E "^$CASE |^matmul ceiling" | tee -a "$OUT/table.txt"
say "done"
