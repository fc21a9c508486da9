#!/usr/bin/env bash
# Run a jaxpost experiment on every worker of a multi-host Cloud TPU VM slice.
#
#   scripts/launch_tpu_pod.sh --tpu=NAME --zone=ZONE [--project=PROJECT] \
#       [--repo_url=URL [--branch=BRANCH]] [--dir=jaxpost] [--dry_run] \
#       -- python -m experiments.grpo --config=... --mesh=...
#
# Three steps, each one `gcloud compute tpus tpu-vm ssh ... --worker=all` (or scp), so every host
# gets the same code and runs the same program (JAX's multi-controller model):
#   1. code: `git clone`/`git pull` of --repo_url at --branch, or (default) a tarball of this
#      working tree (tracked and untracked files, no .git/.venv) copied to every worker;
#   2. install: pip install -e '.[tpu]' in --dir on every worker;
#   3. run: the command after `--` in --dir on every worker. jaxpost's
#      maybe_initialize_distributed() sees a multi-host TPU slice and lets JAX find the
#      coordinator itself; nothing else is needed.
# --dry_run prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

TPU="" ZONE="" PROJECT="" REPO_URL="" BRANCH="main" DIR="jaxpost" DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo_url=*) REPO_URL="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --dir=*) DIR="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch_tpu_pod.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
  shift
done
if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "launch_tpu_pod.sh: --tpu and --zone are required" >&2; exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "launch_tpu_pod.sh: give the command to run after '--'" >&2; exit 2
fi

# The module command, quoted so it survives the remote shell unchanged.
REMOTE_CMD="$(printf '%q ' "$@")"
REMOTE_CMD="${REMOTE_CMD% }"
TARGET=("$TPU" "--zone=$ZONE")
[[ -n "$PROJECT" ]] && TARGET+=("--project=$PROJECT")

run() {  # print (dry run) or execute one command
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "${TARGET[@]}" --worker=all --command="$1"
}

if [[ -n "$REPO_URL" ]]; then
  on_all_workers "if [ -d $DIR/.git ]; then git -C $DIR fetch -q origin $BRANCH && git -C $DIR checkout -q $BRANCH && git -C $DIR pull -q --ff-only; else git clone -q --branch $BRANCH $REPO_URL $DIR; fi"
else
  ROOT="$(cd "$(dirname "$0")/.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/jaxpost-$TPU.tar.gz"
  run tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude='__pycache__' -czf "$TARBALL" .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:jaxpost.tar.gz" "--zone=$ZONE" \
    ${PROJECT:+"--project=$PROJECT"} --worker=all
  on_all_workers "mkdir -p $DIR && tar -xzf jaxpost.tar.gz -C $DIR"
fi
on_all_workers "cd $DIR && python3 -m pip install -q -e '.[tpu]'"
on_all_workers "cd $DIR && $REMOTE_CMD"
