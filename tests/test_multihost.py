"""Two processes on 127.0.0.1 (4 simulated devices each) train like one process with 8 devices.

Both runs go through the real entry point. The data has exactly one global batch (8 records,
batch 8), so every step sees the same examples whether one process reads them all or each of
two processes reads its shard of 4: the losses must agree. Were a process to read the other's
shard too, or rows were assembled wrongly, a batch would hold duplicates and the losses differ.
The one process reads the JSONL file; the two read its first half converted to ArrayRecord
followed by its second half as JSONL, so both kinds of source are sharded over processes and
agree with the JSONL file through training.
"""

import json
import os
import socket
import subprocess
import sys
import time

from openvlm_jax.data import convert, digits
from openvlm_jax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, BATCH = 3, 8
TIMEOUT_S = 240  # a bound, not the expected time (about a minute on an idle 2-core machine)
# Cheaper XLA CPU compiles; both runs use them, so they still compare like for like.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
SFT_ARGS = ('--config=configs/sft.py:model=tiny',)
# GRPO on the same 8 prompts, 2 answers each, rewarded by their length (below), over which an
# untrained model's answers spread, so advantages and updates are not all zero.
GRPO_ARGS = ('--config=configs/grpo.py:model=tiny,group=2', '--config.model.vision.image_size=16',
             "--config.objective.rewards=(('tests.test_multihost:answer_length', 1.0),)",
             '--config.objective.max_new_tokens=3', '--config.training.eval_every=0',
             '--config.lora.rank=4')


def answer_length(answer: str, reference: str, question: str) -> float:
  """GRPO_ARGS' reward: the answer's length in characters."""
  del reference, question
  return float(len(answer))


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def write_data(folder):
  """8 digits records (one global batch) as JSONL, as half ArrayRecord + half JSONL, and a
  tokenizer."""
  built = digits.build_digits_dataset(os.path.join(folder, 'digits'), seed=0, image_size=16)
  with open(built['train']) as f:
    lines = f.readlines()[:BATCH]
  train_file = os.path.join(folder, 'digits', 'batch.jsonl')
  with open(train_file, 'w') as f:
    f.writelines(lines)
  tokenizer_dir = os.path.join(folder, 'tokenizer')
  tokenizer_lib.train_tokenizer(digits.tokenizer_corpus([built['train']]), tokenizer_dir)
  halves = []
  for name, part in (('first', lines[:BATCH // 2]), ('second', lines[BATCH // 2:])):
    halves.append(os.path.join(folder, 'digits', f'{name}.jsonl'))
    with open(halves[-1], 'w') as f:
      f.writelines(part)
  converted = os.path.join(folder, 'arrayrecord')
  convert.convert_jsonl({'train': [halves[0]]}, converted, show_progress=False)
  return train_file, (f'{converted}:train', halves[1]), tokenizer_dir


def start(workdir, train_files, tokenizer_dir, num_devices, recipe_args=SFT_ARGS, **env_vars):
  args = [sys.executable, '-m', 'openvlm_jax.main', f'--workdir={workdir}',
          *recipe_args, f'--config.training.num_steps={NUM_STEPS}',
          '--config.training.log_every=1', '--config.training.progress_bar=False',
          f'--config.data.batch_size={BATCH}', '--config.data.seq_len=32',
          '--config.optimizer.warmup_steps=0',
          f'--config.data.train_files={tuple(train_files)!r}', f'--config.tokenizer={tokenizer_dir}',
          '--alsologtostderr', '--verbosity=0']
  env = dict(os.environ, JAX_PLATFORMS='cpu', TOKENIZERS_PARALLELISM='false',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}',
             **env_vars)
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_all(processes, deadline):
  """Waits for every process until `deadline`; kills them all on a failure or a timeout."""
  outputs = []
  try:
    for process in processes:
      output, _ = process.communicate(timeout=max(deadline - time.time(), 1))
      outputs.append(output)
      assert process.returncode == 0, output[-4000:]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  return outputs


def train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [record for record in map(json.loads, f) if record['split'] == 'train']


def test_two_processes_match_one(tmp_path):
  deadline = time.time() + TIMEOUT_S
  train_file, converted, tokenizer_dir = write_data(str(tmp_path))
  single_dir, multi_dir = str(tmp_path / 'single'), str(tmp_path / 'multi')
  coordinator = f'127.0.0.1:{free_port()}'
  processes = [start(single_dir, [train_file], tokenizer_dir, num_devices=8)]
  processes += [start(multi_dir, converted, tokenizer_dir, num_devices=4,
                      JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES='2',
                      JAX_PROCESS_ID=str(index)) for index in range(2)]
  outputs = wait_all(processes, deadline)

  # Every process says who it is; the pair formed one 8-device runtime.
  assert 'process 0 of 1, 8 local / 8 global devices' in outputs[0]
  assert 'process 0 of 2, 4 local / 8 global devices' in outputs[1]
  assert 'process 1 of 2, 4 local / 8 global devices' in outputs[2]
  assert f'{train_file}: 8 records, none skipped' in outputs[0]
  both = f'llava_records/2.0.0:train, {converted[1]}'
  assert f'{both} (shard 0 of 2): 4 records, none skipped' in outputs[1]
  assert f'{both} (shard 1 of 2): 4 records, none skipped' in outputs[2]

  # Same losses; metrics written once (by process 0), not once per process.
  single, multi = train_records(single_dir), train_records(multi_dir)
  assert [record['step'] for record in multi] == list(range(1, NUM_STEPS + 1))
  assert [record['step'] for record in single] == list(range(1, NUM_STEPS + 1))
  for one, two in zip(single, multi):
    assert abs(one['loss'] - two['loss']) < 1e-5 * abs(one['loss']), (single, multi)
    assert abs(one['grad_norm'] - two['grad_norm']) < 1e-4 * abs(one['grad_norm'])
  assert single[-1]['loss'] < single[0]['loss']

  # One checkpoint, written together: the state plus each process's data-iterator position.
  step_dir = os.path.join(multi_dir, 'checkpoints', str(NUM_STEPS))
  assert os.path.isdir(os.path.join(step_dir, 'state'))
  data_files = sorted(name for name in os.listdir(os.path.join(step_dir, 'data'))
                      if name.startswith('process_'))
  assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']


def test_two_processes_sample_and_train_grpo_like_one(tmp_path):
  """Rollouts on the mesh: each process answers its own prompts within one global sampling
  computation, rewards them, and the update is one global step; all as in one process."""
  deadline = time.time() + TIMEOUT_S
  train_file, _, tokenizer_dir = write_data(str(tmp_path))
  halves = [os.path.join(os.path.dirname(train_file), f'{name}.jsonl')
            for name in ('first', 'second')]
  single_dir, multi_dir = str(tmp_path / 'single'), str(tmp_path / 'multi')
  coordinator = f'127.0.0.1:{free_port()}'
  processes = [start(single_dir, [train_file], tokenizer_dir, num_devices=8,
                     recipe_args=GRPO_ARGS)]
  processes += [start(multi_dir, halves, tokenizer_dir, num_devices=4, recipe_args=GRPO_ARGS,
                      JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES='2',
                      JAX_PROCESS_ID=str(index)) for index in range(2)]
  wait_all(processes, deadline)
  single, multi = train_records(single_dir), train_records(multi_dir)
  assert [record['step'] for record in multi] == list(range(1, NUM_STEPS + 1))
  assert any(record['reward_std'] > 0 for record in single)
  for one, two in zip(single, multi):
    # Process 0 logs its own prompts' rollout statistics; the update's metrics are global.
    for key in ('loss', 'grad_norm', 'kl'):
      assert abs(one[key] - two[key]) <= 1e-5 * max(abs(one[key]), 1e-6), (key, single, multi)
