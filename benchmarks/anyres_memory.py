r"""Memory per device of a LLaVA-OneVision-0.5B-size train step at 1, 4 and 9 anyres tiles.

The model is LLaVA-OneVision-0.5B's shape (Qwen2-0.5B decoder, SigLIP-so400m/14 tower at 384
px, anyres_max_9). A square image of 384, 768 or 1152 px is tiled into 1, 4 or 9 crops plus the
base view; its token count comes from `data/anyres.feature_layout`, and each row holds one such
image and 128 text tokens. As in `sharding_memory.py`, nothing is materialised: the step is
compiled for 8 simulated CPU devices (fsdp = 8, one row per device) and XLA's
`memory_analysis()` says what each device would hold.

  python benchmarks/anyres_memory.py [--tiles 1,4,9] [--out benchmarks/results/anyres_memory.json]

Prints a table and writes JSON. On a 2-core CPU each compile takes a few minutes.
"""

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from benchmarks import sharding_memory  # noqa: E402
from configs import sft  # noqa: E402
from openvlm_jax import config_lib  # noqa: E402
from openvlm_jax.data import anyres  # noqa: E402

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's config.json.
QWEN2_05B = dict(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_layers=24,
                 num_heads=14, num_kv_heads=2, qkv_bias=True, tie_embeddings=True,
                 rope_theta=1e6, family='qwen2')
SIGLIP_SO400M = dict(kind='siglip', image_size=384, patch_size=14, hidden_size=1152,
                     intermediate_size=4304, num_layers=26, num_heads=16, feature_layer=-1,
                     feature_select='full', image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
TEXT_TOKENS = 128


def onevision_config(remat: str):
  """(the recipe, our VLMConfig) of a OneVision-0.5B-size model, bf16 compute."""
  config = sft.get_config('model=tiny')
  config.model.dtype = 'bfloat16'
  config.model.remat = remat
  base = config_lib.build_vlm_config(config.model, vocab_size=QWEN2_05B['vocab_size'],
                                     image_token_id=151646)
  vlm_config = dataclasses.replace(
      base, llm=dataclasses.replace(base.llm, **QWEN2_05B),
      vision=dataclasses.replace(base.vision, **SIGLIP_SO400M),
      image_grid_pinpoints=PINPOINTS, anyres_max_crops=9)
  return config, vlm_config


def example_row(vlm_config, tiles: int) -> tuple[dict, int, int]:
  """(one row of model inputs, its image tokens, its views) for a square image of `tiles`."""
  side = 384 * int(round(tiles ** 0.5))
  vision = vlm_config.vision
  layout = anyres.feature_layout(side, side, pinpoints=PINPOINTS, crop_size=vision.image_size,
                                 patch_size=vision.patch_size, max_crops=9)
  views = anyres.num_views(side, side, pinpoints=PINPOINTS, crop_size=vision.image_size)
  seq = len(layout) + TEXT_TOKENS
  size = vision.image_size
  row = dict(input_ids=jnp.zeros((1, seq), jnp.int32),
             images=jnp.zeros((1, views, size, size, 3), jnp.float32),
             positions=jnp.zeros((1, seq), jnp.int32),
             attention_mask=jnp.ones((1, seq), jnp.int32),
             image_feature_index=jnp.zeros((1, seq, anyres.BILINEAR_TAPS), jnp.int32),
             image_feature_weight=jnp.zeros((1, seq, anyres.BILINEAR_TAPS), jnp.float32))
  return row, len(layout), views


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiles', default='1,4,9')
  parser.add_argument('--remat', default='full', choices=['none', 'full', 'dots'])
  parser.add_argument('--out', default='benchmarks/results/anyres_memory.json')
  args = parser.parse_args()
  config, vlm_config = onevision_config(args.remat)
  print(f'OneVision-0.5B shape, 8 devices, fsdp 8, global batch 8 (one row per device), '
        f'remat={args.remat}, bf16 compute, f32 params + AdamW')
  print(f"{'tiles':>5} {'views':>5} {'img tok':>7} {'seq':>6} {'state/dev':>10} "
        f"{'temp':>7} {'peak/dev':>9}  (GiB)")
  results = []
  for tiles in [int(value) for value in args.tiles.split(',')]:
    row, image_tokens, views = example_row(vlm_config, tiles)
    config.data.seq_len = row['input_ids'].shape[1]
    measured = sharding_memory.measure(config, 8, 8, vlm_config=vlm_config, example=row)
    measured.update(tiles=tiles, views=views, image_tokens=image_tokens,
                    seq_len=config.data.seq_len)
    results.append(measured)
    print(f"{tiles:>5} {views:>5} {image_tokens:>7} {config.data.seq_len:>6} "
          f"{measured['argument_gib']:>10.2f} {measured['temp_gib']:>7.2f} "
          f"{measured['peak_gib']:>9.2f}   [{measured['num_params'] / 1e9:.2f}B params, "
          f"compiled in {measured['compile_seconds']:.0f} s]", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(model='llava-onevision-0.5b shape', remat=args.remat, rows=results), f,
              indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
