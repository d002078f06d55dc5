"""Hugging Face `config.json` <-> our model configs (`models/config.py`).

Reading goes through transformers' own config classes, so missing keys take the library's
defaults and legacy spellings (`rope_theta`/`rope_scaling`) are normalised into
`rope_parameters` by the library.
"""

import dataclasses
import re
from typing import Any

import transformers
from absl import logging

from openvlm_jax.console import UserError
from openvlm_jax.models.config import LLMConfig, RopeScaling, VisionConfig, VLMConfig

TEXT_MODEL_TYPES = ('llama', 'qwen2', 'mistral')
VISION_MODEL_TYPES = ('clip_vision_model', 'siglip_vision_model', 'dinov2')
# ImageNet's, which DINOv2's image processors use.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Full CLIP/SigLIP models (text + vision); only their vision half is used.
DUAL_ENCODER_TYPES = ('clip', 'siglip')
# LLaVA-1.5, LLaVA-NeXT (anyres views, image_newline) and LLaVA-OneVision (anyres_max_N).
LLAVA_MODEL_TYPES = ('llava', 'llava_next', 'llava_onevision')

HFConfig = dict | transformers.PretrainedConfig


def _as_hf_config(config: HFConfig) -> transformers.PretrainedConfig:
  """A transformers config object from a config.json dict (or the object itself)."""
  if isinstance(config, transformers.PretrainedConfig):
    return config
  config = dict(config)
  model_type = config.pop('model_type', None)
  if model_type is None:
    raise UserError(f"config has no 'model_type': {sorted(config)}")
  return transformers.AutoConfig.for_model(model_type, **config)


def _rope(text_config: transformers.PretrainedConfig) -> tuple[float, RopeScaling | None]:
  """(rope_theta, llama3 scaling or None) of a decoder config."""
  params = getattr(text_config, 'rope_parameters', None) or {}
  theta = params.get('rope_theta', getattr(text_config, 'rope_theta', 10000.0))
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type == 'default':
    return float(theta), None
  if rope_type == 'llama3':
    return float(theta), RopeScaling(
        factor=float(params['factor']),
        low_freq_factor=float(params['low_freq_factor']),
        high_freq_factor=float(params['high_freq_factor']),
        original_max_position_embeddings=int(params['original_max_position_embeddings']),
    )
  raise UserError(f"rope_type {rope_type!r} is not supported; only 'default' and 'llama3'")


def llm_config_from_hf(config: HFConfig) -> LLMConfig:
  """LLMConfig of a llama | qwen2 | mistral config (a bare *ForCausalLM or a text_config)."""
  config = _as_hf_config(config)
  if config.model_type not in TEXT_MODEL_TYPES:
    raise UserError(f'text model_type {config.model_type!r} is not one of {TEXT_MODEL_TYPES}')
  if getattr(config, 'mlp_bias', False):
    raise UserError('mlp_bias=True is not supported')
  if config.model_type == 'mistral' and getattr(config, 'sliding_window', None):
    logging.warning(
        'mistral sliding_window=%s is ignored: attention is full over the sequence',
        config.sliding_window,
    )
  theta, scaling = _rope(config)
  num_heads = config.num_attention_heads
  head_dim = getattr(config, 'head_dim', None) or config.hidden_size // num_heads
  qkv_bias = config.model_type == 'qwen2' or bool(getattr(config, 'attention_bias', False))
  return LLMConfig(
      vocab_size=config.vocab_size,
      hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size,
      num_layers=config.num_hidden_layers,
      num_heads=num_heads,
      num_kv_heads=getattr(config, 'num_key_value_heads', None) or num_heads,
      head_dim=None if head_dim == config.hidden_size // num_heads else head_dim,
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(config.rms_norm_eps),
      qkv_bias=qkv_bias,
      tie_embeddings=bool(config.tie_word_embeddings),
      max_position_embeddings=config.max_position_embeddings,
      family=config.model_type,
  )


def _processor_image_size(preprocessor: dict | None) -> int | None:
  """The square size a preprocessor_config.json crops (or resizes) images to, if it says."""
  preprocessor = preprocessor or {}
  for key in ('crop_size', 'size'):
    size = preprocessor.get(key)
    if isinstance(size, dict) and size.get('height') and size.get('height') == size.get('width'):
      return int(size['height'])
    if isinstance(size, int):
      return size
  return None


def vision_config_from_hf(
    config: HFConfig,
    *,
    feature_layer: int | None = None,
    feature_select: str | None = None,
    preprocessor: dict | None = None,
) -> VisionConfig:
  """VisionConfig of a CLIP/SigLIP/DINOv2 vision config (or a full CLIP/SigLIP model's).

  `feature_layer`/`feature_select` default to LLaVA's choices: CLIP and DINOv2 read layer -2
  without the class token, SigLIP the last layer with every patch. `preprocessor` is a
  preprocessor_config.json dict; its image_mean/image_std are used when present (otherwise
  the CLIP, SigLIP or ImageNet defaults).
  """
  config = _as_hf_config(config)
  if config.model_type in DUAL_ENCODER_TYPES:
    config = config.vision_config
  if config.model_type not in VISION_MODEL_TYPES:
    raise UserError(f'vision model_type {config.model_type!r} is not one of {VISION_MODEL_TYPES}')
  kind = {'clip_vision_model': 'clip', 'siglip_vision_model': 'siglip'}.get(
      config.model_type, config.model_type)
  if kind == 'dinov2' and config.use_swiglu_ffn:
    raise UserError('a DINOv2 tower with use_swiglu_ffn (ViT-g) is not supported')
  if feature_layer is None:
    feature_layer = -1 if kind == 'siglip' else -2
  if feature_select is None:
    feature_select = 'full' if kind == 'siglip' else 'default'
  if kind == 'siglip' and feature_select == 'default':
    raise UserError(
        "vision_feature_select_strategy='default' drops the first token, which for SigLIP (no "
        "class token) is an image patch; only 'full' is supported with SigLIP"
    )
  mean, std = {'clip': (VisionConfig.image_mean, VisionConfig.image_std),
               'siglip': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
               'dinov2': (IMAGENET_MEAN, IMAGENET_STD)}[kind]
  preprocessor = preprocessor or {}
  mean = tuple(float(x) for x in preprocessor.get('image_mean', mean))
  std = tuple(float(x) for x in preprocessor.get('image_std', std))
  image_size, intermediate_size, position_grid = (
      config.image_size, getattr(config, 'intermediate_size', None), 0)
  if kind == 'dinov2':
    # The position table keeps the checkpoint's grid (image_size // patch); the tower reads
    # the preprocessor's crop size (224 for DINOv2's own), or image_size.
    image_size = _processor_image_size(preprocessor) or config.image_size
    intermediate_size = int(config.hidden_size * config.mlp_ratio)
    position_grid = config.image_size // config.patch_size
  return VisionConfig(
      kind=kind,
      image_size=image_size,
      patch_size=config.patch_size,
      hidden_size=config.hidden_size,
      intermediate_size=intermediate_size,
      num_layers=config.num_hidden_layers,
      num_heads=config.num_attention_heads,
      layer_norm_eps=float(config.layer_norm_eps),
      hidden_act=config.hidden_act,
      feature_layer=feature_layer,
      feature_select=feature_select,
      image_mean=mean,
      image_std=std,
      position_grid=position_grid,
  )


def vlm_config_from_hf(
    config: HFConfig, preprocessor: dict | None = None, **overrides: Any
) -> VLMConfig:
  """VLMConfig of a LlavaConfig, LlavaNextConfig or LlavaOnevisionConfig; `overrides` set
  VLMConfig fields (dtype, remat, ...)."""
  config = _as_hf_config(config)
  if config.model_type not in LLAVA_MODEL_TYPES:
    raise UserError(f'expected model_type one of {LLAVA_MODEL_TYPES}, got {config.model_type!r}')
  try:
    feature_layer = int(config.vision_feature_layer)
  except TypeError:
    raise UserError(
        f'vision_feature_layer={config.vision_feature_layer!r}: only one layer is supported'
    ) from None
  if config.projector_hidden_act != 'gelu':
    raise UserError(
        f"projector_hidden_act {config.projector_hidden_act!r} is not supported; only 'gelu'"
    )
  llm = llm_config_from_hf(config.text_config)
  if llm.tie_embeddings != bool(config.tie_word_embeddings):
    llm = dataclasses.replace(llm, tie_embeddings=bool(config.tie_word_embeddings))
  image_token_id = getattr(config, 'image_token_id', None)
  if image_token_id is None:
    image_token_id = config.image_token_index
  vision = vision_config_from_hf(
      config.vision_config,
      feature_layer=feature_layer,
      feature_select=config.vision_feature_select_strategy,
      preprocessor=preprocessor,
  )
  pinpoints, max_crops = (), 0
  if config.model_type == 'llava_onevision':
    match = re.fullmatch(r'anyres_max_(\d+)', config.vision_aspect_ratio)
    if not match:
      raise UserError(f'vision_aspect_ratio {config.vision_aspect_ratio!r} is not supported; '
                      "only 'anyres_max_<N>'")
    max_crops = int(match.group(1))
  if config.model_type != 'llava':
    pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
    if vision.num_image_tokens != vision.num_patches:
      raise UserError(f'anyres needs one token per patch of each view; feature select '
                      f'{vision.feature_select!r} of a {vision.kind} tower keeps the class token')
  return VLMConfig(
      llm=llm,
      vision=vision,
      projector='mlp2x_gelu',
      projector_bias=bool(getattr(config, 'multimodal_projector_bias', True)),
      image_token_id=int(image_token_id),
      image_grid_pinpoints=pinpoints,
      anyres_max_crops=max_crops,
      **overrides,
  )


def config_from_hf(
    config: HFConfig, preprocessor: dict | None = None
) -> VLMConfig | LLMConfig | VisionConfig:
  """Our config of any supported checkpoint config: LLaVA, a decoder, or a vision encoder."""
  config = _as_hf_config(config)
  if config.model_type in LLAVA_MODEL_TYPES:
    return vlm_config_from_hf(config, preprocessor)
  if config.model_type in TEXT_MODEL_TYPES:
    return llm_config_from_hf(config)
  if config.model_type in VISION_MODEL_TYPES + DUAL_ENCODER_TYPES:
    return vision_config_from_hf(config, preprocessor=preprocessor)
  raise UserError(f'unsupported model_type {config.model_type!r}')


# ---------------------------------------------------------------------------------------------
# Ours -> Hugging Face
# ---------------------------------------------------------------------------------------------


CAUSAL_LM_CLASSES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                     'mistral': 'MistralForCausalLM'}


def llm_config_to_hf(config: LLMConfig) -> transformers.PretrainedConfig:
  """A Qwen2Config (when q/k/v have biases) or a LlamaConfig for our decoder config."""
  rope = {'rope_type': 'default', 'rope_theta': config.rope_theta}
  if config.rope_scaling is not None:
    scaling = config.rope_scaling
    rope.update(
        rope_type='llama3',
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )
  common = {
      'vocab_size': config.vocab_size,
      'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size,
      'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads,
      'num_key_value_heads': config.num_kv_heads,
      'head_dim': config.resolved_head_dim,
      'rms_norm_eps': config.rms_norm_eps,
      'tie_word_embeddings': config.tie_embeddings,
      'max_position_embeddings': config.max_position_embeddings,
      'rope_parameters': rope,
  }
  if config.family == 'qwen2':
    if config.rope_scaling is not None:
      raise UserError('llama3 rope scaling in a Qwen2 decoder has no Hugging Face equivalent')
    return transformers.Qwen2Config(**common)
  if config.qkv_bias:
    raise UserError(f'a {config.family} decoder with q/k/v biases has no Hugging Face '
                    "equivalent; q/k/v biases export as family 'qwen2'")
  if config.family == 'mistral':
    return transformers.MistralConfig(**common, sliding_window=None)
  return transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def vision_config_to_hf(config: VisionConfig) -> transformers.PretrainedConfig:
  """A CLIPVisionConfig, SiglipVisionConfig (without SigLIP's pooling head) or Dinov2Config
  (without the mask token, which only masked-image pretraining uses)."""
  common = {
      'image_size': config.image_size,
      'patch_size': config.patch_size,
      'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size,
      'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads,
      'layer_norm_eps': config.layer_norm_eps,
      'hidden_act': config.hidden_act,
  }
  if config.kind == 'clip':
    return transformers.CLIPVisionConfig(**common)
  if config.kind == 'dinov2':
    del common['intermediate_size']
    common['image_size'] = config.table_grid * config.patch_size
    if config.intermediate_size % config.hidden_size:
      raise UserError(f'a DINOv2 MLP of {config.intermediate_size} for width '
                      f'{config.hidden_size} has no integer mlp_ratio')
    return transformers.Dinov2Config(
        **common, mlp_ratio=config.intermediate_size // config.hidden_size, use_mask_token=False)
  return transformers.SiglipVisionConfig(**common, vision_use_head=False)


def vlm_config_to_hf(config: VLMConfig) -> transformers.PretrainedConfig:
  """A LlavaConfig (LlavaNextConfig with image_grid_pinpoints, LlavaOnevisionConfig with
  anyres_max_crops too) for our VLM config (mlp2x_gelu projector only, as in transformers)."""
  if config.projector != 'mlp2x_gelu':
    raise UserError(
        f"projector {config.projector!r} has no LlavaForConditionalGeneration equivalent; "
        "only 'mlp2x_gelu' exports"
    )
  vision = config.vision
  feature_select = vision.feature_select
  if vision.kind == 'siglip':
    feature_select = 'full'  # Ours keeps every SigLIP patch; HF's 'default' would drop one.
  if config.anyres_max_crops:  # LlavaOnevisionConfig has no image_seq_length
    architecture, kind_fields = 'LlavaOnevision', {
        'vision_aspect_ratio': f'anyres_max_{config.anyres_max_crops}'}
  elif config.image_grid_pinpoints:
    architecture, kind_fields = 'LlavaNext', {'image_seq_length': vision.num_image_tokens}
  else:
    architecture, kind_fields = 'Llava', {'image_seq_length': vision.num_image_tokens}
  if config.image_grid_pinpoints:
    kind_fields['image_grid_pinpoints'] = [list(pinpoint)
                                           for pinpoint in config.image_grid_pinpoints]
  config_class = getattr(transformers, f'{architecture}Config')
  llava = config_class(
      **kind_fields,
      text_config=llm_config_to_hf(config.llm),
      vision_config=vision_config_to_hf(vision),
      image_token_index=config.image_token_id,
      projector_hidden_act='gelu',
      vision_feature_layer=vision.feature_layer,
      vision_feature_select_strategy=feature_select,
      multimodal_projector_bias=config.projector_bias,
      tie_word_embeddings=config.llm.tie_embeddings,
  )
  llava.architectures = [f'{architecture}ForConditionalGeneration']
  return llava
