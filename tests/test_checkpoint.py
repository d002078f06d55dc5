"""Checkpoints: a run killed with SIGKILL (or stopped by SIGTERM) resumes to the same losses.

The run packs its examples (`data.packing`) with the prefix-LM mask on: the packed iterator's
state and the per-token mask are the hardest parts of a resume to get right.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 150
ARGS = ['--config=configs/sft.py:model=tiny', f'--config.training.num_steps={NUM_STEPS}',
        '--config.training.log_every=1', '--config.training.checkpoint_every=10',
        '--config.training.eval_every=1000', '--config.training.progress_bar=False',
        '--config.training.eval_generate=False',
        '--config.data.batch_size=8', '--config.data.seq_len=48',  # two digits' examples a row
        '--config.data.packing=True', '--config.model.prefix_attention=True']


def start(workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.Popen([sys.executable, '-m', 'openvlm_jax.main', f'--workdir={workdir}', *ARGS],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def finish(process, timeout=300):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]
  return output


def saved_steps(workdir):
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def train_records(workdir):
  """The train lines of metrics.jsonl, in the order they were written."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.endswith('\n')]
  return [record for record in records if record['split'] == 'train']


def train_losses(workdir):
  """Printed-precision train losses by step; a re-run step's last value wins."""
  return {record['step']: f"{record['loss']:.6f}" for record in train_records(workdir)}


def wait_for(condition, process, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    if process.poll() is not None:
      pytest.fail(f'run ended before the condition held:\n{process.stdout.read()[-3000:]}')
    if time.time() > deadline:
      process.kill()
      pytest.fail('timed out')
    time.sleep(0.05)


def test_kill_and_resume_gives_the_same_losses(tmp_path):
  reference_dir, resumed_dir = str(tmp_path / 'reference'), str(tmp_path / 'resumed')
  finish(start(reference_dir))
  reference = train_losses(reference_dir)
  assert sorted(reference) == list(range(1, NUM_STEPS + 1))

  # SIGKILL right after the first checkpoint is on disk.
  process = start(resumed_dir)
  wait_for(lambda: saved_steps(resumed_dir), process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = saved_steps(resumed_dir)[-1]
  assert killed_at < NUM_STEPS

  # Resume; SIGTERM once it has trained a few steps more: it must save and exit cleanly.
  logged_before = len(train_records(resumed_dir))
  process = start(resumed_dir)
  wait_for(lambda: len(train_records(resumed_dir)) >= logged_before + 3, process)
  process.send_signal(signal.SIGTERM)
  output = finish(process)
  stopped_at = saved_steps(resumed_dir)[-1]
  assert 'SIGTERM' in output
  assert killed_at < stopped_at

  # Resume again to the end.
  finish(start(resumed_dir))
  assert train_losses(resumed_dir) == reference
