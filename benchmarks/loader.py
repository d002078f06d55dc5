r"""Does the loader keep up with the step? JSONL + JPEG files against ArrayRecord, per host.

The records are LLaVA conversations over real photos (crops of scikit-learn's two sample
JPEGs at 256-640 px, saved as JPEG at quality 90, like the COCO images of LLaVA-665K).
They are written as JSONL + one file per image and converted once to ArrayRecord
(`openvlm_jax.data.convert`). For each image size, source and Grain worker count, the real
training iterator (`pipeline.make_iterator`: validation, shuffling, decoding, resizing,
tokenized batches) is timed after two warm-up batches; settings alternate over rounds, and
medians are reported. MB/s counts the stored bytes read per example (JSON line + image).

The demand is what our jitted train step consumes on this host at the same image size: a
~20M-parameter LLM (configs `small`) with a CLIP tower (patch 16) at that size, batch 8.

  python benchmarks/loader.py --out=benchmarks/results/loader.json
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
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn import datasets as sk_datasets  # noqa: E402

from configs import sft  # noqa: E402
from openvlm_jax import config_lib, objectives, parallel  # noqa: E402
from openvlm_jax.data import convert, pipeline, sources  # noqa: E402
from openvlm_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from openvlm_jax.models.vlm import VLM  # noqa: E402
from openvlm_jax.training import optimizer as optimizer_lib  # noqa: E402
from openvlm_jax.training import state as state_lib  # noqa: E402
from openvlm_jax.training import step as step_lib  # noqa: E402

QUESTIONS = ('What is shown in the picture?', 'Describe the colours.', 'Where was it taken?')
ANSWERS = ('A temple roof among trees.', 'Red petals over green leaves.', 'Outdoors, by day.')


def write_photo_dataset(folder: str, count: int, seed: int = 0) -> str:
  """`count` one-image records over JPEG crops of the sample photos; returns the JSONL path."""
  rng = np.random.default_rng(seed)
  photos = sk_datasets.load_sample_images().images  # two uint8 [427, 640, 3]
  os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
  path = os.path.join(folder, 'train.jsonl')
  with open(path, 'w') as f:
    for index in range(count):
      photo = photos[index % len(photos)]
      height = int(rng.integers(256, photo.shape[0] + 1))
      width = int(rng.integers(256, photo.shape[1] + 1))
      top = int(rng.integers(0, photo.shape[0] - height + 1))
      left = int(rng.integers(0, photo.shape[1] - width + 1))
      name = f'images/{index:05d}.jpg'
      Image.fromarray(photo[top:top + height, left:left + width]).save(
          os.path.join(folder, name), quality=90)
      turn = int(rng.integers(len(QUESTIONS)))
      f.write(json.dumps({'id': f'p{index}', 'image': name, 'conversations': [
          {'from': 'human', 'value': f'<image>\n{QUESTIONS[turn]}'},
          {'from': 'gpt', 'value': ANSWERS[turn]}]}) + '\n')
  return path


def bytes_per_example(path: str) -> float:
  """Mean stored bytes of a record: its JSON line plus its image file."""
  total = 0
  source = sources.open_source(path)
  for index in range(len(source)):
    record = source[index]
    total += sum(os.path.getsize(image) for image in record['image_paths'])
  return (total + os.path.getsize(path)) / len(source)


def step_examples_per_s(image_size: int, vocab_size: int, batch_size: int = 8,
                        steps: int = 4) -> float:
  """Examples/s our jitted train step consumes: the `small` LLM, a CLIP tower at `image_size`."""
  config = sft.get_config('model=small')
  config.model.vision.image_size = image_size
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=vocab_size,
                                           image_token_id=3)
  seq_len = vlm_config.vision.num_image_tokens + 64
  rng = np.random.default_rng(0)
  input_ids = rng.integers(4, vocab_size, (batch_size, seq_len)).astype(np.int32)
  input_ids[:, 1:1 + vlm_config.vision.num_image_tokens] = 3
  batch = dict(input_ids=input_ids, targets=np.roll(input_ids, -1, axis=1),
               loss_mask=np.ones((batch_size, seq_len), np.float32),
               attention_mask=np.ones((batch_size, seq_len), np.int32),
               positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
               prefix_len=np.zeros((batch_size,), np.int32),
               images=rng.normal(size=(batch_size, 1, image_size, image_size, 3)).astype(
                   np.float32), num_images=np.ones((batch_size,), np.int32))
  model = VLM(vlm_config)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, num_steps=10_000)
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  example = {name: batch[name][:1] for name in step_lib.MODEL_INPUTS}
  shardings = state_lib.state_shardings(model, optimizer, example, mesh, config.logical_axis_rules)
  state = state_lib.create_train_state(model, optimizer, example, shardings, jax.random.key(0))
  step_fn = jax.jit(step_lib.make_train_step(model, objectives.get('sft'), optimizer, schedule),
                    donate_argnums=0)
  batch = jax.device_put(batch)
  state, metrics = step_fn(state, batch)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return batch_size / statistics.median(times)


def time_loader(name: str, image_size: int, workers: int, tokenizer, batch_size: int,
                batches: int) -> dict:
  """Startup seconds and steady examples/s of the training iterator over `name`."""
  start = time.perf_counter()
  iterator = pipeline.make_iterator(
      [name], tokenizer=tokenizer, image_size=image_size, image_mean=(0.5,) * 3,
      image_std=(0.5,) * 3, num_image_tokens=16, seq_len=64, max_images=1,
      batch_size=batch_size, seed=0, worker_count=workers)
  try:
    for _ in range(2):  # warm-up: workers started, buffers filled
      next(iterator)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    seconds = time.perf_counter() - start
  finally:
    if workers:
      iterator.close()
  return {'startup_s': startup, 'examples_per_s': batches * batch_size / seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--records', type=int, default=512)
  parser.add_argument('--sizes', default='224,336')
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--batches', type=int, default=32, help='timed batches per setting')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  flags.FLAGS(sys.argv[:1])  # Grain worker processes read absl flags

  folder = tempfile.mkdtemp(prefix='loader_bench_')
  path = write_photo_dataset(folder, args.records)
  start = time.perf_counter()
  convert.convert_jsonl({'train': [path]}, os.path.join(folder, 'ar'), show_progress=False)
  convert_s = time.perf_counter() - start
  names = {'jsonl': path, 'arrayrecord': os.path.join(folder, 'ar') + ':train'}
  example_bytes = bytes_per_example(path)
  tokenizer = tokenizer_lib.train_tokenizer(list(QUESTIONS + ANSWERS) * 20,
                                            os.path.join(folder, 'tokenizer'))
  sizes = [int(size) for size in args.sizes.split(',')]
  worker_counts = [int(count) for count in args.workers.split(',')]

  runs = {}
  for _ in range(args.rounds):  # settings alternate, so the machine's phases hit all alike
    for size in sizes:
      for source in names:
        for workers in worker_counts:
          result = time_loader(names[source], size, workers, tokenizer, args.batch_size,
                               args.batches)
          runs.setdefault((size, source, workers), []).append(result)
  demand = {size: step_examples_per_s(size, len(tokenizer)) for size in sizes}

  rows = []
  for (size, source, workers), results in runs.items():
    rate = statistics.median(result['examples_per_s'] for result in results)
    rows.append({'image_size': size, 'source': source, 'workers': workers,
                 'examples_per_s': rate, 'mb_per_s': rate * example_bytes / 1e6,
                 'startup_s': statistics.median(result['startup_s'] for result in results),
                 'step_demand_examples_per_s': demand[size],
                 'loader_over_demand': rate / demand[size]})
  print(f'{args.records} records, {example_bytes / 1e3:.1f} kB per example stored; '
        f'conversion to ArrayRecord {convert_s:.1f} s')
  print(f"{'size':>5} {'source':>12} {'workers':>8} {'examples/s':>11} {'MB/s':>7} "
        f"{'startup s':>10} {'step needs':>11} {'loader/step':>12}")
  for row in rows:
    print(f"{row['image_size']:5d} {row['source']:>12} {row['workers']:8d} "
          f"{row['examples_per_s']:11.1f} {row['mb_per_s']:7.2f} {row['startup_s']:10.2f} "
          f"{row['step_demand_examples_per_s']:11.1f} {row['loader_over_demand']:11.1f}x")
  for size in sizes:
    rate = {source: max(row['examples_per_s'] for row in rows
                        if row['image_size'] == size and row['source'] == source)
            for source in names}
    print(f'{size} px: ArrayRecord / JSONL (best worker count each) '
          f"{rate['arrayrecord'] / rate['jsonl']:.2f}x")
  if args.out:
    result = {'machine': f'{os.cpu_count()} CPU cores, jax {jax.__version__}',
              'records': args.records, 'batch_size': args.batch_size,
              'timed_batches': args.batches, 'rounds': args.rounds,
              'bytes_per_example': example_bytes, 'convert_s': convert_s,
              'step_model': 'configs/sft.py model=small, CLIP tower patch 16, batch 8',
              'rows': rows}
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
      f.write('\n')
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
