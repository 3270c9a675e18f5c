#!/usr/bin/env bash
# Starts one jaxsft config on every worker at once: a single `tpu-vm ssh --worker=all` sends the same command to
# each, which starts relaunch_loop.sh detached (setsid nohup, so a dropped SSH session does not end training),
# logging to <log dir>/<hostname>.log on that worker. The workdir (usually gs://bucket/run) goes to --workdir
# unchanged; --multihost makes each worker join the others through jax.distributed.initialize.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config CONFIG --workdir WORKDIR [options] [-- JAXSFT_ARGS ...]

Runs \`python -m jaxsft.run --config CONFIG --workdir WORKDIR --multihost JAXSFT_ARGS\` on every worker, detached,
under relaunch_loop.sh: it is rerun after exit 75 (stopped with a checkpoint: the rerun resumes) and, with
--retries, after exit 1. Refuses to start where a run is still going (stop.sh first). Rerun launch.sh with the
same arguments to resume a stopped or preempted run.

Options:
  --config CONFIG        config file, relative to the project on the workers, e.g. configs/sft.py (required)
  --workdir WORKDIR      run folder, shared by the workers: gs://bucket/run1 (required)
  --no-multihost         leave out --multihost (a single-host slice such as v5litepod-8 or v5p-8)
  --env KEY=VALUE        environment variable for the run, repeatable (e.g. --env HF_HOME=/tmp/hf)
  --retries N            reruns after exit 1 (default 0)
  --max-restarts N       reruns after exit 75 on a worker, 0 = no limit (default 100)
  --delay SECONDS        pause before a rerun (default 10)
  --remote-dir DIR       the project on the workers, relative to the home dir (default: jaxsft)
  --venv DIR             venv made by setup.sh, relative to the home dir (default: jaxsft-venv)
  --python PATH          python on the workers (default: VENV/bin/python)
  --log-dir DIR          logs and run state on each worker, relative to the home dir (default: jaxsft_logs)
  --follow               then follow worker 0's log (Ctrl-C stops following, not training)
$COMMON_HELP

Arguments after -- go to jaxsft.run, e.g. -- --config.model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct

Example:
  $PROG --name sft-v5e --zone us-west4-a --config configs/sft.py --workdir gs://my-bucket/sft-run1 \\
    -- --config.data.train=yahma/alpaca-cleaned:train
EOF
}

CONFIG=""
WORKDIR=""
MULTIHOST=1
ENVS=()
RETRIES=0
MAX_RESTARTS=100
DELAY=10
REMOTE_DIR=jaxsft
VENV="jaxsft-venv"
PYTHON=""
LOG_DIR=jaxsft_logs
FOLLOW=0
JAXSFT_ARGS=()
UNKNOWN_HINT="jaxsft arguments go after --; see --help"
handle_arg() {  # this script's own options, for parse_args (common.sh): NSHIFT = the words taken
  case $1 in
    --config) need_value "$@"; CONFIG=$2; NSHIFT=2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; NSHIFT=2 ;;
    --no-multihost) MULTIHOST=0; NSHIFT=1 ;;
    --env)
      need_value "$@"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$2'"
      ENVS+=("$2"); NSHIFT=2 ;;
    --retries) need_value "$@"; need_int "$@"; RETRIES=$2; NSHIFT=2 ;;
    --max-restarts) need_value "$@"; need_int "$@"; MAX_RESTARTS=$2; NSHIFT=2 ;;
    --delay) need_value "$@"; need_int "$@"; DELAY=$2; NSHIFT=2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; NSHIFT=2 ;;
    --venv) need_value "$@"; VENV=$2; NSHIFT=2 ;;
    --python) need_value "$@"; PYTHON=$2; NSHIFT=2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; NSHIFT=2 ;;
    --follow) FOLLOW=1; NSHIFT=1 ;;
    --) NSHIFT=$#; shift; JAXSFT_ARGS=("$@") ;;
  esac
}
parse_args handle_arg "$@"

require_location
require "$CONFIG" --config
require "$WORKDIR" --workdir
if [[ $WORKDIR != gs://* && $WORKDIR != /* ]]; then
  note "warning: --workdir $WORKDIR is on each worker's own disk: the workers do not share it and a deleted" \
    "or preempted TPU VM takes it along; use gs://bucket/run for a multi-worker slice"
fi

if [ -z "$PYTHON" ]; then
  PY="$(remote_path "$VENV")/bin/python"
elif [[ $PYTHON == */* ]]; then
  PY=$(remote_path "$PYTHON")
else
  PY=$(q "$PYTHON")  # a bare name such as python3 is looked up on the workers' PATH
fi
jaxsft=(-m jaxsft.run --config "$CONFIG" --workdir "$WORKDIR")
if [ "$MULTIHOST" = 1 ]; then jaxsft+=(--multihost); fi
jaxsft+=(${JAXSFT_ARGS[@]+"${JAXSFT_ARGS[@]}"})
envs=""
if [ ${#ENVS[@]} -gt 0 ]; then envs="env $(qjoin "${ENVS[@]}") "; fi
L=$(remote_path "$LOG_DIR")
loop=(--state-dir "@LOG@" --retries "$RETRIES" --max-restarts "$MAX_RESTARTS" --delay "$DELAY")
loop_args=$(qjoin "${loop[@]}")
loop_args=${loop_args//@LOG@/\"\$LOG\"}
# shellcheck disable=SC2016  # expanded on the workers
steps=("set -e" "$REMOTE_HOST" "LOG=$L" 'mkdir -p "$LOG"' "$REMOTE_ALIVE"
  'if alive "$LOG/relaunch.pid"; then echo "$h: a run is still going (relaunch loop pid $(cat "$LOG/relaunch.pid")): stop.sh it first" >&2; exit 1; fi'
  "cd $(remote_path "$REMOTE_DIR")"
  "setsid nohup ${envs}bash tpu_scripts/relaunch_loop.sh $loop_args -- $PY $(qjoin "${jaxsft[@]}") \
>>\"\$LOG/\$h.log\" 2>&1 </dev/null & echo \"\$h: started (pid \$!); log: \$LOG/\$h.log\"")
remote=""
for s in "${steps[@]}"; do remote="$remote${remote:+; }$s"; done

tpu_ssh all "$remote"
if [ "$FOLLOW" = 1 ]; then
  logs=("$TPU_SCRIPTS_DIR/logs.sh" --name "$NAME" --zone "$ZONE" --log-dir "$LOG_DIR" --follow)
  if [ -n "$PROJECT" ]; then logs+=(--project "$PROJECT"); fi
  for f in ${GCLOUD_FLAGS[@]+"${GCLOUD_FLAGS[@]}"}; do logs+=("--gcloud-flag=$f"); done
  if [ "$DRY_RUN" = 1 ]; then logs+=(--dry-run); fi
  "${logs[@]}"
fi
