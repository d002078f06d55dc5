#!/usr/bin/env bash
# Runs N processes of the trainer on this machine, joined by jax.distributed on 127.0.0.1.
#
#   launch/local.sh [--dry-run] [--num-processes N] [--cpu-devices D] [--port P] -- MAIN_ARGS...
#
# Every process runs `python -m openvlm_jax.main MAIN_ARGS` with JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID set. --cpu-devices D gives each process D simulated CPU
# devices (for trying a multi-host setup on a laptop). Logs go to <prefix>.<index>.log
# (--log-prefix, default /tmp/openvlm-local). If one process fails, the others are stopped.
set -euo pipefail

num_processes=2
cpu_devices=0
port=""
dry_run=0
log_prefix=/tmp/openvlm-local
python_bin=${PYTHON:-python}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --num-processes) num_processes=$2; shift 2 ;;
    --cpu-devices) cpu_devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --log-prefix) log_prefix=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main's arguments go after --)" >&2; exit 2 ;;
  esac
done
quoted_args=$(printf '%q ' "$@")
if [[ -z "$port" ]]; then
  port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

commands=()
for ((index = 0; index < num_processes; index++)); do
  env_vars="JAX_COORDINATOR_ADDRESS=127.0.0.1:${port} JAX_NUM_PROCESSES=${num_processes} JAX_PROCESS_ID=${index}"
  if [[ "$cpu_devices" -gt 0 ]]; then
    env_vars+=" JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=${cpu_devices}"
  fi
  commands+=("env ${env_vars} ${python_bin} -m openvlm_jax.main ${quoted_args% }")
done

if [[ "$dry_run" == 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM
for ((index = 0; index < num_processes; index++)); do
  bash -c "${commands[$index]}" > "${log_prefix}.${index}.log" 2>&1 &
  pids+=($!)
  echo "process ${index}: pid ${pids[-1]}, log ${log_prefix}.${index}.log"
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=1
    stop_all
  fi
done
exit "$status"
