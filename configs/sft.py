r"""Supervised fine-tuning (SFT) of a LLaVA-style VLM.

With no arguments this is the embedded demo: it builds (once, into the workdir) a dataset of
scikit-learn's bundled handwritten digits as JSONL + PNG, trains a small BPE tokenizer on it,
and trains a ~1.2M-parameter VLM from scratch to answer "What number is shown?".

  python -m openvlm_jax.main --config=configs/sft.py --workdir=runs/demo

On a 2-core CPU it takes about 3 minutes and ends with `held-out exact match: 0.9593 (270
examples)`, teacher-forced and generated answers agreeing (>= 0.9 is what CI asks).

Presets are arguments, e.g. `--config=configs/sft.py:model=small` (a ~20M-parameter LLM) or
`--config=configs/sft.py:steps=50`; `lora=1` trains LoRA adapters (rank 16) and the
projector only, `recipe=stage1|full|lora` picks a classic LLaVA set of trainable parameters.
Every field is overridable, e.g. `--config.optimizer.lr=1e-3`. To fine-tune a real checkpoint:

  --config.model.init_from=/path/to/llava-hf-folder --config.data.train_files=train.jsonl
"""

import ml_collections

from openvlm_jax import config_lib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the SFT config; `arg` holds presets as 'key=value,key=value'."""
  preset = config_lib.parse_preset(arg, model='demo', steps=1200, lora=0, recipe='')
  # Model: config_lib.MODEL_PRESETS[model]. 'demo': a 4-layer decoder (hidden 128, 4 query and
  # 2 key/value heads, MLP 384) over a 3-layer CLIP tower (hidden 96) that reads 32 px images
  # as 4x4 patches of 8 px, i.e. 16 image tokens; the vocabulary comes from the tokenizer.
  config = config_lib.base_config(preset['model'])
  config.objective.name = 'sft'

  # Data: the embedded digits (or data.train_files / eval_files), 16 image tokens + ~20 text.
  config.data.seq_len = 48
  config.data.batch_size = 32  # global

  # Optimizer: AdamW, b2 0.95, weight decay 0.05, clip 1.0 (config_lib), warmup then cosine.
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 100

  # Schedule: 1200 steps of 32 images ~ 25 epochs of the 1527 training digits.
  config.training.num_steps = int(preset['steps'])
  config.training.log_every = 20
  config.training.eval_every = 300  # teacher-forced + generated answers on the 270 held out
  config.training.checkpoint_every = 300

  if int(preset['lora']):  # LoRA on every LLM and vision Dense, trained with the projector
    config.lora.rank, config.lora.alpha = 16, 32.0
    config.lora.targets = (r'llm/.*', r'vision/.*')
    preset['recipe'] = preset['recipe'] or 'lora'
  if preset['recipe']:
    config.trainable = config_lib.RECIPES[preset['recipe']]
  config.lock()
  return config
