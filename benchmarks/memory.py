r"""Train-step memory of full fine-tuning, LoRA and QLoRA (int8, NF4) on one model size.

For each variant: bytes of parameters, of gradients (trainable parameters only), of optimizer
state, and the compiled step's peak memory from XLA's `memory_analysis()` (arguments + outputs
- donated aliases + temporaries). Nothing is allocated: the step is lowered on abstract
shapes. Prints a table and writes JSON.

  python benchmarks/memory.py --model=small --out=benchmarks/results/memory.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import optax

from configs import sft
from openvlm_jax import (
  config_lib,
  objectives,
  parallel,
)
from openvlm_jax.models.vlm import VLM, dummy_inputs
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib

# name -> (LoRA rank, base dtype of the adapted kernels, trainable recipe)
VARIANTS = {
    'full': (0, 'float32', 'full'),
    'lora': (16, 'float32', 'lora'),
    'qlora-int8': (16, 'int8', 'lora'),
    'qlora-nf4': (16, 'nf4', 'lora'),
}
IMAGE_TOKEN = 3


def tree_bytes(tree) -> int:
  """Total bytes of the array leaves of a (possibly abstract) pytree."""
  return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def measure(variant: str, model_preset: str, vocab: int, batch_size: int, seq_len: int) -> dict:
  """Compiles one variant's train step on abstract inputs and reads its memory."""
  rank, base_dtype, recipe = VARIANTS[variant]
  config = sft.get_config(f'model={model_preset},recipe={recipe}')
  config.lora.rank, config.lora.alpha, config.lora.base_dtype = rank, 2.0 * rank, base_dtype
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=vocab,
                                           image_token_id=IMAGE_TOKEN, lora=config.lora)
  model = VLM(vlm_config)
  trainable = optimizer_lib.trainable_fn(config.trainable, lora_on=bool(rank))
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, 1000, trainable)
  example = dummy_inputs(vlm_config, 1, seq_len)
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  shardings = state_lib.state_shardings(model, optimizer, example, mesh, config.logical_axis_rules)
  abstract_state = jax.eval_shape(lambda: state_lib.create_train_state(
      model, optimizer, example, shardings, jax.random.key(0)))
  batch = {**dummy_inputs(vlm_config, batch_size, seq_len),
           'targets': np.zeros((batch_size, seq_len), np.int32),
           'loss_mask': np.ones((batch_size, seq_len), np.float32)}
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  train_step = step_lib.make_train_step(model, objectives.get('sft'), optimizer, schedule,
                                        trainable=trainable)
  compiled = jax.jit(train_step, donate_argnums=0).lower(abstract_state, abstract_batch).compile()
  stats = compiled.memory_analysis()
  mask = trainable(abstract_state.params)
  trained, _ = optimizer_lib.split_trainable(abstract_state.params, mask)
  num_trained, num_params = optimizer_lib.count_trainable(abstract_state.params, mask)
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return {
      'variant': variant, 'num_params': num_params, 'num_trained': num_trained,
      'param_bytes': tree_bytes(abstract_state.params), 'grad_bytes': tree_bytes(trained),
      'opt_state_bytes': tree_bytes(abstract_state.opt_state),
      'temp_bytes': int(stats.temp_size_in_bytes), 'peak_bytes': int(peak),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='small')
  parser.add_argument('--vocab', type=int, default=12000)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--out', default='benchmarks/results/memory.json')
  args = parser.parse_args()
  rows = [measure(name, args.model, args.vocab, args.batch_size, args.seq_len)
          for name in args.variants.split(',')]
  mib = 2.0 ** 20
  print(f'model={args.model} vocab={args.vocab} batch={args.batch_size}x{args.seq_len} '
        f'({jax.devices()[0].platform}, jax {jax.__version__}, optax {optax.__version__})')
  header = (f"{'variant':<12}{'params':>10}{'trained':>10}{'param MiB':>11}{'grad MiB':>10}"
            f"{'opt MiB':>9}{'temp MiB':>10}{'peak MiB':>10}")
  print(header)
  for row in rows:
    print(f"{row['variant']:<12}{row['num_params'] / 1e6:>9.2f}M{row['num_trained'] / 1e6:>9.2f}M"
          f"{row['param_bytes'] / mib:>11.1f}{row['grad_bytes'] / mib:>10.1f}"
          f"{row['opt_state_bytes'] / mib:>9.1f}{row['temp_bytes'] / mib:>10.1f}"
          f"{row['peak_bytes'] / mib:>10.1f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'model': args.model, 'vocab': args.vocab, 'batch_size': args.batch_size,
               'seq_len': args.seq_len, 'rows': rows}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
