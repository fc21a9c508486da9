#!/usr/bin/env bash
# Run a jaxpost experiment on a SLURM GPU cluster: one process per node, all GPUs of the node.
#
#   sbatch --nodes=4 --gpus-per-node=8 scripts/launch_gpu_slurm.sh \
#       python -m experiments.grpo --config=... --mesh=-1,8,1
#
# The first host of the allocation is JAX's coordinator. Each task gets
#   JAX_COORDINATOR_ADDRESS=<first host>:$JAX_COORDINATOR_PORT (default 12345)
#   JAX_NUM_PROCESSES=$SLURM_NTASKS   JAX_PROCESS_ID=$SLURM_PROCID
# which jaxpost.distributed.maybe_initialize_distributed() reads ("explicit" source).
# DRY_RUN=1 (or --dry_run as the first argument) prints the srun line and each node's command
# instead of running them; without `scontrol` the nodelist is expanded by
# jaxpost.distributed.expand_nodelist (in $PYTHON, default python3). Submit from the
# repository's root: sbatch runs a copy of this script, and the tasks then run in
# $SLURM_SUBMIT_DIR.
#SBATCH --job-name=jaxpost
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=jaxpost-%j.out
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -eq 0 ]]; then
  echo "launch_gpu_slurm.sh: give the command to run, e.g. python -m experiments.grpo" >&2
  exit 2
fi
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (SLURM_JOB_NODELIST unset)}"
: "${SLURM_NTASKS:?SLURM_NTASKS unset}"

# The tree the tasks run in. sbatch runs a copy of this script from slurmd's spool directory,
# so there the tree is the directory the job was submitted from.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -d "$ROOT/jaxpost" ]]; then
  ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
  if [[ ! -d "$ROOT/jaxpost" ]]; then
    echo "launch_gpu_slurm.sh: no jaxpost tree at $ROOT (sbatch runs a copy of this script):" \
      "submit the job from the repository's root" >&2
    exit 2
  fi
fi
if command -v scontrol >/dev/null 2>&1; then
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  ERR="$(mktemp)"
  if ! OUT="$(cd "$ROOT" && "${PYTHON:-python3}" -c \
      'import sys; from jaxpost.distributed import expand_nodelist; print(*expand_nodelist(sys.argv[1]), sep="\n")' \
      "$SLURM_JOB_NODELIST" 2>"$ERR")"; then
    echo "launch_gpu_slurm.sh: cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' without" \
      "scontrol: ${PYTHON:-python3} says \"$(tail -n 1 "$ERR")\" (run inside jaxpost's" \
      "environment or set PYTHON=/path/to/its/python)" >&2
    rm -f "$ERR"
    exit 2
  fi
  rm -f "$ERR"
  mapfile -t HOSTS <<< "$OUT"
fi
export JAX_COORDINATOR_ADDRESS="${HOSTS[0]}:${JAX_COORDINATOR_PORT:-12345}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"

CMD="$(printf '%q ' "$@")"
CMD="${CMD% }"
# SLURM_PROCID is only known inside each task, hence the single quotes.
TASK='export JAX_PROCESS_ID=$SLURM_PROCID; cd '"$(printf '%q' "$ROOT")"' && exec '"$CMD"

if [[ "$DRY_RUN" == 1 ]]; then
  echo "srun --ntasks=$SLURM_NTASKS --ntasks-per-node=1 bash -c $(printf '%q' "$TASK")"
  for i in "${!HOSTS[@]}"; do
    echo "node ${HOSTS[$i]}: JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS" \
      "JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES JAX_PROCESS_ID=$i $CMD"
  done
  exit 0
fi
srun --ntasks="$SLURM_NTASKS" --ntasks-per-node=1 bash -c "$TASK"
