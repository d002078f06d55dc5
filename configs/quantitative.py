r"""Quantitative reasoning: cross-entropy plus the number-token loss, on the digits-sum task.

With no arguments this trains the embedded demo's quantitative task: images of two or three
of scikit-learn's handwritten digits side by side, "What is the sum of these digits?" ->
"15", with the objective `quantitative` (CE + 0.3 * NTL-WAS, Zausinger et al., ICML 2025).

  python -m openvlm_jax.main --config=configs/quantitative.py --workdir=runs/sum

For the comparison at the same budget and seed, the same recipe with plain cross-entropy:

  python -m openvlm_jax.main --config=configs/quantitative.py:objective=sft --workdir=runs/sum-sft

Then `--mode=eval` on each workdir reports generated-answer exact match, numeric exact match
and relaxed accuracy (ChartQA's 5% rule) next to the teacher-forced metrics; the training
log carries `ntl`, the number-token loss per target number token. Presets: `model=`,
`steps=`, `objective=sft|quantitative`, `kind=was|mse`; every field is a flag, e.g.
`--config.objective.ntl_weight=1.0`.
"""

import ml_collections

from openvlm_jax import config_lib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the quantitative config; `arg` holds presets as 'key=value,key=value'."""
  preset = config_lib.parse_preset(arg, model='demo', steps=1200, objective='quantitative',
                                   kind='was')
  # Model: config_lib.MODEL_PRESETS[model]; 'demo' is sft.py's ~1.2M-parameter VLM.
  config = config_lib.base_config(preset['model'])

  # Data: the embedded digits-sum task (2-3 digits side by side, their sum as the answer).
  config.data.demo_task = 'sum'
  config.data.seq_len = 48
  config.data.batch_size = 32  # global

  # Objective: CE + ntl_weight * NTL at number-token targets.
  config.objective.name = preset['objective']
  config.objective.ntl_weight = 0.3  # lambda in CE + lambda * NTL
  config.objective.ntl_kind = preset['kind']  # 'was' (Wasserstein-1) | 'mse' (expected value)

  # Optimizer and schedule.
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 100
  config.training.num_steps = int(preset['steps'])
  config.training.log_every = 20
  config.training.eval_every = 300
  config.training.checkpoint_every = 300
  config.lock()
  return config
