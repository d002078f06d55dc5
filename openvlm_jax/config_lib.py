"""Pieces shared by the files in `configs/`: presets, the base recipe, and the model builder.

A config file reads like a recipe; this module holds what every recipe starts from so the
files themselves stay short.
"""

import difflib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from openvlm_jax import console
from openvlm_jax.models import config as model_config

# Model presets. `vocab_size` 0 means "take it from the tokenizer".
MODEL_PRESETS = {
    # ~1M parameters: the embedded digits demo, trains in minutes on a laptop CPU.
    'demo': dict(
        llm=dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                 num_kv_heads=2),
        vision=dict(kind='clip', image_size=32, patch_size=8, hidden_size=96,
                    intermediate_size=256, num_layers=3, num_heads=4),
    ),
    # ~20M-parameter LLM with a small CLIP tower: the speed benchmark's reference size.
    'small': dict(
        llm=dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                 num_kv_heads=6),
        vision=dict(kind='clip', image_size=64, patch_size=16, hidden_size=192,
                    intermediate_size=768, num_layers=4, num_heads=4),
    ),
    # Tiny shapes for tests.
    'tiny': dict(
        llm=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=2),
        vision=dict(kind='clip', image_size=16, patch_size=8, hidden_size=32,
                    intermediate_size=64, num_layers=2, num_heads=2),
    ),
}


def parse_preset(arg: str, **defaults) -> dict:
  """Parses 'key=value,key=value' into a dict; only keys named in `defaults` are allowed."""
  preset = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise console.UserError(f'Unknown config argument {item!r}; known: {sorted(defaults)}')
    preset[key] = value
  return preset


def model_section(preset: str) -> ml_collections.ConfigDict:
  """The `config.model` section for a named preset."""
  if preset not in MODEL_PRESETS:
    raise console.UserError(f'Unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}')
  sizes = MODEL_PRESETS[preset]
  model = ml_collections.ConfigDict()
  # A Hugging Face folder (LlavaForConditionalGeneration) to start from; '' trains from scratch.
  model.init_from = ''
  # Stage-1 recipe: a bare LLM folder and a vision-tower folder, with a fresh projector.
  model.llm_from = ''
  model.vision_from = ''
  # Image size a pretrained DINOv2 tower reads (its position table is resized to the grid);
  # 0: the size its folder's image processor crops to.
  model.tower_image_size = 0
  model.llm = ml_collections.ConfigDict(dict(
      family='llama', vocab_size=0, head_dim=0, rope_theta=10000.0, rms_norm_eps=1e-6,
      qkv_bias=False, tie_embeddings=False, max_position_embeddings=4096, **sizes['llm']))
  model.vision = ml_collections.ConfigDict(dict(
      layer_norm_eps=1e-5, hidden_act='quick_gelu', feature_layer=-2, feature_select='default',
      image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **sizes['vision']))
  model.projector = 'mlp2x_gelu'
  # LLaVA-NeXT's anyres tiling from scratch (data/anyres.py): grid resolutions (height,
  # width), multiples of vision.image_size; () reads each image as one view. With
  # anyres_max_crops N, OneVision's anyres_max_N.
  model.image_grid_pinpoints = ()
  model.anyres_max_crops = 0
  model.dtype = 'float32'  # compute dtype; parameters stay in param_dtype
  model.param_dtype = 'float32'
  model.remat = 'none'  # 'none' | 'full' | 'dots'
  model.scan_layers = True
  model.attention_impl = 'xla'
  # Prefix LM: the prompt (everything before the first answer token) attends bidirectionally.
  # transformers' LLaVA is causal, so an exported model will not reproduce these outputs there.
  model.prefix_attention = False
  model.projection_impl = 'xla'  # LoRA Dense layers: 'xla' | 'pallas' (fused kernel)
  return model


def base_config(model_preset: str) -> ml_collections.ConfigDict:
  """Every key a run reads, with the plumbing's defaults (mesh, axis rules, predict, export).

  The numbers that make a recipe (`RECIPE_KEYS`: sequence length, batch, learning rate and
  schedule) are left unset: each file in `configs/` writes them out.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_section(model_preset)
  # A Hugging Face tokenizer folder; '' trains the demo tokenizer (or uses init_from's).
  config.tokenizer = ''

  config.data = ml_collections.ConfigDict()
  # Sources (data/sources.py): LLaVA JSONL files, or datasets converted to ArrayRecord by
  # `python -m openvlm_jax.data.convert`, named 'folder:split'. Empty builds the embedded
  # demo dataset into the workdir.
  config.data.train_files = ()
  config.data.eval_files = ()
  # One weight per train_files entry makes them a mixture (Grain's mix); () reads them as one.
  config.data.train_weights = ()
  config.data.seq_len = placeholder(int)  # set by the recipe
  config.data.max_images = 1
  # Anyres models (LLaVA-NeXT, OneVision; data/anyres.py): the grids of at most max_tiles
  # crops per image (0: all of image_grid_pinpoints; the limit is exported with the model),
  # and max_views view slots per example (0: max_images at the largest grid). An example
  # whose views or image tokens do not fit is tiled on smaller grids, and the run says so.
  config.data.max_tiles = 0
  config.data.max_views = 0
  config.data.batch_size = placeholder(int)  # global, across all processes; set by the recipe
  config.data.shuffle_seed = 0
  config.data.worker_count = 0  # Grain processes that decode and preprocess images; 0: none
  config.data.worker_buffer_size = 1  # examples each worker prepares ahead
  config.data.on_bad_record = 'skip'  # 'skip' (count and log) | 'raise'
  # Decode every image fully when validating (catches truncated files up front); False for
  # very large sets, where a late decode failure is then dropped and logged once.
  config.data.decode_images = True
  # Packing (data.pipeline.pack_examples): several training examples per row, up to seq_len
  # tokens and pack_max_images images (0: as many as seq_len can hold); eval is unpacked.
  config.data.packing = False
  config.data.pack_max_images = 0
  # The embedded dataset: 'read' | 'sum' | 'sum_pairs' | 'read_small' (digits, data/digits.py)
  # | 'charts'.
  config.data.demo_task = 'read'
  config.data.demo_train_repeats = 1  # digits: training records led by each training digit

  config.objective = ml_collections.ConfigDict()
  config.objective.name = 'sft'

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = placeholder(float)  # set by the recipe
  config.optimizer.warmup_steps = placeholder(int)  # set by the recipe
  config.optimizer.min_lr_ratio = 0.05  # cosine decays to lr * min_lr_ratio
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.05
  config.optimizer.clip_norm = 1.0
  config.optimizer.grad_accum_steps = 1

  config.training = ml_collections.ConfigDict()
  config.training.num_steps = placeholder(int)  # set by the recipe
  config.training.log_every = placeholder(int)  # set by the recipe
  config.training.eval_every = placeholder(int)  # set by the recipe (0: never)
  config.training.eval_generate = True  # also decode answers and score them at each eval
  config.training.checkpoint_every = placeholder(int)  # set by the recipe (0: never)
  config.training.keep_checkpoints = 2
  config.training.progress_bar = True

  # Mesh axis sizes; -1 takes the devices that are left. Multi-slice (TPU slices, or GPU nodes
  # joined by a slower network): data/fsdp/tensor are sizes within a slice and dcn_<axis> the
  # number of slices that axis spans.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                               dcn_tensor=1))
  # Logical axis name -> mesh axes. The first rule whose mesh axes are still free wins.
  config.logical_axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('vocab', 'tensor'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('embed', 'fsdp'),
      ('embed', None),
      ('length', None),
      ('head_dim', None),
      ('layers', None),
      ('norm', None),
      ('lora_rank', None),
  )

  # LoRA adapters (rank 0: off) on the Dense layers whose module path matches a target regex.
  config.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, dropout=0.0, base_dtype='float32',  # 'float32'|'bf16'|'int8'|'nf4'
      targets=(r'llm/.*/(q|k|v|o)_proj', r'llm/.*/mlp/.*')))
  # (path regex, trains?) over parameter paths like 'llm/layers/mlp/up_proj/kernel'; the first
  # match wins. Unmatched: everything trains, or with LoRA on only the adapters. See RECIPES.
  config.trainable = ()

  # --mode=predict: a JSONL of {"id", "image", "question"} (or LLaVA records) -> answers.
  config.predict = ml_collections.ConfigDict(dict(
      input='', output='', database='',  # '': <workdir>/predictions.jsonl, <workdir>/runs.db
      batch_size=8, max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0))

  # --mode=serve: an OpenAI-compatible API on host:port (serving/): limits and batching.
  config.serve = ml_collections.ConfigDict(dict(
      host='127.0.0.1', port=8000, model_name='',  # '': the workdir's (or folder's) name
      folder='',  # '': the latest checkpoint; else a Hugging Face LLaVA folder (--mode=export)
      temperature=0.0,  # when a request gives none: numbers are not sampled unless asked
      max_new_tokens=64, max_prompt_tokens=0,  # 0: data.seq_len
      max_image_bytes=8 << 20, image_root='',  # local image paths only below it; '': none
      max_batch=8, batch_window_ms=5.0, max_queue=64))

  config.export = ml_collections.ConfigDict()
  config.export.dir = ''
  config.export.dtype = 'float32'  # 'float32' | 'bfloat16'
  config.export.step = -1  # -1: the latest checkpoint
  config.export.format = 'merged'  # 'merged' (a full LLaVA folder) | 'peft' (a LoRA adapter)
  config.export.base_model = ''  # the adapter's base model; '' = config.model.init_from
  config.export.overwrite = False  # True: write into a non-empty export.dir
  return config


def build_vlm_config(model: ml_collections.ConfigDict, *, vocab_size: int,
                     image_token_id: int,
                     lora: ml_collections.ConfigDict | None = None) -> model_config.VLMConfig:
  """Turns `config.model` (and `config.lora`) into the frozen `VLMConfig` the modules read."""
  llm_fields = model.llm.to_dict()
  llm_fields['vocab_size'] = llm_fields['vocab_size'] or vocab_size
  llm_fields['head_dim'] = llm_fields['head_dim'] or None
  vision_fields = model.vision.to_dict()
  vision_fields['image_mean'] = tuple(vision_fields['image_mean'])
  vision_fields['image_std'] = tuple(vision_fields['image_std'])
  return model_config.VLMConfig(
      llm=model_config.LLMConfig(**llm_fields),
      vision=model_config.VisionConfig(**vision_fields),
      projector=model.projector,
      image_token_id=image_token_id,
      lora=lora_config(lora),
      image_grid_pinpoints=tuple((int(h), int(w)) for h, w in model.image_grid_pinpoints),
      anyres_max_crops=model.anyres_max_crops,
      **runtime_fields(model),
  )


# VLMConfig fields that say how the model computes, not what it is: they always come from
# `config.model`, also when the architecture comes from a Hugging Face folder.
RUNTIME_FIELDS = ('dtype', 'param_dtype', 'remat', 'scan_layers', 'attention_impl',
                  'projection_impl', 'prefix_attention')


def runtime_fields(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `RUNTIME_FIELDS` of `config.model`, as VLMConfig keyword arguments."""
  return {name: model[name] for name in RUNTIME_FIELDS}


def model_source(model: ml_collections.ConfigDict) -> str:
  """Where the architecture and weights come from: 'hf_folder', 'stage1' or 'scratch'.

  Raises:
    UserError: for `llm_from` without `vision_from` or the other way round.
  """
  if model.init_from:
    return 'hf_folder'
  if model.llm_from or model.vision_from:
    if not (model.llm_from and model.vision_from):
      raise console.UserError('config.model.llm_from and config.model.vision_from go together')
    return 'stage1'
  return 'scratch'


# The classic LLaVA recipes as `config.trainable` rules (`configs/sft.py:recipe=<name>`).
RECIPES = {
    'stage1': ((r'projector/.*', True), (r'.*', False)),  # projector only
    'full': ((r'vision/.*', False), (r'.*', True)),  # full LLM + projector
    'lora': ((r'.*/lora_(a|b)', True), (r'projector/.*', True), (r'.*', False)),
}


def lora_config(lora: ml_collections.ConfigDict | None) -> model_config.LoraConfig | None:
  """The frozen `LoraConfig` of a `config.lora` section; None when off (rank 0)."""
  if lora is None or not lora.rank:
    return None
  return model_config.LoraConfig(rank=int(lora.rank), alpha=float(lora.alpha),
                                 dropout=float(lora.dropout), targets=tuple(lora.targets),
                                 base_dtype=lora.base_dtype)


# ---- Checks a config must pass before anything is built ---------------------------------------

# Keys whose change between a checkpoint and a resumed run would alter the train state's shapes
# (or what its tensors mean); anything else may change on resume, with a warning.
STATE_SHAPING_KEYS = ('model.llm.', 'model.vision.', 'model.projector', 'model.init_from',
                      'model.llm_from', 'model.vision_from', 'model.tower_image_size',
                      'model.scan_layers',
                      'model.param_dtype', 'lora.rank', 'lora.targets', 'lora.base_dtype',
                      'trainable', 'tokenizer')


# Keys every recipe in `configs/` sets (base_config leaves them unset).
RECIPE_KEYS = ('data.seq_len', 'data.batch_size', 'optimizer.lr', 'optimizer.warmup_steps',
               'training.num_steps', 'training.log_every', 'training.eval_every',
               'training.checkpoint_every')

# Keys with a fixed set of values.
CHOICES = {
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16', 'float16'),
    'model.remat': ('none', 'full', 'dots'),
    'model.attention_impl': ('xla', 'cudnn', 'pallas'),
    'model.projection_impl': ('xla', 'pallas'),
    'model.projector': ('linear', 'mlp2x_gelu'),
    'model.vision.kind': ('clip', 'siglip'),
    'model.llm.family': ('llama', 'qwen2', 'mistral'),
    'lora.base_dtype': ('float32', 'bf16', 'int8', 'nf4'),
    'objective.name': ('sft', 'quantitative', 'dpo', 'grpo'),
    'data.demo_task': ('read', 'sum', 'sum_pairs', 'read_small', 'charts'),
    'export.dtype': ('float32', 'bfloat16'),
    'export.format': ('merged', 'peft'),
}


def _require(condition: bool, key: str, value: Any, rule: str) -> None:
  if not condition:
    raise console.UserError(f'config.{key}={value!r}: {rule}')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks the values a run reads, naming the key of the first bad one.

  What needs the devices or the model (the batch against the mesh, `seq_len` against the
  image tokens) is checked in `training/setup.py`.

  Raises:
    console.UserError: `config.<key>=<value>: <rule>`.
  """
  for key in RECIPE_KEYS:
    section, name = key.split('.')
    _require(config[section][name] is not None, key, None, 'not set; the recipe must set it')
  training, data = config.training, config.data
  _require(training.num_steps >= 1, 'training.num_steps', training.num_steps, 'must be >= 1')
  _require(training.log_every >= 1, 'training.log_every', training.log_every, 'must be >= 1')
  for key in ('eval_every', 'checkpoint_every'):
    _require(training[key] >= 0, f'training.{key}', training[key], 'must be >= 0 (0: never)')
  _require(training.keep_checkpoints >= 1, 'training.keep_checkpoints',
           training.keep_checkpoints, 'must be >= 1')
  _require(data.batch_size >= 1, 'data.batch_size', data.batch_size, 'must be >= 1')
  accum = config.optimizer.grad_accum_steps
  _require(accum >= 1, 'optimizer.grad_accum_steps', accum, 'must be >= 1')
  _require(data.batch_size % accum == 0, 'data.batch_size', data.batch_size,
           f'must be a multiple of optimizer.grad_accum_steps={accum}')
  _require(data.seq_len >= 2, 'data.seq_len', data.seq_len, 'must be >= 2')
  _require(data.max_images >= 0, 'data.max_images', data.max_images, 'must be >= 0')
  _require(data.max_tiles >= 0, 'data.max_tiles', data.max_tiles, 'must be >= 0')
  _require(data.max_views >= 0, 'data.max_views', data.max_views, 'must be >= 0')
  _require(data.worker_count >= 0, 'data.worker_count', data.worker_count, 'must be >= 0')
  _require(data.pack_max_images == 0 or data.pack_max_images >= data.max_images,
           'data.pack_max_images', data.pack_max_images,
           f'must be 0 (as many as fit) or >= data.max_images={data.max_images}')
  _require(data.on_bad_record in ('skip', 'raise'), 'data.on_bad_record', data.on_bad_record,
           "must be 'skip' or 'raise'")
  _require(config.optimizer.lr > 0, 'optimizer.lr', config.optimizer.lr, 'must be > 0')
  for key, allowed in CHOICES.items():
    section, name = key.rsplit('.', 1)
    value = config
    for part in section.split('.'):
      value = value[part]
    _require(value[name] in allowed, key, value[name], f'must be one of {list(allowed)}')
  _require(config.predict.batch_size >= 1, 'predict.batch_size', config.predict.batch_size,
           'must be >= 1')
  _require(config.predict.max_new_tokens >= 1, 'predict.max_new_tokens',
           config.predict.max_new_tokens, 'must be >= 1')


def flat_items(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b.c': value} for every leaf of a nested dict or ConfigDict."""
  items = {}
  for key, value in tree.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      items.update(flat_items(value, f'{prefix}{key}.'))
    else:
      items[f'{prefix}{key}'] = value
  return items


def config_changes(saved: Mapping[str, Any],
                   current: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for every leaf that differs, in key order.

  `saved` is a checkpoint's JSON copy of the config, so tuples compare as lists. Keys it does
  not have are options newer than the checkpoint, not changes.
  """
  old = flat_items(json.loads(json.dumps(saved, default=str)))
  new = flat_items(json.loads(json.dumps(current.to_dict(), default=str)))
  return [(key, old[key], new.get(key)) for key in sorted(old) if old[key] != new.get(key)]


def changes_state_shapes(key: str) -> bool:
  """Whether changing `key` on resume would not fit the saved train state."""
  return any(key == prefix or key.startswith(prefix) for prefix in STATE_SHAPING_KEYS)


def load_config_file(path: str, arg: str = '') -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of a config file, as `--config=path:arg` does."""
  spec = importlib.util.spec_from_file_location('_openvlm_config', path)
  if spec is None or not os.path.exists(path):
    raise console.UserError(f'--config={path}: no such config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def explain_flag_error(argv: Sequence[str], error: Exception) -> str:
  """One line for a failed flag parse: the bad `--config.<key>` and the closest valid key."""
  config_arg = next((arg.split('=', 1)[1] for arg in argv if arg.startswith('--config=')), None)
  if config_arg:
    path, _, preset = config_arg.partition(':')
    try:
      config = load_config_file(path, preset)
    except Exception as load_error:  # noqa: BLE001  (whatever the config file raised)
      return f'--config={config_arg}: {first_line(load_error)}'
    known = list(flat_items(config)) + [key for key, value in config.items()]
    for arg in argv:
      if not arg.startswith('--config.'):
        continue
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f'; did you mean --config.{close[0]}?' if close else ''
        return f'--config.{key}: the config has no key {key!r}{hint}'
  return first_line(error)


def first_line(error: BaseException) -> str:
  """The first non-blank line of an error's message (its type name if it has none)."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  return lines[0].strip() if lines else type(error).__name__
