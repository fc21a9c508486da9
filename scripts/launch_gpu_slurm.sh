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
# jaxpost.distributed.expand_nodelist.
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

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if command -v scontrol >/dev/null 2>&1; then
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  mapfile -t HOSTS < <(cd "$ROOT" && "${PYTHON:-python3}" -c \
    'import sys; from jaxpost.distributed import expand_nodelist; print(*expand_nodelist(sys.argv[1]), sep="\n")' \
    "$SLURM_JOB_NODELIST")
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
