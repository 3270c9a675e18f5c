#!/usr/bin/env bash
# Runs a jaxsft command until it is done; launch.sh starts it on every worker. Reruns the same command after
# exit 75 (stopped on a signal with a checkpoint written: the rerun resumes from --workdir) and, with --retries N,
# after exit 1 up to N times. Stops on 0 (finished), on 2 (bad input: a rerun would fail the same way) and on any
# other code. A SIGTERM/SIGINT to this loop, or a STOP file in the state dir (stop.sh writes one), ends it after
# the current attempt instead of rerunning: the loop never signals the command itself, so a signal sent to the
# whole process group (Ctrl-C, a VM shutting down) reaches jaxsft once, and a second signal (jaxsft: exit at once,
# no checkpoint) is never sent by this loop.
set -euo pipefail

PROG="tpu_scripts/relaunch_loop.sh"
usage() {
  cat <<EOF
Usage: $PROG [options] -- COMMAND [ARG ...]

Runs COMMAND (a jaxsft command) and reruns it while it exits 75 (stopped with a checkpoint; the rerun resumes),
or exits 1 and --retries allow; stops on 0, on 2 (bad input, never retried) and on any other exit code. Exits
with the last attempt's code. A SIGTERM/SIGINT to the loop or a STOP file in --state-dir: no rerun.

Options:
  --state-dir DIR     relaunch.pid, jaxsft.pid (the running command), exit_code, STOP (default: .)
  --retries N         reruns after exit 1 (default 0)
  --max-restarts N    reruns after exit 75; 0 = no limit (default 100)
  --delay SECONDS     pause before a rerun (default 10)
  --dry-run           print the command and the policy, run nothing
  -h, --help          this help

Example (what launch.sh runs on each worker, detached with setsid nohup):
  bash tpu_scripts/relaunch_loop.sh --state-dir ~/jaxsft_logs -- \\
    python -m jaxsft.run --config configs/sft.py --workdir gs://bucket/run1 --multihost
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

say() {  # one timestamped line in the log, which is this loop's stdout
  echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname)] relaunch_loop: $*"
}

STATE_DIR=.
RETRIES=0
MAX_RESTARTS=100
DELAY=10
DRY_RUN=0
while [ $# -gt 0 ]; do
  case $1 in
    --state-dir | --retries | --max-restarts | --delay)
      if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi
      if [ "$1" != --state-dir ] && ! [[ $2 =~ ^[0-9]+$ ]]; then die "$1 must be a non-negative integer, got '$2'"; fi
      case $1 in
        --state-dir) STATE_DIR=$2 ;;
        --retries) RETRIES=$2 ;;
        --max-restarts) MAX_RESTARTS=$2 ;;
        --delay) DELAY=$2 ;;
      esac
      shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument: $1 (the command goes after --; see --help)" ;;
  esac
done
[ $# -gt 0 ] || die "a command is required after --; see --help"

if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "$@"
  echo
  echo "# rerun on 75 (up to $MAX_RESTARTS times, 0 = no limit), on 1 up to $RETRIES times; ${DELAY}s between"
  exit 0
fi

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
rm -f "$STATE_DIR/STOP" "$STATE_DIR/exit_code" "$STATE_DIR/jaxsft.pid"
echo $$ >"$STATE_DIR/relaunch.pid"
trap 'rm -f "$STATE_DIR/relaunch.pid" "$STATE_DIR/jaxsft.pid"' EXIT
STOPPING=0
trap 'STOPPING=1; say "got a signal: no rerun after this attempt"' TERM INT

stop_requested() {
  [ "$STOPPING" = 1 ] || [ -e "$STATE_DIR/STOP" ]
}

attempt=0
restarts=0
retries=0
while :; do
  attempt=$((attempt + 1))
  say "attempt $attempt: $*"
  rc=0
  # In the foreground (a background job would ignore SIGINT); the inner shell records the command's pid for
  # stop.sh, then becomes the command.
  bash -c 'echo $$ >"$0"; exec "$@"' "$STATE_DIR/jaxsft.pid" "$@" || rc=$?
  rm -f "$STATE_DIR/jaxsft.pid"
  case $rc in
    0) say "attempt $attempt exited 0: finished"; break ;;
    2) say "attempt $attempt exited 2: bad input (config, data, workdir); not retried"; break ;;
    75)
      if stop_requested; then say "attempt $attempt exited 75: stopped with a checkpoint; rerun launch.sh to resume"; break; fi
      if [ "$MAX_RESTARTS" -gt 0 ] && [ "$restarts" -ge "$MAX_RESTARTS" ]; then
        say "attempt $attempt exited 75: --max-restarts $MAX_RESTARTS reached"; break
      fi
      restarts=$((restarts + 1))
      say "attempt $attempt exited 75: stopped with a checkpoint; resuming" ;;
    1)
      if stop_requested || [ "$retries" -ge "$RETRIES" ]; then
        say "attempt $attempt exited 1: failed (retries used: $retries of $RETRIES)"; break
      fi
      retries=$((retries + 1))
      say "attempt $attempt exited 1: failed; retry $retries of $RETRIES" ;;
    *) say "attempt $attempt exited $rc: not retried"; break ;;
  esac
  if [ "$DELAY" -gt 0 ]; then
    sleep "$DELAY" &
    wait $! || kill $! 2>/dev/null || true  # a signal interrupts the wait at once
  fi
  if stop_requested; then say "stop requested: no rerun"; break; fi
done
echo "$rc" >"$STATE_DIR/exit_code"
exit "$rc"
