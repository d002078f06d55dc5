r"""Quantitative reasoning: cross-entropy plus the number-token loss, on the digits-sum task.

With no arguments this trains the embedded demo's quantitative task: images of two or three
of scikit-learn's handwritten digits side by side, "What is the sum of these digits?" ->
"15", with the objective `quantitative` (CE + 0.3 * NTL-WAS, Zausinger et al., ICML 2025).

  python -m openvlm_jax.main --config=configs/quantitative.py --workdir=runs/sum

For the comparison at the same budget and seed, the same recipe with plain cross-entropy:

  python -m openvlm_jax.main --config=configs/quantitative.py:objective=sft --workdir=runs/sum-sft

Then `--mode=eval` on each workdir reports generated-answer exact match, numeric exact match
and relaxed accuracy (ChartQA's 5% rule) next to the teacher-forced metrics. Presets:
`model=`, `steps=`, `objective=sft|quantitative`, `kind=was|mse`; every field is a flag,
e.g. `--config.objective.ntl_weight=1.0`.
"""

import ml_collections

from openvlm_jax import config_lib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the quantitative config; `arg` holds presets as 'key=value,key=value'."""
  preset = config_lib.parse_preset(arg, model='demo', steps=0, objective='quantitative',
                                   kind='was')
  config = config_lib.base_config(preset['model'])
  config.data.demo_task = 'sum'
  config.objective.name = preset['objective']
  config.objective.ntl_weight = 0.3  # lambda in CE + lambda * NTL
  config.objective.ntl_kind = preset['kind']  # 'was' (Wasserstein-1) | 'mse' (expected value)
  if int(preset['steps']):
    config.training.num_steps = int(preset['steps'])
  config.lock()
  return config
