r"""Chart reading: bar and line charts drawn from real tables, questions with exact numbers.

With no arguments this builds the chart benchmark (data/charts.py: vega_datasets' and
scikit-learn's tables, split by table) into the workdir, trains on the train tables with
cross-entropy plus the number-token loss, and evaluates on the validation tables:

  pip install -e '.[charts]'
  python -m openvlm_jax.main --config=configs/charts.py --workdir=runs/charts

The held-out test tables are scored per question type (relaxed accuracy by ChartQA's 5%
rule, raw and normalised exact match, mean relative error):

  python -m openvlm_jax.main --config=configs/charts.py --workdir=runs/charts --mode=eval \
      --config.data.eval_files=runs/charts/data/test.jsonl

On a 2-core CPU, 300 steps take about 2.5 minutes (the build of the benchmark adds 1) and
score 0.02-0.03 relaxed accuracy on the test tables, mostly bar counts (see README, "Numbers
you can trust"); the 1500 steps of the default are about 9 minutes and have not been scored
yet. Presets: `steps=`, `objective=sft|quantitative`, `kind=was|mse`, `weight=` (lambda).
"""

import ml_collections

from openvlm_jax import config_lib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the chart config; `arg` holds presets as 'key=value,key=value'."""
  preset = config_lib.parse_preset(arg, steps=1500, objective='quantitative', kind='was',
                                   weight=0.3)
  # Model: the demo's 4-layer decoder (hidden 128) over a 3-layer CLIP tower (hidden 96) that
  # reads 128 px charts as 8x8 patches of 16 px: 64 image tokens.
  config = config_lib.base_config('demo')
  config.model.vision.image_size = 128
  config.model.vision.patch_size = 16

  # Data: the chart benchmark; ~64 image tokens + ~40 of question and answer.
  config.data.demo_task = 'charts'
  config.data.seq_len = 128
  config.data.batch_size = 32  # global

  # Objective: CE + lambda * NTL per number token ('digits': the ten digit tokens).
  config.objective.name = preset['objective']
  config.objective.ntl_weight = float(preset['weight'])
  config.objective.ntl_kind = preset['kind']
  config.objective.number_tokens = 'digits'

  # Optimizer and schedule.
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 100
  config.training.num_steps = int(preset['steps'])
  config.training.log_every = 50
  config.training.eval_every = 500
  config.training.checkpoint_every = 500
  config.lock()
  return config
