#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: every worker VM runs the same command.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--create --accelerator-type v5litepod-16
#       --runtime-version v2-alpha-tpuv5-lite] [--skip-install] [--dry-run] -- MAIN_ARGS...
#
# Steps: (optionally) create the TPU VM, copy this repository to ~/openvlm-jax on all workers,
# install requirements-tpu.txt there, then run `python -m openvlm_jax.main MAIN_ARGS` on all
# workers at once. jax.distributed finds the other workers by itself on a TPU VM. The workdir
# must be visible to every worker (a gcsfuse or Filestore mount), since checkpoints are written
# by all of them together. --dry-run prints the commands instead of running them.
set -euo pipefail

tpu=""; zone=""; project=""; create=0; accelerator_type=""; runtime_version=""
skip_install=0; dry_run=0
remote_dir='~/openvlm-jax'
repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --create) create=1; shift ;;
    --accelerator-type) accelerator_type=$2; shift 2 ;;
    --runtime-version) runtime_version=$2; shift 2 ;;
    --skip-install) skip_install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main's arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "--tpu and --zone are required" >&2; exit 2
fi
if [[ "$create" == 1 && ( -z "$accelerator_type" || -z "$runtime_version" ) ]]; then
  echo "--create needs --accelerator-type and --runtime-version" >&2; exit 2
fi
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
main_args=$(printf '%q ' "$@")
main_command="cd ${remote_dir} && python3 -m openvlm_jax.main ${main_args% }"
archive=/tmp/openvlm-jax-src.tar.gz

run() {
  if [[ "$dry_run" == 1 ]]; then
    local words=() arg
    for arg in "$@"; do
      if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then words+=("$arg"); else words+=("${arg@Q}"); fi
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

if [[ "$create" == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$tpu" "${where[@]}" \
    --accelerator-type="$accelerator_type" --version="$runtime_version"
fi
run tar -czf "$archive" -C "$repo_dir" --exclude=.git --exclude=.venv --exclude=runs .
run gcloud compute tpus tpu-vm scp "$archive" "$tpu":/tmp/ "${where[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
  --command="mkdir -p ${remote_dir} && tar -xzf /tmp/$(basename "$archive") -C ${remote_dir}"
if [[ "$skip_install" == 0 ]]; then
  run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
    --command="cd ${remote_dir} && pip install -r requirements-tpu.txt && pip install -e ."
fi
run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command="$main_command"
