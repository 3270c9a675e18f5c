#!/usr/bin/env bash
# Puts jaxsft on every worker of a TPU VM: copies this checkout (git-tracked and untracked-but-not-ignored files)
# with `tpu-vm scp --worker=all`, or clones --git URL on each worker; then makes a Python venv (uv fetches a
# Python >= 3.11, which jax needs and the TPU images lack) and runs `pip install -e '.[tpu]'` in it.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--source DIR | --git URL [--git-ref REF]] [options]

Copies the project to every worker (or clones it there), then installs it with the TPU extra in a venv.
Rerun it after changing the code: the copy is refreshed and the install is quick.

Options:
  --source DIR           local checkout to copy (default: the one holding tpu_scripts/)
  --git URL              clone URL on each worker instead of copying (a fetch if it is already there)
  --git-ref REF          branch, tag or commit to check out (default: the remote's default branch)
  --remote-dir DIR       where the project goes on the workers, relative to the home dir (default: jaxsft)
  --venv DIR             venv on the workers, relative to the home dir (default: jaxsft-venv)
  --python-version V     Python of the venv, installed by uv (default: 3.12)
  --no-venv              install into the workers' own python3 instead (it must be >= 3.11)
  --extras LIST          pip extras to install (default: tpu, i.e. jax[tpu] with libtpu)
  --worker W             all (default) or one worker index, e.g. to redo a replaced worker
$COMMON_HELP

Example:
  $PROG --name sft-v5e --zone us-west4-a
EOF
}

SOURCE=""
GIT_URL=""
GIT_REF=""
REMOTE_DIR=jaxsft
VENV=jaxsft-venv
PYTHON_VERSION=3.12
NO_VENV=0
EXTRAS=tpu
WORKER=all
handle_arg() {  # this script's own options, for parse_args (common.sh): NSHIFT = the words taken
  case $1 in
    --source) need_value "$@"; SOURCE=$2; NSHIFT=2 ;;
    --git) need_value "$@"; GIT_URL=$2; NSHIFT=2 ;;
    --git-ref) need_value "$@"; GIT_REF=$2; NSHIFT=2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; NSHIFT=2 ;;
    --venv) need_value "$@"; VENV=$2; NSHIFT=2 ;;
    --python-version) need_value "$@"; PYTHON_VERSION=$2; NSHIFT=2 ;;
    --no-venv) NO_VENV=1; NSHIFT=1 ;;
    --extras) need_value "$@"; EXTRAS=$2; NSHIFT=2 ;;
    --worker) need_value "$@"; WORKER=$2; NSHIFT=2 ;;
  esac
}
parse_args handle_arg "$@"

require_location
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be 'all' or a worker index, got '$WORKER'"
if [ -n "$SOURCE" ] && [ -n "$GIT_URL" ]; then die "--source and --git exclude each other"; fi
if [ -n "$GIT_REF" ] && [ -z "$GIT_URL" ]; then die "--git-ref needs --git"; fi
if [ -z "$GIT_URL" ]; then
  SOURCE=${SOURCE:-$(dirname "$TPU_SCRIPTS_DIR")}
  [ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE is not a jaxsft checkout (no pyproject.toml)"
  SOURCE=$(cd "$SOURCE" && pwd)
fi

D=$(remote_path "$REMOTE_DIR")
steps=("set -e" "$REMOTE_HOST" "mkdir -p $D")
if [ -z "$GIT_URL" ]; then
  TARBALL_NAME=jaxsft-src.tgz
  steps+=("tar -xzf \"\$HOME\"/$TARBALL_NAME -C $D" "rm -f \"\$HOME\"/$TARBALL_NAME")
else
  steps+=("if [ -d $D/.git ]; then git -C $D fetch --quiet origin; else git clone --quiet $(q "$GIT_URL") $D; fi")
  if [ -n "$GIT_REF" ]; then
    steps+=("git -C $D fetch --quiet origin $(q "$GIT_REF")" "git -C $D checkout --quiet --detach FETCH_HEAD")
  else
    steps+=("git -C $D checkout --quiet --detach origin/HEAD")
  fi
fi
if [ "$NO_VENV" = 1 ]; then
  PY=python3
else
  V=$(remote_path "$VENV")
  PY="$V/bin/python"
  get_uv="python3 -m pip install --quiet --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh"
  # shellcheck disable=SC2016  # expanded on the workers
  steps+=('export PATH="$HOME/.local/bin:$PATH"'
    "if [ ! -x $PY ]; then { command -v uv >/dev/null || $get_uv; } && uv venv --quiet --seed --python $(q "$PYTHON_VERSION") $V; fi")
fi
steps+=("cd $D" "$PY -m pip install --quiet --upgrade pip" "$PY -m pip install --quiet -e $(q ".[$EXTRAS]")")
case ",$EXTRAS," in
  *,tpu,*) check='import jax, jaxsft, libtpu; print("jax", jax.__version__, "+ libtpu")' ;;
  *) check='import jax, jaxsft; print("jax", jax.__version__)' ;;
esac
steps+=("v=\$($PY -c $(q "$check")) || { echo \"\$h: jax, libtpu or jaxsft does not import after the install\" >&2; exit 1; }"
  "echo \"\$h: ready: \$v\"")
remote=""
for s in "${steps[@]}"; do remote="$remote${remote:+; }$s"; done

if [ -z "$GIT_URL" ]; then
  if [ "$DRY_RUN" = 1 ]; then
    TARBALL="/tmp/$TARBALL_NAME"
    echo "# pack $SOURCE (git-tracked and untracked-but-not-ignored files) into $TARBALL"
  else
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    TARBALL="$TMP/$TARBALL_NAME"
    if [ -d "$SOURCE/.git" ] || [ -f "$SOURCE/.git" ]; then
      (cd "$SOURCE" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
        tar -czf "$TARBALL" --null -T -)
    else
      tar -czf "$TARBALL" --exclude=.git --exclude=runs --exclude=__pycache__ --exclude='*.egg-info' -C "$SOURCE" .
    fi
    note "copying $SOURCE ($(du -h "$TARBALL" | cut -f1) packed) to worker(s) $WORKER of $NAME"
  fi
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$TARBALL_NAME" "${LOCATION[@]}" "--worker=$WORKER"
fi
tpu_ssh "$WORKER" "$remote"
