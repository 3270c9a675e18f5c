#!/usr/bin/env bash
# Stops a run on every worker: writes STOP (so relaunch_loop.sh does not rerun) and sends one SIGTERM to the
# jaxsft process; jaxsft finishes its step, writes a checkpoint and exits 75. launch.sh again resumes the run.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--wait] [options]

Sends SIGTERM to jaxsft on all workers at once; each writes a checkpoint and exits 75, and the relaunch loop
does not rerun it. Rerun launch.sh with the same arguments to resume. Do not stop twice in a row: a second
signal makes jaxsft exit at once, without a checkpoint.

Options:
  --wait             wait until the run has ended on every worker, then print each exit code
  --timeout SECONDS  with --wait: give up after this long (default 900)
  --log-dir DIR      as given to launch.sh, relative to the home dir (default: jaxsft_logs)
$COMMON_HELP

Example:
  $PROG --name sft-v5e --zone us-west4-a --wait
EOF
}

WAIT=0
TIMEOUT=900
LOG_DIR=jaxsft_logs
handle_arg() {  # this script's own options, for parse_args (common.sh): NSHIFT = the words taken
  case $1 in
    --wait) WAIT=1; NSHIFT=1 ;;
    --timeout) need_value "$@"; need_int "$@"; TIMEOUT=$2; NSHIFT=2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; NSHIFT=2 ;;
  esac
}
parse_args handle_arg "$@"

require_location

# shellcheck disable=SC2016  # expanded on the workers
steps=("$REMOTE_HOST" "LOG=$(remote_path "$LOG_DIR")" "$REMOTE_ALIVE"
  'if ! alive "$LOG/relaunch.pid" && ! alive "$LOG/jaxsft.pid"; then echo "$h: no run going"; exit 0; fi'
  'touch "$LOG/STOP"'
  'if alive "$LOG/jaxsft.pid"; then kill -TERM "$(cat "$LOG/jaxsft.pid")" && echo "$h: sent SIGTERM to jaxsft (pid $(cat "$LOG/jaxsft.pid")): it checkpoints and exits 75"; else echo "$h: between attempts: the relaunch loop ends without a rerun"; fi')
if [ "$WAIT" = 1 ]; then
  # shellcheck disable=SC2016
  steps+=("t=0; while alive \"\$LOG/relaunch.pid\" && [ \$t -lt $TIMEOUT ]; do sleep 1; t=\$((t + 1)); done"
    'if alive "$LOG/relaunch.pid"; then echo "$h: still running after '"$TIMEOUT"' s" >&2; exit 1; fi'
    'echo "$h: ended with exit code $(cat "$LOG/exit_code" 2>/dev/null || echo unknown)"')
fi
remote=""
for s in "${steps[@]}"; do remote="$remote${remote:+; }$s"; done
tpu_ssh all "$remote"
