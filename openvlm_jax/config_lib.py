"""Pieces shared by the files in `configs/`: presets, the base recipe, and the model builder.

A config file reads like a recipe; this module holds what every recipe starts from so the
files themselves stay short.
"""

import ml_collections

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
      raise ValueError(f'Unknown config argument {item!r}; known: {sorted(defaults)}')
    preset[key] = value
  return preset


def model_section(preset: str) -> ml_collections.ConfigDict:
  """The `config.model` section for a named preset."""
  if preset not in MODEL_PRESETS:
    raise ValueError(f'Unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}')
  sizes = MODEL_PRESETS[preset]
  model = ml_collections.ConfigDict()
  # A Hugging Face folder (LlavaForConditionalGeneration) to start from; '' trains from scratch.
  model.init_from = ''
  # Stage-1 recipe: a bare LLM folder and a vision-tower folder, with a fresh projector.
  model.llm_from = ''
  model.vision_from = ''
  model.llm = ml_collections.ConfigDict(dict(
      vocab_size=0, head_dim=0, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=False,
      tie_embeddings=False, max_position_embeddings=4096, **sizes['llm']))
  model.vision = ml_collections.ConfigDict(dict(
      layer_norm_eps=1e-5, hidden_act='quick_gelu', feature_layer=-2, feature_select='default',
      image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **sizes['vision']))
  model.projector = 'mlp2x_gelu'
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
  """Everything a training run reads, with the embedded demo's values as defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_section(model_preset)
  # A Hugging Face tokenizer folder; '' trains the demo tokenizer (or uses init_from's).
  config.tokenizer = ''

  config.data = ml_collections.ConfigDict()
  # JSONL files in LLaVA format; empty builds the embedded digits dataset into the workdir.
  config.data.train_files = ()
  config.data.eval_files = ()
  config.data.seq_len = 48
  config.data.max_images = 1
  config.data.batch_size = 32  # global, across all processes
  config.data.shuffle_seed = 0
  config.data.worker_count = 0
  config.data.on_bad_record = 'skip'  # 'skip' (count and log) | 'raise'
  config.data.demo_task = 'read'  # the embedded dataset's task: 'read' | 'sum' (see data/digits.py)

  config.objective = ml_collections.ConfigDict()
  config.objective.name = 'sft'

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.min_lr_ratio = 0.05  # cosine decays to lr * min_lr_ratio
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.05
  config.optimizer.clip_norm = 1.0
  config.optimizer.grad_accum_steps = 1

  config.training = ml_collections.ConfigDict()
  config.training.num_steps = 1200
  config.training.log_every = 20
  config.training.eval_every = 300
  config.training.eval_generate = True  # also decode answers and score them at each eval
  config.training.checkpoint_every = 300
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

  config.export = ml_collections.ConfigDict()
  config.export.dir = ''
  config.export.dtype = 'float32'  # 'float32' | 'bfloat16'
  config.export.step = -1  # -1: the latest checkpoint
  config.export.format = 'merged'  # 'merged' (a full LLaVA folder) | 'peft' (a LoRA adapter)
  config.export.base_model = ''  # the adapter's base model; '' = config.model.init_from
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
      dtype=model.dtype,
      param_dtype=model.param_dtype,
      remat=model.remat,
      scan_layers=model.scan_layers,
      attention_impl=model.attention_impl,
      prefix_attention=bool(model.prefix_attention),
      lora=lora_config(lora),
      projection_impl=model.projection_impl,
  )


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
