#!/usr/bin/env bash
# Deletes the TPU VM, or with --queued the queued resource together with its TPU VM. The workdir on gs:// stays.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--queued] [--yes] [options]

Deletes the TPU VM (its disks and logs with it); checkpoints on gs:// are kept. stop.sh --wait first to keep
the progress since the last checkpoint.

Options:
  --queued                 delete the queued resource and its TPU VM (queued-resources delete --force)
  --queued-resource-id ID  the queued resource's id (default: NAME)
  --yes                    do not ask for confirmation (gcloud --quiet)
  --async                  return without waiting for the deletion to finish
$COMMON_HELP

Example:
  $PROG --name sft-v5e --zone us-west4-a --queued --yes
EOF
}

QUEUED=0
QUEUED_ID=""
YES=0
ASYNC=0
handle_arg() {  # this script's own options, for parse_args (common.sh): NSHIFT = the words taken
  case $1 in
    --queued) QUEUED=1; NSHIFT=1 ;;
    --queued-resource-id) need_value "$@"; QUEUED_ID=$2; QUEUED=1; NSHIFT=2 ;;
    --yes | -y) YES=1; NSHIFT=1 ;;
    --async) ASYNC=1; NSHIFT=1 ;;
  esac
}
parse_args handle_arg "$@"

require_location

if [ "$QUEUED" = 1 ]; then
  cmd=(gcloud compute tpus queued-resources delete "${QUEUED_ID:-$NAME}" "${LOCATION[@]}" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}")
fi
if [ "$YES" = 1 ]; then cmd+=(--quiet); fi
if [ "$ASYNC" = 1 ]; then cmd+=(--async); fi
run "${cmd[@]}"
