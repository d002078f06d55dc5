r"""Decode speed: our jitted prefill + KV-cache decoding against transformers' `generate`.

One random LLaVA (the ~20M-parameter 'small' preset: 6-layer LLM, small CLIP tower) is built in
transformers, saved, and loaded into our VLM, so both decode with the same weights. Each
framework answers the same batch of image + text prompts greedily for a fixed number of new
tokens (no early stop), timed end to end (vision tower, prefill, decode), in alternation in one
process so the machine's phases hit both alike. Reports new tokens per second at each batch
size, the ratio, and whether the greedy tokens agree. Prints a table and writes JSON.

  python benchmarks/decode.py --out=benchmarks/results/decode.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # torch threads must not spin-wait
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import torch
import transformers

from configs import sft
from openvlm_jax import config_lib, inference
from openvlm_jax.hf import config as hf_config
from openvlm_jax.hf import io as hf_io
from openvlm_jax.models.vlm import VLM

IMAGE_TOKEN, PAD = 3, 0


def build_models(preset: str, vocab_size: int, folder: str):
  """A random transformers LLaVA of the preset's shape and the same weights in our VLM."""
  config = sft.get_config(f'model={preset}')
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=vocab_size,
                                           image_token_id=IMAGE_TOKEN)
  torch.manual_seed(0)
  hf = hf_config.vlm_config_to_hf(vlm_config)
  hf._attn_implementation = 'sdpa'  # pylint: disable=protected-access
  hf_model = transformers.LlavaForConditionalGeneration(hf).eval()
  hf_model.save_pretrained(folder)
  ours_config, params = hf_io.load_pretrained(folder)
  return hf_model, VLM(ours_config), params, ours_config


def make_prompts(vlm_config, batch_size: int, text_len: int, seed: int = 0):
  """Left-padded prompts [bos, image tokens, text] of varied lengths, and their images."""
  rng = np.random.default_rng(seed)
  num_image_tokens = vlm_config.vision.num_image_tokens
  rows = [[1] + [IMAGE_TOKEN] * num_image_tokens
          + list(rng.integers(4, vlm_config.llm.vocab_size, text_len - row % 4))
          for row in range(batch_size)]
  input_ids, attention_mask = inference.left_pad(rows, PAD)
  size = vlm_config.vision.image_size
  images = rng.normal(size=(batch_size, 1, size, size, 3)).astype(np.float32)
  return input_ids, attention_mask, images


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--vocab', type=int, default=12000)
  parser.add_argument('--batch_sizes', default='1,8')
  parser.add_argument('--text_len', type=int, default=16)
  parser.add_argument('--new_tokens', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', default='benchmarks/results/decode.json')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())

  with tempfile.TemporaryDirectory() as folder:
    hf_model, model, params, vlm_config = build_models(args.preset, args.vocab, folder)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  sampling = inference.SamplingConfig(max_new_tokens=args.new_tokens, pad_token_id=PAD)
  generate = inference.make_generate_fn(model, sampling)
  rows = []
  for batch_size in map(int, args.batch_sizes.split(',')):
    input_ids, attention_mask, images = make_prompts(vlm_config, batch_size, args.text_len)
    torch_inputs = {
        'input_ids': torch.from_numpy(input_ids.astype(np.int64)),
        'attention_mask': torch.from_numpy(attention_mask.astype(np.int64)),
        'pixel_values': torch.from_numpy(images[:, 0].transpose(0, 3, 1, 2).copy())}

    def run_ours(inputs=(input_ids, attention_mask, images)):
      return np.asarray(generate(params, *inputs)['tokens'])

    def run_torch(inputs=torch_inputs, prompt_len=input_ids.shape[1]):
      with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False,
                                pad_token_id=PAD)
      return out[:, prompt_len:].numpy()

    start = time.perf_counter()
    ours_tokens = run_ours()  # compiles
    compile_s = time.perf_counter() - start
    torch_tokens = run_torch()
    times = {'ours': [], 'torch': []}
    for _ in range(args.rounds):
      for name, run in (('ours', run_ours), ('torch', run_torch)):
        start = time.perf_counter()
        run()  # both return host arrays: decoding has finished
        times[name].append(time.perf_counter() - start)
    ours_s, torch_s = statistics.median(times['ours']), statistics.median(times['torch'])
    new_tokens = batch_size * args.new_tokens
    rows.append({
        'batch': batch_size, 'prompt_len': int(input_ids.shape[1]), 'new_tokens': args.new_tokens,
        'ours_s': ours_s, 'torch_s': torch_s, 'ours_tokens_per_s': new_tokens / ours_s,
        'torch_tokens_per_s': new_tokens / torch_s, 'speedup': torch_s / ours_s,
        'ours_compile_s': compile_s,
        'same_greedy_tokens': float(np.mean(ours_tokens == torch_tokens))})

  print(f'{args.preset}: {num_params / 1e6:.1f}M parameters, vocab {args.vocab}, '
        f'{args.new_tokens} new tokens, float32, {jax.devices()[0].platform}')
  print('batch | prompt | ours tok/s | generate tok/s | ours/generate | same tokens | '
        'ours compile s')
  for row in rows:
    print(' | '.join((str(row['batch']), str(row['prompt_len']), f"{row['ours_tokens_per_s']:.0f}",
                      f"{row['torch_tokens_per_s']:.0f}", f"{row['speedup']:.2f}x",
                      f"{row['same_greedy_tokens']:.0%}", f"{row['ours_compile_s']:.1f}")))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'preset': args.preset, 'params': num_params, 'vocab': args.vocab,
               'device': str(jax.devices()[0]), 'torch_threads': torch.get_num_threads(),
               'rows': rows}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
