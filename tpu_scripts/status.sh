#!/usr/bin/env bash
# Shows the TPU VM's state (or the queued resource's), then on every worker whether the run is going or how it
# ended, with the log's last line.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

Describes the TPU VM (state READY, PREEMPTED, ...), then asks every worker about the run: running, or ended
with its exit code (0 finished, 75 stopped with a checkpoint: launch again to resume, 2 bad input, 1 failed).

Options:
  --queued                 describe the queued resource too (WAITING_FOR_RESOURCES, ACTIVE, ...)
  --queued-resource-id ID  the queued resource's id (default: NAME)
  --no-workers             only describe; do not ssh to the workers
  --log-dir DIR            as given to launch.sh, relative to the home dir (default: jaxsft_logs)
$COMMON_HELP

Example:
  $PROG --name sft-v5e --zone us-west4-a --queued
EOF
}

QUEUED=0
QUEUED_ID=""
WORKERS=1
LOG_DIR=jaxsft_logs
handle_arg() {  # this script's own options, for parse_args (common.sh): NSHIFT = the words taken
  case $1 in
    --queued) QUEUED=1; NSHIFT=1 ;;
    --queued-resource-id) need_value "$@"; QUEUED_ID=$2; QUEUED=1; NSHIFT=2 ;;
    --no-workers) WORKERS=0; NSHIFT=1 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; NSHIFT=2 ;;
  esac
}
parse_args handle_arg "$@"

require_location

if [ "$QUEUED" = 1 ]; then
  run gcloud compute tpus queued-resources describe "${QUEUED_ID:-$NAME}" "${LOCATION[@]}" \
    "--format=table(name.basename(),state.state)"
fi
if ! run gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" \
  "--format=table(name.basename(),acceleratorType,state,health,runtimeVersion)"; then
  echo "$PROG: error: no TPU VM $NAME in $ZONE (not created yet, still queued, or deleted)" >&2
  exit 1
fi
[ "$WORKERS" = 1 ] || exit 0

# shellcheck disable=SC2016  # expanded on the workers
steps=("$REMOTE_HOST" "LOG=$(remote_path "$LOG_DIR")" "$REMOTE_ALIVE"
  'if alive "$LOG/jaxsft.pid"; then s="running (jaxsft pid $(cat "$LOG/jaxsft.pid"))"; elif alive "$LOG/relaunch.pid"; then s="between attempts (relaunch loop pid $(cat "$LOG/relaunch.pid"))"; elif [ -f "$LOG/exit_code" ]; then c=$(cat "$LOG/exit_code"); case $c in 0) m="finished";; 75) m="stopped with a checkpoint: launch again to resume";; 2) m="bad input: see the log";; 1) m="failed: see the log";; *) m="see the log";; esac; s="ended: exit $c, $m"; else s="no run launched"; fi'
  'echo "$h: $s"'
  'if [ -f "$LOG/$h.log" ]; then echo "$h:   $(tail -n 1 "$LOG/$h.log")"; fi')
remote=""
for s in "${steps[@]}"; do remote="$remote${remote:+; }$s"; done
tpu_ssh all "$remote"
