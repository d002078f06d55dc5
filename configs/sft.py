r"""Supervised fine-tuning (SFT) of a LLaVA-style VLM.

With no arguments this is the embedded demo: it builds (once, into the workdir) a dataset of
scikit-learn's bundled handwritten digits as JSONL + PNG, trains a small BPE tokenizer on it,
and trains a ~2M-parameter VLM from scratch to answer "What number is shown?".

  python -m openvlm_jax.main --config=configs/sft.py --workdir=runs/demo

On a 2-core CPU it takes a few minutes and should reach >= 90% held-out exact match.

Presets are arguments, e.g. `--config=configs/sft.py:model=small` (a ~20M-parameter LLM) or
`--config=configs/sft.py:steps=50`; `lora=1` trains LoRA adapters (rank 16) and the projector
only, `recipe=stage1|full|lora` picks a classic LLaVA set of trainable parameters. Every field is overridable, e.g.
`--config.optimizer.lr=1e-3`. To fine-tune a real checkpoint:

  --config.model.init_from=/path/to/llava-hf-folder --config.data.train_files=train.jsonl
"""

import ml_collections

from openvlm_jax import config_lib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the SFT config; `arg` holds presets as 'key=value,key=value'."""
  preset = config_lib.parse_preset(arg, model='demo', steps=0, lora=0, recipe='')
  config = config_lib.base_config(preset['model'])
  config.objective.name = 'sft'
  if int(preset['steps']):
    config.training.num_steps = int(preset['steps'])
  if int(preset['lora']):  # LoRA on every LLM and vision Dense, trained with the projector
    config.lora.rank, config.lora.alpha = 16, 32.0
    config.lora.targets = (r'llm/.*', r'vision/.*')
    preset['recipe'] = preset['recipe'] or 'lora'
  if preset['recipe']:
    config.trainable = config_lib.RECIPES[preset['recipe']]
  config.lock()
  return config
