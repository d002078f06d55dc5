r"""Memory per device of a ~1B-parameter VLM's train step as FSDP grows, from XLA's own numbers.

Nothing is materialised: the step is lowered with ShapeDtypeStructs that carry the shardings and
compiled for 8 simulated CPU devices; `memory_analysis()` reports what each device would hold.
The mesh is data = 8 / fsdp, fsdp, tensor = 1, so the global batch is the same in every row.

  python benchmarks/sharding_memory.py [--fsdp 1,2,4,8] [--out runs/sharding_memory.json]

Prints a table and writes JSON. On a 2-core CPU each compile takes about a minute.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import sft  # noqa: E402
from openvlm_jax import (
  checkpoint,  # noqa: E402
  config_lib,  # noqa: E402
  objectives,  # noqa: E402
  parallel,  # noqa: E402
)
from openvlm_jax.models.vlm import VLM  # noqa: E402
from openvlm_jax.training import optimizer as optimizer_lib  # noqa: E402
from openvlm_jax.training import state as state_lib  # noqa: E402
from openvlm_jax.training import step as step_lib  # noqa: E402

# TinyLlama-1.1B's decoder with a CLIP ViT-B/16 tower at 224 px: ~1.2B parameters.
LLM_1B = dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
              num_kv_heads=4, vocab_size=32000)
VISION_B16 = dict(kind='clip', image_size=224, patch_size=16, hidden_size=768,
                  intermediate_size=3072, num_layers=12, num_heads=12)
GIB = 2 ** 30


def one_billion_config(seq_len: int, remat: str):
  """The SFT recipe with the ~1B model; bfloat16 compute, float32 master weights."""
  config = sft.get_config('model=tiny')
  config.model.llm.update(LLM_1B)
  config.model.vision.update(VISION_B16)
  config.model.dtype = 'bfloat16'
  config.model.remat = remat
  config.data.seq_len = seq_len
  return config


def measure(config, fsdp: int, global_batch: int, vlm_config=None, example=None) -> dict:
  """Compiles the train step on a data=8/fsdp x fsdp mesh; returns per-device bytes.

  `vlm_config` defaults to `config.model`'s; `example` (one row of model inputs) to one image
  and `config.data.seq_len` tokens.
  """
  if vlm_config is None:
    vlm_config = config_lib.build_vlm_config(config.model, vocab_size=LLM_1B['vocab_size'],
                                             image_token_id=LLM_1B['vocab_size'] - 1)
  model = VLM(vlm_config)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, 1000)
  mesh = parallel.make_mesh(dict(data=jax.device_count() // fsdp, fsdp=fsdp, tensor=1))
  seq, size = config.data.seq_len, vlm_config.vision.image_size
  if example is None:
    example = dict(input_ids=jnp.zeros((1, seq), jnp.int32),
                   images=jnp.zeros((1, 1, size, size, 3), jnp.float32),
                   positions=jnp.zeros((1, seq), jnp.int32),
                   attention_mask=jnp.ones((1, seq), jnp.int32))
  shardings = state_lib.state_shardings(model, optimizer, example, mesh,
                                        config.logical_axis_rules)
  abstract_state = checkpoint.abstract_like(
      jax.eval_shape(lambda: state_lib.create_train_state(
          model, optimizer, example, shardings, jax.random.key(0))), shardings)
  batch_sharding = parallel.batch_sharding(mesh)
  rows = {name: jax.ShapeDtypeStruct((global_batch, *value.shape[1:]), value.dtype,
                                     sharding=batch_sharding) for name, value in example.items()}
  rows['targets'] = rows['input_ids']
  rows['loss_mask'] = jax.ShapeDtypeStruct((global_batch, seq), jnp.float32,
                                           sharding=batch_sharding)
  step = jax.jit(step_lib.make_train_step(model, objectives.get('sft'), optimizer, schedule),
                 in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                 donate_argnums=0)
  start = time.perf_counter()
  with parallel.mesh_rules(mesh, config.logical_axis_rules):
    compiled = step.lower(abstract_state, rows).compile()
  stats = compiled.memory_analysis()
  num_params = sum(leaf.size for leaf in jax.tree.leaves(abstract_state.params))
  state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_state))
  return dict(
      fsdp=fsdp, data=jax.device_count() // fsdp, num_params=num_params,
      state_gib_total=state_bytes / GIB,
      argument_gib=stats.argument_size_in_bytes / GIB,
      output_gib=stats.output_size_in_bytes / GIB,
      alias_gib=stats.alias_size_in_bytes / GIB,
      temp_gib=stats.temp_size_in_bytes / GIB,
      # Donated state is aliased to the output, so it is counted once.
      peak_gib=(stats.argument_size_in_bytes + stats.output_size_in_bytes
                - stats.alias_size_in_bytes + stats.temp_size_in_bytes) / GIB,
      compile_seconds=time.perf_counter() - start,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--fsdp', default='1,2,4,8')
  parser.add_argument('--batch', type=int, default=8, help='global batch (rows)')
  parser.add_argument('--seq-len', type=int, default=512)
  parser.add_argument('--remat', default='full', choices=['none', 'full', 'dots'])
  parser.add_argument('--out', default='benchmarks/results/sharding_memory.json')
  args = parser.parse_args()
  config = one_billion_config(args.seq_len, args.remat)
  results = []
  print(f'{jax.device_count()} devices, global batch {args.batch} x {args.seq_len} tokens, '
        f'remat={args.remat}, bf16 compute, f32 params + AdamW')
  print(f"{'fsdp':>4} {'data':>4} {'state/dev':>10} {'temp':>8} {'peak/dev':>9}  (GiB)")
  for fsdp in [int(value) for value in args.fsdp.split(',')]:
    row = measure(config, fsdp, args.batch)
    results.append(row)
    print(f"{row['fsdp']:>4} {row['data']:>4} {row['argument_gib']:>10.2f} "
          f"{row['temp_gib']:>8.2f} {row['peak_gib']:>9.2f}   "
          f"[{row['num_params'] / 1e9:.2f}B params, compiled in {row['compile_seconds']:.0f} s]",
          flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(batch=args.batch, seq_len=args.seq_len, remat=args.remat, rows=results), f,
              indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
