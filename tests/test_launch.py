"""The launch scripts' `--dry-run` prints the commands they would run."""

import os
import shlex
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_ARGS = ['--config=configs/sft.py:model=tiny', '--workdir=/shared/runs/a b']


def dry_run(script, *options):
  result = subprocess.run(['bash', os.path.join(REPO, 'launch', script), '--dry-run', *options,
                           '--', *MAIN_ARGS], capture_output=True, text=True, timeout=30,
                          check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout.strip().splitlines()


def main_command(words):
  """The `python -m openvlm_jax.main ...` part of a command, as argv."""
  start = words.index('-m')
  assert words[start - 1].startswith('python') and words[start + 1] == 'openvlm_jax.main'
  return words[start + 2:]


def test_local_runs_one_process_per_index_on_loopback():
  lines = dry_run('local.sh', '--num-processes', '3', '--port', '4321', '--cpu-devices', '4')
  assert len(lines) == 3
  for index, line in enumerate(lines):
    words = shlex.split(line)
    assert words[0] == 'env'
    assert 'JAX_COORDINATOR_ADDRESS=127.0.0.1:4321' in words
    assert 'JAX_NUM_PROCESSES=3' in words
    assert f'JAX_PROCESS_ID={index}' in words
    assert 'XLA_FLAGS=--xla_force_host_platform_device_count=4' in words
    assert main_command(words) == MAIN_ARGS


def test_tpu_pod_creates_installs_and_runs_on_all_workers():
  lines = dry_run('tpu_pod.sh', '--tpu', 'my-pod', '--zone', 'us-central2-b', '--project', 'proj',
                  '--create', '--accelerator-type', 'v4-32', '--runtime-version', 'tpu-vm-base')
  commands = [shlex.split(line) for line in lines]
  assert commands[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-pod',
                         '--zone=us-central2-b', '--project=proj', '--accelerator-type=v4-32',
                         '--version=tpu-vm-base']
  ssh = [words for words in commands if words[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert all('--worker=all' in words and 'my-pod' in words for words in ssh)
  remote = [words[-1].removeprefix('--command=') for words in ssh]
  assert any('pip install -r requirements-tpu.txt' in command for command in remote)
  run = shlex.split(remote[-1])
  assert run[:3] == ['cd', '~/openvlm-jax', '&&']
  assert main_command(run) == MAIN_ARGS
  # Without --create no VM is made.
  lines = dry_run('tpu_pod.sh', '--tpu', 'my-pod', '--zone', 'us-central2-b', '--skip-install')
  assert not any(' create ' in line or 'pip install' in line for line in lines)


def test_slurm_script_starts_one_process_per_gpu_or_node():
  lines = dry_run('slurm.sh', '--nodes', '4', '--gpus-per-node', '8', '--partition', 'a100')
  assert '#SBATCH --nodes=4' in lines
  assert '#SBATCH --ntasks-per-node=8' in lines
  assert '#SBATCH --gpus-per-node=8' in lines
  assert '#SBATCH --partition=a100' in lines
  srun = [shlex.split(line) for line in lines if line.startswith('srun')]
  assert len(srun) == 1 and main_command(srun[0]) == MAIN_ARGS
  assert not any('JAX_LOCAL_DEVICE_IDS' in line for line in lines)

  lines = dry_run('slurm.sh', '--nodes', '2', '--gpus-per-node', '4', '--process-per', 'node')
  assert '#SBATCH --ntasks-per-node=1' in lines
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3' in lines
