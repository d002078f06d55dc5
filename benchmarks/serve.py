r"""Serving load: requests/s, tokens/s and latency at 1, 8 and 32 concurrent clients, batched
against one request at a time, through the real HTTP server and the official `openai` client.

A tiny model (configs/sft.py:model=tiny) is trained for 2 steps into a scratch workdir, then
served twice on 127.0.0.1 from the same params: with batching (`max_batch` rows collected for
`batch_window_ms`) and one request per decoder call (`max_batch=1`, no window). Each client
sends digit-image questions back to back; every request is either answered or refused with a
status, and the counts are reported (nothing may be dropped). Settings alternate per client
count so that both meet the machine in the same state. Bounded: `--requests` per point.

  python benchmarks/serve.py --requests=192 --out=benchmarks/results/serve.json
"""

import argparse
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import openai
import uvicorn

from configs import sft
from openvlm_jax import modes
from openvlm_jax.data import digits
from openvlm_jax.serving import api


def _serve(engine, name):
  """Starts the app on a free loopback port; returns (client, stop function)."""
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(api.make_app(engine, name), host='127.0.0.1',
                                         port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='unused',
                         max_retries=0, timeout=600)

  def stop():
    server.should_exit = True
    thread.join(timeout=30)

  return client, stop


def _load(client, name, data_uris, clients: int, requests: int) -> dict:
  """`requests` questions from `clients` threads; latency, throughput and status counts."""
  def ask(index):
    start = time.perf_counter()
    try:
      reply = client.chat.completions.create(model=name, max_tokens=8, messages=[
          {'role': 'user', 'content': [
              {'type': 'image_url', 'image_url': {'url': data_uris[index % len(data_uris)]}},
              {'type': 'text', 'text': 'What number is shown?'}]}])
      return time.perf_counter() - start, 200, reply.usage.completion_tokens
    except openai.APIStatusError as error:
      return time.perf_counter() - start, error.status_code, 0

  start = time.perf_counter()
  with futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(ask, range(requests)))
  wall = time.perf_counter() - start
  latencies = sorted(latency for latency, status, _ in results if status == 200)
  statuses = {}
  for _, status, _ in results:
    statuses[str(status)] = statuses.get(str(status), 0) + 1
  return {
      'requests_per_s': len(latencies) / wall,
      'tokens_per_s': sum(tokens for _, _, tokens in results) / wall,
      'p50_s': statistics.median(latencies),
      'p99_s': latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
      'statuses': statuses, 'sent': requests,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--clients', default='1,8,32')
  parser.add_argument('--requests', type=int, default=64, help='per point')
  parser.add_argument('--max_batch', type=int, default=8)
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  root = tempfile.mkdtemp(prefix='serve_bench_')
  files = digits.build_digits_dataset(os.path.join(root, 'data'), image_size=16)
  config = sft.get_config('model=tiny,steps=2')
  config.data.train_files, config.data.batch_size = (files['train'],), 8
  config.training.progress_bar = False
  workdir = os.path.join(root, 'workdir')
  modes.train(config, workdir)
  config.tokenizer = os.path.join(workdir, 'tokenizer')
  config.serve.max_new_tokens, config.serve.max_queue = 8, 256
  with open(files['eval']) as f:
    images = [json.loads(line)['image'] for line in f][:16]
  data_uris = []
  for image in images:
    with open(os.path.join(root, 'data', image), 'rb') as f:
      data_uris.append('data:image/png;base64,' + base64.b64encode(f.read()).decode())

  settings = {'batched': (args.max_batch, 5.0), 'one_at_a_time': (1, 0.0)}
  servers = {}
  for label, (max_batch, window_ms) in settings.items():
    config.serve.max_batch, config.serve.batch_window_ms = max_batch, window_ms
    engine, name = modes.serving_engine(config, workdir)
    engine.warm_up(streams=(False,))  # every bucket, as --mode=serve (no streamed variant)
    client, stop = _serve(engine, name)
    servers[label] = (client, name, stop, engine)

  rows = []
  for clients in [int(c) for c in args.clients.split(',')]:
    point = {'clients': clients}
    for label, (client, name, _, _) in servers.items():
      point[label] = _load(client, name, data_uris, clients, args.requests)
    point['batching_speedup'] = (point['batched']['requests_per_s']
                                 / point['one_at_a_time']['requests_per_s'])
    rows.append(point)
  for _, _, stop, _ in servers.values():
    stop()

  print(f"{'clients':>7} {'setting':>14} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7}"
        '  statuses')
  for point in rows:
    for label in settings:
      row = point[label]
      print(f"{point['clients']:>7} {label:>14} {row['requests_per_s']:>7.2f} "
            f"{row['tokens_per_s']:>7.1f} {row['p50_s']:>7.3f} {row['p99_s']:>7.3f}  "
            f"{row['statuses']}")
    print(f"{'':>7} {'speedup':>14} {point['batching_speedup']:>7.2f}x")
  result = {'machine': f'{os.cpu_count()} CPU cores, jax {modes.jax.__version__}',
            'model': 'configs/sft.py:model=tiny (2 steps)', 'max_new_tokens': 8,
            'requests_per_point': args.requests, 'max_batch': args.max_batch, 'points': rows}
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
