r"""The study: cross-entropy alone against CE + NTL (was, mse), same budget, several seeds.

For each task, objective and seed one run trains from scratch through `main.py`'s own train
mode, then its held-out split is scored on generated answers. Tasks:
  sum     configs/quantitative.py (digits sums; the held-out split has unseen digits only)
  charts  configs/charts.py (trains on the train tables; scored on the held-out test tables)
lambda (`--config.objective.ntl_weight`) is chosen per NTL kind by `--sweep` on the charts
validation tables (never on a test split) and then used for both tasks. Prints a table
(mean and spread over seeds of relaxed accuracy, exact match and mean relative error) and
writes JSON.

  python benchmarks/ntl_vs_ce.py --tasks=sum,charts --seeds=0,1,2 --sweep=0.1,0.3,1.0 \
      --steps=sum:2500,charts:300 --sweep_steps=300 --out=benchmarks/results/ntl_vs_ce.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from configs import charts, quantitative  # noqa: E402
from openvlm_jax import config_lib, modes  # noqa: E402
from openvlm_jax.data import charts as charts_data  # noqa: E402
from openvlm_jax.data import digits  # noqa: E402

CONFIGS = {'sum': quantitative, 'charts': charts}
VARIANTS = {'ce': ('sft', 'was'), 'ce+ntl-was': ('quantitative', 'was'),
            'ce+ntl-mse': ('quantitative', 'mse')}
SCORES = ('relaxed_accuracy', 'exact_match', 'mean_relative_error')


def run_config(task: str, variant: str, seed: int, steps: int, weight: float):
  """The config of one run: the task's recipe with the variant's objective and the seed."""
  objective, kind = VARIANTS[variant]
  arg = f'objective={objective},kind={kind}' + (f',steps={steps}' if steps else '')
  config = CONFIGS[task].get_config(arg)
  steps = config.training.num_steps
  with config.unlocked():
    config.seed = seed
    config.data.shuffle_seed = seed
    config.objective.ntl_weight = weight
    config.training.eval_every = steps  # one eval, at the end
    config.training.checkpoint_every = steps
    config.training.progress_bar = False
  config_lib.check_config(config)
  return config


def task_files(task: str, workroot: str) -> dict[str, str]:
  """The task's data, built once for all runs: {'train', 'val', 'test'} JSONL paths.

  sum: the held-out digits serve as both 'val' and 'test' (the digits set has no third split;
  lambda is therefore chosen on the charts' val tables only).
  """
  folder = os.path.join(workroot, f'{task}-data')
  if task == 'charts':
    return charts_data.build_chart_dataset(folder)
  config = run_config('sum', 'ce', 0, 0, 0.0)
  paths = digits.build_digits_dataset(
      folder, task='sum', image_size=config.model.vision.image_size,
      train_repeats=config.data.demo_train_repeats)
  return {'train': paths['train'], 'val': paths['eval'], 'test': paths['eval']}


def train_and_score(task: str, variant: str, seed: int, steps: int, weight: float,
                    split: str, workroot: str) -> dict:
  """Trains one run and returns its generated-answer scores on `split` ('val' or 'test').

  `steps` 0 keeps the recipe's own budget.
  """
  config = run_config(task, variant, seed, steps, weight)
  steps = config.training.num_steps
  files = task_files(task, workroot)
  with config.unlocked():
    config.data.train_files, config.data.eval_files = (files['train'],), (files['val'],)
  workdir = os.path.join(workroot, f'{task}-{variant}-{weight}-{seed}')
  start = time.perf_counter()
  result = modes.train(config, workdir)
  if files[split] != files['val']:
    with config.unlocked():
      config.data.eval_files = (files[split],)
      config.tokenizer = os.path.join(workdir, 'tokenizer')
    result = modes.eval(config, workdir)
  scores = {name: result.get(f'generated_{name}') for name in SCORES}
  return dict(task=task, variant=variant, seed=seed, steps=steps, ntl_weight=weight,
              split=split, seconds=round(time.perf_counter() - start, 1), **scores,
              by_question_type=result.get('by_question_type'))


def summarize(rows: list[dict]) -> list[dict]:
  """Mean and spread (population std) of each score per (task, variant)."""
  groups = {}
  for row in rows:
    groups.setdefault((row['task'], row['variant'], row['ntl_weight']), []).append(row)
  table = []
  for (task, variant, weight), group in groups.items():
    entry = dict(task=task, variant=variant, ntl_weight=weight,
                 seeds=[row['seed'] for row in group])
    for name in SCORES:
      values = [row[name] for row in group if row[name] is not None]
      entry[name] = statistics.fmean(values) if values else None
      entry[f'{name}_std'] = statistics.pstdev(values) if len(values) > 1 else 0.0
    table.append(entry)
  return table


def format_table(table: list[dict]) -> str:
  """A markdown table of the summary."""
  lines = ['| task | objective | lambda | seeds | relaxed acc. | exact match | mean rel. err. |',
           '|---|---|---|---|---|---|---|']
  for e in table:
    cells = [f"{e[n]:.3f} ± {e[n + '_std']:.3f}" if e[n] is not None else '-' for n in SCORES]
    weight = '-' if e['variant'] == 'ce' else f"{e['ntl_weight']:g}"
    lines.append(f"| {e['task']} | {e['variant']} | {weight} | {len(e['seeds'])} | "
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', default='sum,charts')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', default='',
                      help="budget per task, e.g. 'sum:2500,charts:300'; a task not named "
                           "keeps its recipe's own")
  parser.add_argument('--sweep', default='', help='lambdas to try on the charts val tables')
  parser.add_argument('--weight', type=float, default=0.3, help='lambda without --sweep')
  parser.add_argument('--sweep_steps', type=int, default=0)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  flags.FLAGS(sys.argv[:1])  # Grain workers read absl flags
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
  tasks, seeds = args.tasks.split(','), [int(s) for s in args.seeds.split(',')]
  variants = args.variants.split(',')
  steps = {task: int(n) for task, n in (item.split(':') for item in filter(None,
                                                                          args.steps.split(',')))}

  rows, sweep_rows = [], []
  with tempfile.TemporaryDirectory() as workroot:
    weights = {variant: args.weight for variant in variants}
    if args.sweep:
      for variant in (v for v in variants if v != 'ce'):
        for weight in (float(w) for w in args.sweep.split(',')):
          row = train_and_score('charts', variant, 0, args.sweep_steps or steps.get('charts', 0),
                                weight, 'val', workroot)
          sweep_rows.append(row)
          print(json.dumps(row), flush=True)
        candidates = [r for r in sweep_rows if r['variant'] == variant]
        weights[variant] = max(candidates, key=lambda r: r['relaxed_accuracy'] or 0)['ntl_weight']
    for task in tasks:
      split = 'test'
      for variant in variants:
        for seed in seeds:
          row = train_and_score(task, variant, seed, steps.get(task, 0),
                                0.0 if variant == 'ce' else weights[variant], split, workroot)
          rows.append(row)
          print(json.dumps(row), flush=True)
  table = summarize(rows)
  print(format_table(table))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump({'runs': rows, 'sweep': sweep_rows, 'summary': table,
                 'chosen_ntl_weight': weights}, f, indent=1)


if __name__ == '__main__':
  main()
