r"""Train-step speed and memory: our jitted step against transformers + torch, interleaved.

For each model (the demo VLM and a ~20M-parameter LLM with a small CLIP tower) both frameworks
build the same architecture (ours -> `LlavaConfig` -> `LlavaForConditionalGeneration`), train
with AdamW on the same batch, and are timed in alternation in one process so that the
machine's phases hit both alike. Peak memory comes from short child processes, one framework
each. Prints a table and writes JSON.

  python benchmarks/train_step.py --out=benchmarks/results/train_step.json
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # torch threads must not spin-wait
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import sft  # noqa: E402
from openvlm_jax import (
  config_lib,  # noqa: E402
  objectives,  # noqa: E402
  parallel,  # noqa: E402
)
from openvlm_jax.hf import config as hf_config  # noqa: E402
from openvlm_jax.models import matmul  # noqa: E402
from openvlm_jax.models.vlm import VLM  # noqa: E402
from openvlm_jax.training import optimizer as optimizer_lib  # noqa: E402
from openvlm_jax.training import state as state_lib  # noqa: E402
from openvlm_jax.training import step as step_lib  # noqa: E402

# name -> (model preset, vocab size, batch size, sequence length)
CASES = {
    'demo': ('demo', 512, 32, 48),
    'small-20M': ('small', 12000, 8, 256),
}
IMAGE_TOKEN = 3


def make_batch(vlm_config, batch_size, seq_len, seed=0):
  """A random batch: one image per example at the start, loss on the second half."""
  rng = np.random.default_rng(seed)
  num_image_tokens = vlm_config.vision.num_image_tokens
  input_ids = rng.integers(4, vlm_config.llm.vocab_size, (batch_size, seq_len)).astype(np.int32)
  input_ids[:, 1:1 + num_image_tokens] = IMAGE_TOKEN
  loss_mask = np.zeros((batch_size, seq_len), np.float32)
  loss_mask[:, seq_len // 2:-1] = 1.0
  size = vlm_config.vision.image_size
  return dict(input_ids=input_ids, targets=np.roll(input_ids, -1, axis=1), loss_mask=loss_mask,
              attention_mask=np.ones((batch_size, seq_len), np.int32),
              positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
              images=rng.normal(size=(batch_size, 1, size, size, 3)).astype(np.float32))


def vlm_config_for(case, dtype='float32'):
  preset, vocab, _, _ = CASES[case]
  config = sft.get_config(f'model={preset}')
  config.model.dtype = dtype
  return config, config_lib.build_vlm_config(config.model, vocab_size=vocab,
                                             image_token_id=IMAGE_TOKEN)


def jax_runner(case, plain_matmul=False):
  """Returns (run_one_step, info) for our jitted train step on one device.

  `plain_matmul` compiles the step with `lax.dot_general`'s own backward instead of our
  Dense matmul (see openvlm_jax/models/matmul.py), to show what that layout work buys.
  """
  config, vlm_config = vlm_config_for(case)
  _, _, batch_size, seq_len = CASES[case]
  model = VLM(vlm_config)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, num_steps=10_000)
  batch = make_batch(vlm_config, batch_size, seq_len)
  example = {name: batch[name][:1] for name in step_lib.MODEL_INPUTS}
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  shardings = state_lib.state_shardings(model, optimizer, example, mesh, config.logical_axis_rules)
  state = state_lib.create_train_state(model, optimizer, example, shardings, jax.random.key(0))
  step_fn = jax.jit(step_lib.make_train_step(model, objectives.get('sft'), optimizer, schedule),
                    donate_argnums=0)
  batch = jax.device_put(batch)
  with mock.patch.object(matmul, '_plain_contraction', lambda *_: 0) if plain_matmul else (
      contextlib.nullcontext()):
    compiled = step_fn.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  holder = dict(state=state)

  def run_one_step():
    holder['state'], metrics = compiled(holder['state'], batch)
    return float(metrics['loss'])

  num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  info = dict(params=num_params, flops=float(cost.get('flops', 0.0)),
              compiled_bytes=int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                 + memory.temp_size_in_bytes - memory.alias_size_in_bytes))
  return run_one_step, info


def torch_runner(case):
  """Returns run_one_step for the same model in transformers + torch with AdamW."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  config, vlm_config = vlm_config_for(case)
  _, _, batch_size, seq_len = CASES[case]
  hf = hf_config.vlm_config_to_hf(vlm_config)
  hf._attn_implementation = 'sdpa'  # pylint: disable=protected-access
  model = transformers.LlavaForConditionalGeneration(hf).train()
  opt = config.optimizer
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2),
                                eps=opt.eps, weight_decay=opt.weight_decay)
  batch = make_batch(vlm_config, batch_size, seq_len)
  labels = np.where(np.roll(batch['loss_mask'], 1, axis=1) > 0, batch['input_ids'], -100)
  inputs = dict(input_ids=torch.from_numpy(batch['input_ids'].astype(np.int64)),
                attention_mask=torch.from_numpy(batch['attention_mask'].astype(np.int64)),
                pixel_values=torch.from_numpy(batch['images'][:, 0].transpose(0, 3, 1, 2).copy()),
                labels=torch.from_numpy(labels.astype(np.int64)))

  def run_one_step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
    optimizer.step()
    return loss.item()

  return run_one_step


def matmul_peak_flops(size=2048, repeats=10):
  """Measured float32 matmul FLOP/s of this machine (jnp.dot, median of `repeats`)."""
  a = jnp.ones((size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / statistics.median(times)


def memory_status(field: str) -> int:
  """A /proc/self/status memory field in bytes: 'VmRSS' (now) or 'VmHWM' (peak) (Linux).

  VmHWM, unlike `getrusage`'s ru_maxrss, does not inherit the parent's peak across exec.
  """
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f'no {field} in /proc/self/status')


def child_peak_rss(case, framework, steps=3):
  """Peak resident memory (bytes) a fresh process adds while running `steps` train steps.

  The child reports its resident memory after imports and its peak at the end; the
  difference is what the model, optimizer state, batch and step take (both children import
  the same libraries).
  """
  output = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f'--child={framework}', f'--case={case}',
       f'--steps={steps}'], capture_output=True, text=True, check=True)
  after_imports, at_end = map(int, output.stdout.strip().splitlines()[-1].split())
  return at_end - after_imports


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', default='benchmarks/results/train_step.json')
  parser.add_argument('--child', choices=('jax', 'torch'))
  parser.add_argument('--case')
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()

  if args.child:
    if args.child == 'torch':
      import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    jax.devices()  # both children start the JAX runtime before the baseline
    after_imports = memory_status('VmRSS')
    run_one_step = jax_runner(args.case)[0] if args.child == 'jax' else torch_runner(args.case)
    for _ in range(args.steps):
      run_one_step()
    print(after_imports, memory_status('VmHWM'))
    return

  peak = matmul_peak_flops()
  print(f'matmul peak (2048^2 float32, jnp.dot): {peak / 1e9:.0f} GFLOP/s')
  rows = []
  for case in args.cases.split(','):
    _, _, batch_size, seq_len = CASES[case]
    jax_step, info = jax_runner(case)
    plain_step, _ = jax_runner(case, plain_matmul=True)
    torch_step = torch_runner(case)
    for run_one_step in (jax_step, plain_step, torch_step):  # warm-up
      run_one_step()
    jax_times, plain_times, torch_times = [], [], []
    for _ in range(args.rounds):
      for run_one_step, times in ((jax_step, jax_times), (plain_step, plain_times),
                                  (torch_step, torch_times)):
        start = time.perf_counter()
        run_one_step()  # returns a host float: the step has finished
        times.append(time.perf_counter() - start)
    jax_time, torch_time = statistics.median(jax_times), statistics.median(torch_times)
    plain_time = statistics.median(plain_times)
    tokens = batch_size * seq_len
    rows.append(dict(
        case=case, params_m=info['params'] / 1e6, batch=f'{batch_size}x{seq_len}',
        jax_s_per_step=jax_time, torch_s_per_step=torch_time,
        jax_plain_matmul_s_per_step=plain_time,
        jax_steps_per_s=1 / jax_time, jax_tokens_per_s=tokens / jax_time,
        torch_tokens_per_s=tokens / torch_time, torch_over_jax=torch_time / jax_time,
        jax_fraction_of_matmul_peak=info['flops'] / jax_time / peak,
        jax_compiled_bytes=info['compiled_bytes'],
        jax_peak_rss_bytes=child_peak_rss(case, 'jax'),
        torch_peak_rss_bytes=child_peak_rss(case, 'torch')))

  header = ('case', 'params', 'batch', 'ours s/step', 'plain-dot s/step', 'torch s/step',
            'torch/ours',
            'ours tok/s', 'of peak', 'ours +RSS', 'torch +RSS')
  print(' | '.join(header))
  for row in rows:
    print(' | '.join((row['case'], f"{row['params_m']:.1f}M", row['batch'],
                      f"{row['jax_s_per_step']:.4f}",
                      f"{row['jax_plain_matmul_s_per_step']:.4f}",
                      f"{row['torch_s_per_step']:.4f}",
                      f"{row['torch_over_jax']:.2f}x", f"{row['jax_tokens_per_s']:.0f}",
                      f"{row['jax_fraction_of_matmul_peak']:.0%}",
                      f"{row['jax_peak_rss_bytes'] / 2**20:.0f} MiB",
                      f"{row['torch_peak_rss_bytes'] / 2**20:.0f} MiB")))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(matmul_peak_flops=peak, device=str(jax.devices()[0]), rows=rows), f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
