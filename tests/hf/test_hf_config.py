"""Hugging Face config.json <-> our model configs."""

import dataclasses

import pytest
import transformers

from openvlm_jax.hf import config as hf_config
from openvlm_jax.models.config import LLMConfig, RopeScaling, VisionConfig, VLMConfig
from tests import tiny_hf


def test_llama3_rope_and_gqa_from_dict():
  config = hf_config.config_from_hf(tiny_hf.llama_config(rope_scaling=True).to_dict())
  assert isinstance(config, LLMConfig)
  assert config.rope_theta == 500000.0
  assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
  assert (config.num_heads, config.num_kv_heads, config.qkv_bias) == (4, 2, False)
  assert config.rms_norm_eps == 1e-5 and not config.tie_embeddings


def test_legacy_rope_keys_and_missing_defaults():
  legacy = {
      'model_type': 'llama', 'vocab_size': 10, 'hidden_size': 8, 'intermediate_size': 16,
      'num_hidden_layers': 1, 'num_attention_heads': 2, 'rope_theta': 123.0,
      'rope_scaling': {'rope_type': 'llama3', 'factor': 2.0, 'low_freq_factor': 1.0,
                       'high_freq_factor': 4.0, 'original_max_position_embeddings': 64},
  }
  config = hf_config.llm_config_from_hf(legacy)
  assert config.rope_theta == 123.0 and config.rope_scaling.factor == 2.0
  assert config.num_kv_heads == 2


def test_qwen2_has_qkv_bias_and_mistral_reads():
  assert hf_config.llm_config_from_hf(tiny_hf.qwen2_config()).qkv_bias
  mistral = transformers.MistralConfig(
      vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, sliding_window=None)
  config = hf_config.llm_config_from_hf(mistral.to_dict())
  assert not config.qkv_bias and config.num_kv_heads == 1
  # The family is recorded on import and chooses the class on export.
  assert config.family == 'mistral'
  assert isinstance(hf_config.llm_config_to_hf(config), transformers.MistralConfig)
  qwen2 = hf_config.llm_config_from_hf(tiny_hf.qwen2_config())
  assert qwen2.family == 'qwen2'
  assert isinstance(hf_config.llm_config_to_hf(qwen2), transformers.Qwen2Config)
  with pytest.raises(ValueError, match="export as family 'qwen2'"):
    hf_config.llm_config_to_hf(dataclasses.replace(config, qkv_bias=True))


def test_llava_fields_and_preprocessor_mean_std():
  raw = tiny_hf.llava_config('qwen2', 'siglip').to_dict()
  config = hf_config.vlm_config_from_hf(
      raw, {'image_mean': [0.1, 0.2, 0.3], 'image_std': [1, 2, 3]}, dtype='bfloat16')
  assert config.image_token_id == tiny_hf.IMAGE_TOKEN_ID
  assert config.llm.tie_embeddings and config.llm.qkv_bias
  assert (config.vision.kind, config.vision.feature_layer) == ('siglip', -1)
  assert config.vision.image_mean == (0.1, 0.2, 0.3) and config.vision.image_std == (1, 2, 3)
  assert config.dtype == 'bfloat16' and config.projector == 'mlp2x_gelu'


def test_unsupported_settings_are_refused():
  raw = tiny_hf.llava_config('llama', 'siglip').to_dict()
  raw['vision_feature_select_strategy'] = 'default'
  with pytest.raises(ValueError, match='SigLIP'):
    hf_config.vlm_config_from_hf(raw)
  raw = tiny_hf.llama_config().to_dict()
  raw['rope_parameters'] = {'rope_type': 'yarn', 'rope_theta': 1.0, 'factor': 2.0}
  with pytest.raises(ValueError, match='yarn'):
    hf_config.llm_config_from_hf(raw)
  linear = VLMConfig(llm=hf_config.llm_config_from_hf(tiny_hf.llama_config()),
                     vision=VisionConfig('clip', 16, 4, 8, 16, 1, 2), projector='linear')
  with pytest.raises(ValueError, match='linear'):
    hf_config.vlm_config_to_hf(linear)


@pytest.mark.parametrize('text,vision', [('llama', 'clip'), ('qwen2', 'siglip')])
def test_round_trip_through_hf(text, vision):
  config = hf_config.vlm_config_from_hf(tiny_hf.llava_config(text, vision).to_dict())
  if text == 'llama':
    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=32)
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, rope_scaling=scaling))
  exported = hf_config.vlm_config_to_hf(config).to_dict()
  assert exported['architectures'] == ['LlavaForConditionalGeneration']
  assert hf_config.vlm_config_from_hf(exported) == config
