r"""GRPO speed: rollout tokens/s and update steps/s, ours against transformers + peft.

One random LLaVA of the 'small' preset (~20M parameters, 6-layer LLM, small CLIP tower) is
built in transformers, saved and loaded into our VLM, so both sides start from the same
weights. A rollout answers `prompts` image + text prompts `group` times each by sampling
(temperature 1, every token kept, a fixed number of new tokens: no early stop): ours is the
jitted KV-cache sampler, the peer is transformers' `generate(do_sample=True)`, the rollout
path of TRL's GRPOTrainer without vLLM. An update is one GRPO step on those rows with LoRA
rank 16 on the 7 projections of every decoder layer: the policy forward and backward, the reference forward
with the adapters off (beta 0.04, k3), AdamW; ours is `make_train_step` with the `grpo`
objective, the peer the same loss written in torch over a peft model (`disable_adapter()`
for the reference, as TRL does). Timed in alternation in one process; medians. Prints a
table and writes JSON.

  python benchmarks/grpo.py --out=benchmarks/results/grpo.json
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # torch threads must not spin-wait
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402

import decode  # noqa: E402  (benchmarks/decode.py: the shared model and prompts)
from openvlm_jax import inference, objectives, parallel  # noqa: E402
from openvlm_jax.models import lora as lora_lib  # noqa: E402
from openvlm_jax.models.config import LoraConfig  # noqa: E402
from openvlm_jax.models.vlm import VLM  # noqa: E402
from openvlm_jax.training import optimizer as optimizer_lib  # noqa: E402
from openvlm_jax.training import rollout  # noqa: E402
from openvlm_jax.training import state as state_lib  # noqa: E402
from openvlm_jax.training import step as step_lib  # noqa: E402

BETA, EPSILON, LR = 0.04, 0.2, 1e-4
PROJECTIONS = r'.*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'


def our_update(vlm_config, float_params, rows):
  """run_one_update() for our jitted GRPO step with LoRA r16 on the LLM."""
  # The decoder layers' 7 projections, as the peft side (not the lm_head).
  lora_config = LoraConfig(rank=16, alpha=32.0, targets=(r'llm/layers/.*',))
  model = VLM(dataclasses.replace(vlm_config, lora=lora_config))
  example = {name: rows[name][:1] for name in step_lib.MODEL_INPUTS}
  abstract = nn.unbox(state_lib.abstract_boxed_params(model, example))
  params = lora_lib.adapt_params(float_params, abstract, lora_config, jax.random.key(1))
  trainable = optimizer_lib.trainable_fn((), lora_on=True)
  optimizer_config = ml_collections.ConfigDict(dict(
      lr=LR, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      clip_norm=1.0))
  optimizer, schedule = optimizer_lib.make_optimizer(optimizer_config, 10_000, trainable)
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  rules = (('batch', ('data', 'fsdp')),)
  shardings = state_lib.state_shardings(model, optimizer, example, mesh, rules)
  state = state_lib.create_train_state(model, optimizer, example, shardings, jax.random.key(0),
                                       params=params)
  objective = objectives.get(ml_collections.ConfigDict(dict(
      name='grpo', beta=BETA, epsilon=EPSILON, max_new_tokens=rows['new_tokens'])))
  step = jax.jit(step_lib.make_train_step(model, objective, optimizer, schedule,
                                          trainable=trainable), donate_argnums=0)
  batch = jax.device_put({name: value for name, value in rows.items() if name != 'new_tokens'})
  holder = dict(state=state)

  def run_one_update():
    holder['state'], metrics = step(holder['state'], batch)
    return float(metrics['loss'])

  return run_one_update


def torch_update(hf_model, rows):
  """run_one_update() for the same GRPO loss in torch over a peft LoRA r16 model."""
  model = peft.get_peft_model(hf_model, peft.LoraConfig(
      r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)).train()
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                weight_decay=0.0)
  inputs = dict(input_ids=torch.from_numpy(rows['input_ids'].astype(np.int64)),
                attention_mask=torch.from_numpy(rows['attention_mask'].astype(np.int64)),
                pixel_values=torch.from_numpy(rows['images'][:, 0].transpose(0, 3, 1, 2).copy()))
  targets = torch.from_numpy(rows['targets'].astype(np.int64))
  mask = torch.from_numpy(rows['loss_mask'])
  advantages = torch.from_numpy(rows['advantages'])[:, None]

  def logps_of(logits):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]

  def run_one_update():
    optimizer.zero_grad(set_to_none=True)
    logps = logps_of(model(**inputs).logits)
    with torch.no_grad(), model.disable_adapter():
      ref = logps_of(model(**inputs).logits)
    ratio = torch.exp(logps - logps.detach())
    token_loss = -torch.min(ratio * advantages,
                            torch.clamp(ratio, 1 - EPSILON, 1 + EPSILON) * advantages)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    loss = ((token_loss + BETA * kl) * mask).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()

  return run_one_update


def timed(runs: dict, rounds: int) -> dict:
  """Median seconds of each runner, called in alternation `rounds` times after a warm-up."""
  for run in runs.values():
    run()  # compiles / warms up
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--vocab', type=int, default=12000)
  parser.add_argument('--prompts', type=int, default=8)
  parser.add_argument('--group', type=int, default=8)
  parser.add_argument('--text_len', type=int, default=16)
  parser.add_argument('--new_tokens', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', default='benchmarks/results/grpo.json')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)

  with tempfile.TemporaryDirectory() as folder:
    hf_model, model, params, vlm_config = decode.build_models(args.preset, args.vocab, folder)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  input_ids, attention_mask, images = decode.make_prompts(vlm_config, args.prompts, args.text_len)
  input_ids, attention_mask, images = (np.repeat(array, args.group, axis=0)
                                       for array in (input_ids, attention_mask, images))
  rows_count = args.prompts * args.group
  sampling = inference.SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                                      pad_token_id=decode.PAD)
  generate = inference.make_generate_fn(model, sampling)
  torch_inputs = {
      'input_ids': torch.from_numpy(input_ids.astype(np.int64)),
      'attention_mask': torch.from_numpy(attention_mask.astype(np.int64)),
      'pixel_values': torch.from_numpy(images[:, 0].transpose(0, 3, 1, 2).copy())}
  keys = iter(range(1 << 30))

  def ours_rollout():
    return jax.device_get(generate(params, input_ids, attention_mask, images,
                                   jax.random.key(next(keys))))

  def torch_rollout():
    with torch.no_grad():
      return hf_model.generate(**torch_inputs, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, pad_token_id=decode.PAD)

  start = time.perf_counter()
  out = ours_rollout()
  rollout_compile_s = time.perf_counter() - start
  rollout_s = timed({'ours': ours_rollout, 'torch': torch_rollout}, args.rounds)

  rows = rollout.update_rows(input_ids, attention_mask, out['tokens'], out['num_tokens'],
                             images, decode.PAD)
  rows['advantages'] = np.random.default_rng(0).normal(size=rows_count).astype(np.float32)
  rows['new_tokens'] = args.new_tokens
  update_s = timed({'ours': our_update(vlm_config, params, rows),
                    'torch': torch_update(hf_model, rows)}, args.rounds)

  new_tokens = rows_count * args.new_tokens
  result = {
      'preset': args.preset, 'params': num_params, 'vocab': args.vocab,
      'prompts': args.prompts, 'group': args.group, 'rows': rows_count,
      'prompt_len': int(input_ids.shape[1]), 'new_tokens': args.new_tokens,
      'device': str(jax.devices()[0]), 'torch_threads': torch.get_num_threads(),
      'rollout': {'ours_s': rollout_s['ours'], 'torch_s': rollout_s['torch'],
                  'ours_tokens_per_s': new_tokens / rollout_s['ours'],
                  'torch_tokens_per_s': new_tokens / rollout_s['torch'],
                  'speedup': rollout_s['torch'] / rollout_s['ours'],
                  'ours_compile_s': rollout_compile_s},
      'update': {'ours_s': update_s['ours'], 'torch_s': update_s['torch'],
                 'ours_steps_per_s': 1 / update_s['ours'],
                 'torch_steps_per_s': 1 / update_s['torch'],
                 'speedup': update_s['torch'] / update_s['ours']},
  }
  print(f"{args.preset}: {num_params / 1e6:.1f}M parameters, {rows_count} answers "
        f"({args.prompts} prompts x {args.group}), prompt {result['prompt_len']} tokens, "
        f'{args.new_tokens} new tokens, float32, {jax.devices()[0].platform}')
  print('phase | ours | transformers + peft | ours / peer')
  r, u = result['rollout'], result['update']
  print(f"rollout tokens/s | {r['ours_tokens_per_s']:.0f} | {r['torch_tokens_per_s']:.0f} | "
        f"{r['speedup']:.2f}x")
  print(f"update steps/s | {u['ours_steps_per_s']:.2f} | {u['torch_steps_per_s']:.2f} | "
        f"{u['speedup']:.2f}x")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
