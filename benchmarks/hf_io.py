r"""Hugging Face import and export of a ~1.1B-parameter LLaVA: time and peak host memory.

Builds a random `LlavaForConditionalGeneration` (Llama decoder: hidden 2048, 16 layers,
16 heads, intermediate 5504, vocab 32000; a small CLIP tower) once and saves it with
transformers (sharded safetensors). Then, each in a fresh child process:
  import: `hf_io.load_pretrained(folder)` -> params on the (CPU) device;
  export: random params of the same shapes on the device -> `hf_io.save_pretrained`.
A child reports its resident memory before the measured call (after imports, and for the
export after its params exist) and its peak (VmHWM); the goal is a peak of about one
copy of the model above that. Prints a table and writes JSON.

  python benchmarks/hf_io.py --out=benchmarks/results/hf_io.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def _memory_status(field: str) -> int:
  """A /proc/self/status memory field in bytes (Linux reports KiB)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f'no {field} in /proc/self/status')


def rss_bytes() -> int:
  """Current resident set size of this process."""
  return _memory_status('VmRSS')


def peak_rss_bytes() -> int:
  """Peak resident set size of this process so far.

  VmHWM, not getrusage's ru_maxrss: a child started by exec inherits its parent's ru_maxrss.
  """
  return _memory_status('VmHWM')


def build_checkpoint(folder: str, args: argparse.Namespace) -> dict:
  """Saves a random LLaVA of the requested size with transformers; returns its counts."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  text_config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.heads, max_position_embeddings=4096)
  vision_config = transformers.CLIPVisionConfig(
      hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
      image_size=224, patch_size=32)
  config = transformers.LlavaConfig(
      text_config=text_config, vision_config=vision_config, image_token_index=3,
      vision_feature_layer=-2, vision_feature_select_strategy='default',
      image_seq_length=(224 // 32) ** 2)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  num_params = sum(param.numel() for param in model.parameters())
  model.save_pretrained(folder, max_shard_size=args.hf_shard_size)
  return dict(num_params=num_params)


def child(mode: str, folder: str, out_folder: str, dtype: str, shard_size: str) -> dict:
  """One measured call in this (fresh) process; returns times and memory."""
  import jax  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, ROOT)
  from openvlm_jax.hf import convert  # pylint: disable=g-import-not-at-top
  from openvlm_jax.hf import io as hf_io  # pylint: disable=g-import-not-at-top

  config = hf_io.load_config(folder)
  result = dict(mode=mode, rss_after_imports=rss_bytes())
  if mode == 'import':
    start = time.perf_counter()
    _, params = hf_io.load_pretrained(folder)
    jax.block_until_ready(params)
    result['seconds'] = time.perf_counter() - start
  else:
    # Filled on the device with no temporaries: anything larger here would set the peak
    # before the measured call. The values do not matter to the writer.
    params = jax.tree.map(lambda leaf: jax.jit(lambda: jax.numpy.full(
        leaf.shape, 0.02, leaf.dtype))(), convert.abstract_params(config))
    jax.block_until_ready(params)
    result['rss_with_params'] = rss_bytes()
    result['peak_rss_before_call'] = peak_rss_bytes()
    start = time.perf_counter()
    hf_io.save_pretrained(config, params, out_folder, dtype=dtype, max_shard_size=shard_size)
    result['seconds'] = time.perf_counter() - start
  result['param_bytes'] = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  result['num_params'] = sum(leaf.size for leaf in jax.tree.leaves(params))
  result['peak_rss'] = peak_rss_bytes()
  return result


def run_child(mode: str, folder: str, out_folder: str, dtype: str, shard_size: str) -> dict:
  """Runs `child` in a new interpreter (so its peak memory is its own) and returns its JSON."""
  command = [sys.executable, os.path.abspath(__file__), f'--child={mode}', f'--folder={folder}',
             f'--export_dir={out_folder}', f'--dtype={dtype}', f'--shard_size={shard_size}']
  env = dict(os.environ, JAX_PLATFORMS='cpu', TOKENIZERS_PARALLELISM='false')
  env.pop('XLA_FLAGS', None)  # one CPU device, as a single-host import would use per device
  output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
  return json.loads(output.strip().splitlines()[-1])


def folder_bytes(folder: str) -> int:
  """Total size of the safetensors files in a folder."""
  return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
             if name.endswith('.safetensors'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks/results/hf_io.json'))
  parser.add_argument('--folder', default='', help='reuse (or build into) this HF folder')
  parser.add_argument('--hidden', type=int, default=2048)
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--intermediate', type=int, default=5504)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--hf_shard_size', default='1GB', help='shards of the transformers save')
  parser.add_argument('--shard_size', default='5GB', help='shards of our export')
  parser.add_argument('--dtypes', default='float32,bfloat16', help='export dtypes to measure')
  # Internal: the measured child processes.
  parser.add_argument('--child', default='', choices=['', 'import', 'export'])
  parser.add_argument('--export_dir', default='')
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.folder, args.export_dir, args.dtype,
                           args.shard_size)))
    return

  scratch = tempfile.mkdtemp(prefix='hf_io_bench_')
  folder = args.folder or os.path.join(scratch, 'llava')
  try:
    info = {}
    if not os.path.exists(os.path.join(folder, 'config.json')):
      start = time.perf_counter()
      info = build_checkpoint(folder, args)
      print(f"built {info['num_params'] / 1e9:.2f}B-parameter LLaVA in "
            f'{time.perf_counter() - start:.0f} s: {folder}')
    checkpoint_bytes = folder_bytes(folder)
    rows = [dict(run_child('import', folder, '', 'float32', args.shard_size),
                 dtype='float32')]
    for dtype in args.dtypes.split(','):
      export_dir = os.path.join(scratch, f'export-{dtype}')
      row = run_child('export', folder, export_dir, dtype, args.shard_size)
      row.update(dtype=dtype, written_bytes=folder_bytes(export_dir))
      rows.append(row)
      shutil.rmtree(export_dir)
  finally:
    if not args.folder:
      shutil.rmtree(scratch, ignore_errors=True)

  print(f'checkpoint: {checkpoint_bytes / GIB:.2f} GiB of safetensors')
  header = (f"{'call':<18}{'seconds':>9}{'GiB/s':>8}{'model GiB':>11}{'RSS before':>12}"
            f"{'peak RSS':>10}{'peak - before':>15}{'/ model':>9}")
  print(header)
  print('-' * len(header))
  for row in rows:
    before = row.get('rss_with_params', row['rss_after_imports'])
    moved = row.get('written_bytes', checkpoint_bytes)
    row['peak_minus_before'] = row['peak_rss'] - before
    print(f"{row['mode'] + ' ' + row['dtype']:<18}{row['seconds']:>9.1f}"
          f"{moved / GIB / row['seconds']:>8.2f}{row['param_bytes'] / GIB:>11.2f}"
          f"{before / GIB:>12.2f}{row['peak_rss'] / GIB:>10.2f}"
          f"{row['peak_minus_before'] / GIB:>15.2f}"
          f"{row['peak_minus_before'] / row['param_bytes']:>9.2f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(checkpoint_bytes=checkpoint_bytes, sizes=dict(
        hidden=args.hidden, layers=args.layers, heads=args.heads,
        intermediate=args.intermediate, vocab=args.vocab), **info, rows=rows), f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
