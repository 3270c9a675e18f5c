#!/usr/bin/env bash
# Creates a TPU VM (gcloud compute tpus tpu-vm create) or, with --queued, a queued resource that Google Cloud
# grants when capacity frees up (gcloud compute tpus queued-resources create); --wait polls until it is ACTIVE.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE [options] [-- EXTRA_GCLOUD_FLAGS ...]

Creates a TPU VM, or with --queued a queued resource whose node is NAME.

Options:
  --accelerator-type TYPE  e.g. v5litepod-16 (v5e), v5p-32, v6e-8, v4-8 (required)
  --runtime-version V      TPU software version (default from TYPE: v5litepod-* v2-alpha-tpuv5-lite,
                           v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e, v2/v3/v4-* tpu-ubuntu2204-base)
  --spot                   Spot capacity: cheaper, can be preempted at any time
  --preemptible            legacy preemptible TPU VM (not with --queued; use --spot)
  --queued                 create a queued resource instead of a TPU VM
  --queued-resource-id ID  the queued resource's id (default: NAME)
  --reserved               queued resource from your reservation
  --valid-until-duration D give up on a queued resource not granted within D (e.g. 6h)
  --wait                   with --queued: poll until the resource is ACTIVE (fails if FAILED or SUSPENDED)
$COMMON_HELP

After --, flags are passed to gcloud as they are (e.g. -- --network=my-net --labels=team=nlp).

Example:
  $PROG --name sft-v5e --zone us-west4-a --accelerator-type v5litepod-16 --spot --queued --wait
EOF
}

ACCELERATOR_TYPE=""
RUNTIME_VERSION=""
SPOT=0
PREEMPTIBLE=0
QUEUED=0
QUEUED_ID=""
RESERVED=0
VALID_UNTIL=""
WAIT=0
EXTRA=()
handle_arg() {  # this script's own options, for parse_args (common.sh): NSHIFT = the words taken
  case $1 in
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; NSHIFT=2 ;;
    --runtime-version | --version) need_value "$@"; RUNTIME_VERSION=$2; NSHIFT=2 ;;
    --spot) SPOT=1; NSHIFT=1 ;;
    --preemptible) PREEMPTIBLE=1; NSHIFT=1 ;;
    --queued) QUEUED=1; NSHIFT=1 ;;
    --queued-resource-id) need_value "$@"; QUEUED_ID=$2; NSHIFT=2 ;;
    --reserved) RESERVED=1; NSHIFT=1 ;;
    --valid-until-duration) need_value "$@"; VALID_UNTIL=$2; NSHIFT=2 ;;
    --wait) WAIT=1; NSHIFT=1 ;;
    --) NSHIFT=$#; shift; EXTRA=("$@") ;;
  esac
}
parse_args handle_arg "$@"

require_location
require "$ACCELERATOR_TYPE" --accelerator-type
if [ -z "$RUNTIME_VERSION" ]; then
  case $ACCELERATOR_TYPE in
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$ACCELERATOR_TYPE': pass --runtime-version" ;;
  esac
fi
if [ "$SPOT" = 1 ] && [ "$PREEMPTIBLE" = 1 ]; then die "--spot and --preemptible exclude each other"; fi
if [ "$QUEUED" = 0 ]; then
  for flag in "$QUEUED_ID:--queued-resource-id" "$RESERVED:--reserved" "$VALID_UNTIL:--valid-until-duration" \
    "$WAIT:--wait"; do
    case ${flag%%:*} in "" | 0) ;; *) die "${flag#*:} needs --queued" ;; esac
  done
fi

if [ "$QUEUED" = 0 ]; then
  cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
    "--version=$RUNTIME_VERSION")
  if [ "$SPOT" = 1 ]; then cmd+=(--spot); fi
  if [ "$PREEMPTIBLE" = 1 ]; then cmd+=(--preemptible); fi
  run "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  exit 0
fi

[ "$PREEMPTIBLE" = 0 ] || die "--preemptible is not for queued resources: use --spot"
if [ "$SPOT" = 1 ] && [ "$RESERVED" = 1 ]; then die "--spot and --reserved exclude each other"; fi
QUEUED_ID=${QUEUED_ID:-$NAME}
cmd=(gcloud compute tpus queued-resources create "$QUEUED_ID" "--node-id=$NAME" "${LOCATION[@]}"
  "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION")
if [ "$SPOT" = 1 ]; then cmd+=(--spot); fi
if [ "$RESERVED" = 1 ]; then cmd+=(--reserved); fi
if [ -n "$VALID_UNTIL" ]; then cmd+=("--valid-until-duration=$VALID_UNTIL"); fi
run "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
[ "$WAIT" = 1 ] || exit 0

describe=(gcloud compute tpus queued-resources describe "$QUEUED_ID" "${LOCATION[@]}" "--format=value(state.state)")
if [ "$DRY_RUN" = 1 ]; then
  run "${describe[@]}"
  echo "# (repeated every ${TPU_POLL_SECONDS:-30}s until the state is ACTIVE)"
  exit 0
fi
while :; do
  state=$(run "${describe[@]}")
  note "queued resource $QUEUED_ID: ${state:-unknown}"
  case $state in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDED) echo "$PROG: error: queued resource $QUEUED_ID is $state" >&2; exit 1 ;;
  esac
  sleep "${TPU_POLL_SECONDS:-30}"
done
