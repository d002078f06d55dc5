r"""Packing against padding on data shaped like instruction tuning, interleaved in one run.

The dataset mixes what real VLM instruction sets hold: short image questions with one-word
answers, captions of a sentence or two, and long multi-turn conversations; one image, two,
or none (scikit-learn's digits as the images). Both settings train the same model
(configs/sft.py's demo VLM) from the same initial state through the real pipeline
(`data.packing` on and off) and the real jitted train step; their steps alternate so that
the machine's phases hit both alike. Reported: the padding fraction (token slots that hold
no real token), real target tokens per second (loss-masked tokens, the ones that train),
steps to one epoch, and the speedup of packing in real target tokens per second (over the
timed steps) and in time per epoch (median step time times steps per epoch, which does not
depend on which batches were timed).

  python benchmarks/packing.py --out=benchmarks/results/packing.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import sft  # noqa: E402
from openvlm_jax import config_lib, objectives, parallel  # noqa: E402
from openvlm_jax.data import digits, pipeline  # noqa: E402
from openvlm_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from openvlm_jax.models.vlm import VLM  # noqa: E402
from openvlm_jax.training import optimizer as optimizer_lib  # noqa: E402
from openvlm_jax.training import state as state_lib  # noqa: E402
from openvlm_jax.training import step as step_lib  # noqa: E402

SENTENCES = ('The digit is drawn in thick strokes.', 'It sits in the middle of the grid.',
             'The lower loop is closed.', 'A short bar crosses the stem.',
             'The scan is blurred at the edges.', 'Two strokes meet near the top.')


def _records(image_names: list[str], count: int, seed: int) -> list[dict]:
  """LLaVA records with the length spread of instruction data (see the module docstring)."""
  rng = np.random.default_rng(seed)
  records = []
  for index in range(count):
    kind = rng.choice(['short', 'caption', 'long'], p=[0.5, 0.3, 0.2])
    images = [str(name) for name in rng.choice(image_names, size=rng.choice([0, 1, 2],
                                                                           p=[0.2, 0.6, 0.2]))]
    head = '<image>\n' * len(images)
    if kind == 'short':
      turns = [(head + 'What number is shown?', str(rng.integers(10)))]
    elif kind == 'caption':
      turns = [(head + 'Describe the image.', ' '.join(rng.choice(SENTENCES, rng.integers(1, 3))))]
    else:
      turns = [(head + 'Describe the image.', ' '.join(rng.choice(SENTENCES, 3)))]
      turns += [('And then?', ' '.join(rng.choice(SENTENCES, 2)))
                for _ in range(rng.integers(1, 4))]
    conversations = []
    for question, answer in turns:
      conversations += [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]
    record = {'id': f'r{index}', 'conversations': conversations}
    records.append({**record, 'image': images} if images else record)
  return records


def _write_dataset(folder: str, count: int) -> str:
  digits_files = digits.build_digits_dataset(os.path.join(folder, 'digits'), image_size=32)
  with open(digits_files['train']) as f:
    names = [os.path.join('digits', json.loads(line)['image']) for line in f]
  path = os.path.join(folder, 'mixed.jsonl')
  with open(path, 'w') as f:
    f.writelines(json.dumps(record) + '\n' for record in _records(names, count, seed=0))
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--records', type=int, default=1024)
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--steps', type=int, default=20, help='timed steps per setting')
  parser.add_argument('--pack_max_images', type=int, default=8,
                      help='image slots per packed row (the vision tower runs on each)')
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  folder = tempfile.mkdtemp(prefix='packing_bench_')
  path = _write_dataset(folder, args.records)
  with open(path) as f:
    corpus = [turn['value'].replace('<image>', '') for line in f
              for turn in json.loads(line)['conversations']]
  tokenizer = tokenizer_lib.train_tokenizer(corpus * 4, os.path.join(folder, 'tokenizer'))
  config = sft.get_config()
  vlm_config = config_lib.build_vlm_config(
      config.model, vocab_size=len(tokenizer),
      image_token_id=tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE_TOKEN))
  model, vision = VLM(vlm_config), vlm_config.vision
  spec = dict(tokenizer=tokenizer, image_size=vision.image_size, image_mean=vision.image_mean,
              image_std=vision.image_std, num_image_tokens=vision.num_image_tokens,
              seq_len=args.seq_len, max_images=2, batch_size=args.batch_size, seed=0)

  def epoch_stats(packing: bool) -> dict:
    batches = list(pipeline.make_iterator(
        [path], packing=packing, shuffle=True, num_epochs=1, drop_remainder=False,
        pack_max_images=args.pack_max_images, **spec))
    slots = sum(batch['input_ids'].size for batch in batches)
    real = sum(int((batch['attention_mask'] > 0).sum()) for batch in batches)
    return {'steps_per_epoch': len(batches), 'padding_fraction': 1 - real / slots,
            'target_tokens': sum(float(batch['loss_mask'].sum()) for batch in batches),
            'images_per_row': float(np.mean([b['images'].shape[1] for b in batches]))}

  stats = {'padded': epoch_stats(False), 'packed': epoch_stats(True)}
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, num_steps=10_000)
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  runners = {}
  for name, packing in (('padded', False), ('packed', True)):
    iterator = pipeline.make_iterator([path], packing=packing,
                                      pack_max_images=args.pack_max_images, **spec)
    batches = [next(iterator) for _ in range(args.steps + 2)]
    example = {key: batches[0][key][:1] for key in step_lib.MODEL_INPUTS}
    shardings = state_lib.state_shardings(model, optimizer, example, mesh,
                                          config.logical_axis_rules)
    state = state_lib.create_train_state(model, optimizer, example, shardings,
                                         jax.random.key(0))
    step_fn = jax.jit(step_lib.make_train_step(model, objectives.get('sft'), optimizer,
                                               schedule), donate_argnums=0)
    runners[name] = {'state': state, 'step': step_fn, 'batches': batches, 'times': [],
                     'targets': []}
    for batch in batches[:2]:  # compile, and one warm step
      runners[name]['state'], metrics = step_fn(runners[name]['state'], batch)
      jax.block_until_ready(metrics)
  for index in range(2, args.steps + 2):  # alternate the settings step by step
    for runner in runners.values():
      batch = runner['batches'][index]
      start = time.perf_counter()
      runner['state'], metrics = runner['step'](runner['state'], batch)
      jax.block_until_ready(metrics)
      runner['times'].append(time.perf_counter() - start)
      runner['targets'].append(float(batch['loss_mask'].sum()))
  for name, runner in runners.items():
    seconds = statistics.median(runner['times'])
    stats[name].update(step_s=seconds,
                       target_tokens_per_s=statistics.mean(runner['targets']) / seconds,
                       epoch_s=seconds * stats[name]['steps_per_epoch'])
  speedup = stats['packed']['target_tokens_per_s'] / stats['padded']['target_tokens_per_s']
  epoch_speedup = stats['padded']['epoch_s'] / stats['packed']['epoch_s']
  print(f"{'setting':>8} {'padding':>8} {'steps/epoch':>12} {'step s':>8} {'epoch s':>8} "
        f"{'target tok/s':>13}")
  for name in ('padded', 'packed'):
    row = stats[name]
    print(f"{name:>8} {row['padding_fraction']:8.3f} {row['steps_per_epoch']:12d} "
          f"{row['step_s']:8.4f} {row['epoch_s']:8.1f} {row['target_tokens_per_s']:13.1f}")
  print(f'packing speedup in real target tokens/s: {speedup:.2f}x (timed steps); '
        f'{epoch_speedup:.2f}x in time per epoch (median step time x steps per epoch)')
  if args.out:
    result = {'machine': f'{os.cpu_count()} CPU cores, jax {jax.__version__}',
              'model': 'configs/sft.py demo VLM', 'records': args.records,
              'seq_len': args.seq_len, 'batch_size': args.batch_size, 'timed_steps': args.steps,
              'pack_max_images': args.pack_max_images,
              **stats, 'speedup_target_tokens_per_s': speedup,
              'speedup_epoch_time': epoch_speedup}
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
      f.write('\n')
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
