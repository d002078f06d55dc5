#!/usr/bin/env bash
# Trains on a multi-node GPU cluster with SLURM: writes a batch script and submits it.
#
#   launch/slurm.sh [--nodes N] [--gpus-per-node G] [--process-per gpu|node] [--partition P]
#       [--time HH:MM:SS] [--job-name NAME] [--dry-run] -- MAIN_ARGS...
#
# srun starts one process per GPU (default) or one per node; jax.distributed reads SLURM's
# variables (coordinator = first node, process count and index) by itself. With one process
# per node, JAX_LOCAL_DEVICE_IDS hands each process all of its node's GPUs. --dry-run prints
# the batch script and the sbatch command instead of submitting.
set -euo pipefail

nodes=2; gpus_per_node=8; process_per=gpu; partition=""; time_limit="24:00:00"
job_name=openvlm; dry_run=0
repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus_per_node=$2; shift 2 ;;
    --process-per) process_per=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --time) time_limit=$2; shift 2 ;;
    --job-name) job_name=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main's arguments go after --)" >&2; exit 2 ;;
  esac
done
case "$process_per" in
  gpu) tasks_per_node=$gpus_per_node; device_ids="" ;;
  node) tasks_per_node=1; device_ids=$(seq -s, 0 $((gpus_per_node - 1))) ;;
  *) echo "--process-per must be gpu or node" >&2; exit 2 ;;
esac

script=$(
  echo '#!/usr/bin/env bash'
  echo "#SBATCH --job-name=${job_name}"
  echo "#SBATCH --nodes=${nodes}"
  echo "#SBATCH --ntasks-per-node=${tasks_per_node}"
  echo "#SBATCH --gpus-per-node=${gpus_per_node}"
  echo "#SBATCH --time=${time_limit}"
  echo "#SBATCH --output=${job_name}-%j.log"
  [[ -n "$partition" ]] && echo "#SBATCH --partition=${partition}"
  echo 'set -euo pipefail'
  echo "cd $(printf '%q' "$repo_dir")"
  [[ -n "$device_ids" ]] && echo "export JAX_LOCAL_DEVICE_IDS=${device_ids}"
  quoted_args=$(printf '%q ' "$@")
  echo "srun --kill-on-bad-exit=1 python -m openvlm_jax.main ${quoted_args% }"
)

if [[ "$dry_run" == 1 ]]; then
  echo "$script"
  echo "sbatch <<< (the script above)"
  exit 0
fi
sbatch <<< "$script"
