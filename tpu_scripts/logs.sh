#!/usr/bin/env bash
# Shows the training log of one worker (default 0) or of all of them, each line prefixed with the worker's
# hostname; --follow keeps streaming (Ctrl-C stops following, not training).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--worker W] [--lines N] [--follow] [options]

Prints the end of <log dir>/<hostname>.log, the log launch.sh writes on each worker.

Options:
  --worker W         a worker index (default 0) or all
  --lines N          lines to show from the end (default 50)
  -f, --follow       keep streaming new lines (tail -F)
  --log-dir DIR      as given to launch.sh, relative to the home dir (default: jaxsft_logs)
$COMMON_HELP

Example:
  $PROG --name sft-v5e --zone us-west4-a --worker all --follow
EOF
}

WORKER=0
LINES=50
FOLLOW=0
LOG_DIR=jaxsft_logs
handle_arg() {  # this script's own options, for parse_args (common.sh): NSHIFT = the words taken
  case $1 in
    --worker) need_value "$@"; WORKER=$2; NSHIFT=2 ;;
    --lines | -n) need_value "$@"; need_int "$@"; LINES=$2; NSHIFT=2 ;;
    --follow | -f) FOLLOW=1; NSHIFT=1 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; NSHIFT=2 ;;
  esac
}
parse_args handle_arg "$@"

require_location
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be 'all' or a worker index, got '$WORKER'"

tail_cmd="tail -n $LINES"
# shellcheck disable=SC2016  # expanded on the workers
missing='if [ ! -f "$f" ]; then echo "$h: no log at $f (not launched?)"; exit 0; fi; '
if [ "$FOLLOW" = 1 ]; then
  tail_cmd="$tail_cmd -F"
  missing=""  # tail -F waits for the log to appear
fi
remote="$REMOTE_HOST; f=$(remote_path "$LOG_DIR")/\$h.log; $missing$tail_cmd \"\$f\""
if [ "$WORKER" = all ]; then remote="$remote | sed -u \"s/^/\$h: /\""; fi
tpu_ssh "$WORKER" "$remote"
