# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts that source this file
# Sourced by the tpu_scripts: shared flags, quoting, and `run`, which prints a command instead of running it under
# --dry-run. Kept to bash 3.2 (macOS) features: users run these from their laptops.

set -euo pipefail

PROG="tpu_scripts/$(basename "$0")"
TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DRY_RUN=0
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
GCLOUD_FLAGS=()
UNKNOWN_HINT="see --help"  # the end of the unknown-argument error (parse_args)

COMMON_HELP="Common options (NAME/ZONE/PROJECT default to \$TPU_NAME, \$TPU_ZONE, \$TPU_PROJECT):
  --name NAME            TPU VM name (the node id of a queued resource)
  --zone ZONE            e.g. us-west4-a (v5e), us-east5-a (v5p)
  --project PROJECT      Google Cloud project (default: gcloud's configured project)
  --gcloud-flag FLAG     extra flag for every gcloud call, repeatable (e.g. --gcloud-flag=--internal-ip)
  --dry-run              print the commands instead of running them
  -h, --help             this help"

die() {  # one line on stderr, exit 2 (bad arguments, like argparse)
  echo "$PROG: error: $*" >&2
  exit 2
}

note() {  # progress on stderr, so that --dry-run's stdout holds only commands
  echo "$PROG: $*" >&2
}

need_value() {  # "$@" of the parser: the flag in $1 must have a value in $2 that is not another flag
  if [ $# -lt 2 ] || [ -z "$2" ] || [[ $2 == --* ]]; then die "$1 needs a value (see --help)"; fi
}

need_int() {  # flag value
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

require() {  # value flag [env var]: refuse to run without a required argument
  if [ -z "$1" ]; then
    if [ $# -ge 3 ]; then die "$2 is required (or set $3); see --help"; fi
    die "$2 is required; see --help"
  fi
}

split_equals() {  # --flag=value → --flag value, up to a `--` (what follows it is passed on untouched)
  ARGS=()
  local a passthrough=0
  for a in "$@"; do
    if [ "$passthrough" = 0 ] && [[ $a == --*=* ]]; then
      ARGS+=("${a%%=*}" "${a#*=}")
    else
      if [ "$a" = "--" ]; then passthrough=1; fi
      ARGS+=("$a")
    fi
  done
}

parse_common() {  # the shared flag at the front of "$@", if it is one: sets NSHIFT (0 when it is not)
  NSHIFT=2
  case $1 in
    --name) need_value "$@"; NAME=$2 ;;
    --zone) need_value "$@"; ZONE=$2 ;;
    --project) need_value "$@"; PROJECT=$2 ;;
    --gcloud-flag)
      if [ $# -lt 2 ] || [ -z "$2" ]; then die "--gcloud-flag needs a value (see --help)"; fi
      GCLOUD_FLAGS+=("$2") ;;
    --dry-run) DRY_RUN=1; NSHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) NSHIFT=0 ;;
  esac
}

parse_args() {  # handler "$@": parses the command line; a script calls it once with its own handler function
  # Splits --flag=value (split_equals), then takes each argument in turn: a shared flag (parse_common), else the
  # script's own, for which `handler "$@"` sees the arguments left and sets NSHIFT to how many it took (at a `--`
  # that it accepts: all of them); NSHIFT left at 0 means not one of its options: unknown argument, exit 2.
  # (NSHIFT, not the handler's exit status: `if handler` would turn off set -e inside the handler.)
  local handler=$1
  shift
  split_equals "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while [ $# -gt 0 ]; do
    parse_common "$@"
    if [ "$NSHIFT" = 0 ]; then
      "$handler" "$@"
      if [ "$NSHIFT" = 0 ]; then die "unknown argument: $1 ($UNKNOWN_HINT)"; fi
    fi
    shift "$NSHIFT"
  done
}

require_location() {  # after parsing: NAME and ZONE are needed by every gcloud call; sets LOCATION
  require "$NAME" --name TPU_NAME
  require "$ZONE" --zone TPU_ZONE
  LOCATION=("--zone=$ZONE")
  if [ -n "$PROJECT" ]; then LOCATION+=("--project=$PROJECT"); fi
  LOCATION+=(${GCLOUD_FLAGS[@]+"${GCLOUD_FLAGS[@]}"})
}

q() {  # one word quoted for a POSIX shell, left bare when it is safe as it is; --flag='value' reads best
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^--[A-Za-z0-9_.-]+= ]]; then
    printf '%s' "${1%%=*}="
    q "${1#*=}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

qjoin() {  # words quoted and joined by spaces: a command line to print or to send to the workers
  local out="" a
  for a in "$@"; do out="$out${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

remote_path() {  # a path on the workers, for a remote command: relative (or ~/...) means under the remote $HOME
  local p=${1#\~/}
  # shellcheck disable=SC2016
  case $p in
    /*) q "$p" ;;
    *) printf '"$HOME"/%s' "$(q "$p")" ;;  # the worker's $HOME
  esac
}

run() {  # runs a command, or under --dry-run prints it, quoted so that it can be pasted into a shell
  if [ "$DRY_RUN" = 1 ]; then
    qjoin "$@"
    echo
    return 0
  fi
  if [ "$1" = gcloud ] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
  "$@"
}

tpu_ssh() {  # worker command: run a shell command on one worker (0, 1, ...) or on all of them at once
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" "--worker=$1" "--command=$2"
}

# Shell snippets for the remote commands. The run's state lives in the log dir on each worker: <hostname>.log,
# relaunch.pid and jaxsft.pid (written by relaunch_loop.sh), exit_code when the loop has ended, STOP (stop.sh).
# shellcheck disable=SC2016  # these are expanded on the workers, not here
REMOTE_ALIVE='alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }'
# shellcheck disable=SC2016
REMOTE_HOST='h=$(hostname)'
