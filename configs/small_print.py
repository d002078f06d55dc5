r"""Small print: does tiling the image (LLaVA-NeXT's anyres) read what one view cannot?

The embedded digits, each in a random cell of a 4x4 grid on a 64 px image (data/digits.py,
'read_small'). The tower reads 16 px views as 2x2 patches of 8 px, so a single view (the
LLaVA-1.5 path) shrinks the digit to 4x4 pixels, half of what scikit-learn drew, while the
tiled model also reads the 4x4 crops of 16 px, one of which holds the whole digit. Both train
the same model from scratch on the same records; only `view` differs.

  python -m openvlm_jax.main --config=configs/small_print.py:view=tiled --workdir=runs/tiled
  python -m openvlm_jax.main --config=configs/small_print.py:view=single --workdir=runs/single
"""

import ml_collections

from openvlm_jax import config_lib
from openvlm_jax.console import UserError

IMAGE = 64  # px, the digits' grid (4 cells of 16 px a side)
VIEW = 16  # px, what the tower reads


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the small-print config; `arg` is 'view=tiled' (the default) or 'view=single'."""
  preset = config_lib.parse_preset(arg, view='tiled', steps=1200)
  config = config_lib.base_config('demo')
  config.objective.name = 'sft'
  config.data.demo_task = 'read_small'

  # Model: the demo's (4-layer decoder, 3-layer CLIP tower), reading 16 px views: 4 tokens.
  config.model.vision.image_size = VIEW
  config.model.vision.patch_size = 8
  if preset['view'] == 'tiled':  # base view + 4x4 crops: 4 + 16 * 4 + 8 newlines tokens
    config.model.image_grid_pinpoints = ((IMAGE, IMAGE),)
  elif preset['view'] != 'single':
    raise UserError(
        f"configs/small_print.py: view={preset['view']!r}, expected 'tiled' or 'single'")

  # Data: 76 image tokens tiled (4 single) + ~20 text.
  config.data.seq_len = 100 if preset['view'] == 'tiled' else 32
  config.data.batch_size = 32  # global

  # Optimizer and schedule: as configs/sft.py, 1200 steps ~ 25 epochs of 1527 digits.
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 100
  config.training.num_steps = int(preset['steps'])
  config.training.log_every = 20
  config.training.eval_every = 600  # teacher-forced + generated answers on the 270 held out
  config.training.checkpoint_every = 600
  config.lock()
  return config
