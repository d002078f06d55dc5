"""Export: our params -> save_pretrained -> transformers loads them with no key warnings."""

import json

import flax.linen as nn
import jax
import numpy as np
import PIL.Image
import pytest
import tokenizers
import torch
import transformers

from openvlm_jax.hf import io
from openvlm_jax.models.config import LLMConfig, VisionConfig, VLMConfig
from openvlm_jax.models.vlm import init_params
from tests import tiny_hf
from tests.models import test_vlm


def _vlm_config(text: str, vision: str) -> VLMConfig:
  llm = LLMConfig(
      vocab_size=tiny_hf.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, qkv_bias=text == 'qwen2',
      tie_embeddings=text == 'qwen2', family=text,
  )
  is_clip, is_dinov2 = vision == 'clip', vision == 'dinov2'
  vision_config = VisionConfig(
      kind=vision, image_size=tiny_hf.IMAGE_SIZE, patch_size=tiny_hf.PATCH_SIZE,
      hidden_size=24, intermediate_size=48, num_layers=2, num_heads=2,
      hidden_act={'clip': 'quick_gelu', 'siglip': 'gelu_pytorch_tanh'}.get(vision, 'gelu'),
      layer_norm_eps=1e-5 if is_clip else 1e-6,
      feature_layer=-1 if vision == 'siglip' else -2,
      feature_select='full' if vision == 'siglip' else 'default',
      position_grid=6 if is_dinov2 else 0,  # a table for 24 px images, read at 16 px
  )
  return VLMConfig(llm=llm, vision=vision_config, image_token_id=tiny_hf.IMAGE_TOKEN_ID)


def _random_vlm(text: str, vision: str, seed: int = 0):
  config = _vlm_config(text, vision)
  params = nn.unbox(init_params(config, jax.random.key(seed)))['params']
  # Move norms and biases off their initial values so every tensor matters.
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda leaf: np.asarray(leaf) + rng.normal(0, 0.05, leaf.shape).astype(np.float32), params)
  return config, params


def _load_hf(folder):
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      folder, output_loading_info=True, attn_implementation='eager', dtype=torch.float32)
  for key in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs'):
    assert not info[key], (key, info[key])
  return model.eval()


@pytest.mark.parametrize('text,vision', [('llama', 'clip'), ('qwen2', 'siglip'),
                                         ('qwen2', 'dinov2')])
def test_export_float32_loads_in_transformers_with_same_logits(tmp_path, text, vision):
  config, params = _random_vlm(text, vision)
  io.save_pretrained(config, params, tmp_path)
  hf_model = _load_hf(tmp_path)
  input_ids, mask, images, pixel_values = test_vlm._batch(np.random.default_rng(0))
  ours = test_vlm._apply(config, params, input_ids, mask, images)
  theirs = test_vlm._hf_logits(hf_model, input_ids, mask, pixel_values)
  diff = tiny_hf.max_abs_diff_at(ours, theirs, mask)
  print(f'export {text}+{vision} float32 max abs diff {diff:.2e}')
  assert diff <= 1e-4
  # And back: loading the export gives our params again.
  loaded_config, loaded = io.load_pretrained(tmp_path)
  assert loaded_config.llm == config.llm
  assert loaded_config.vision.feature_layer == config.vision.feature_layer
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               loaded, params)


def test_export_bfloat16_sharded(tmp_path):
  config, params = _random_vlm('llama', 'clip', seed=3)
  io.save_pretrained(config, params, tmp_path, dtype='bfloat16', max_shard_size='20KB')
  index = json.loads((tmp_path / io.INDEX_FILE).read_text())
  shard_files = sorted(set(index['weight_map'].values()))
  assert len(shard_files) > 2 and all((tmp_path / name).exists() for name in shard_files)
  assert not list(tmp_path.glob('model-partial-*'))
  assert json.loads((tmp_path / 'config.json').read_text())['dtype'] == 'bfloat16'
  hf_model = _load_hf(tmp_path)
  assert hf_model.lm_head.weight.dtype == torch.float32  # loaded as asked, from bf16 tensors
  input_ids, mask, images, pixel_values = test_vlm._batch(np.random.default_rng(1))
  ours = test_vlm._apply(config, params, input_ids, mask, images)
  theirs = test_vlm._hf_logits(hf_model, input_ids, mask, pixel_values)
  diff = tiny_hf.max_abs_diff_at(ours, theirs, mask)
  print(f'export bfloat16 sharded max abs diff {diff:.2e}')
  assert diff <= 5e-2
  # Our loader reads the sharded bf16 folder back (rounded to bf16).
  _, loaded = io.load_pretrained(tmp_path)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2),
               loaded, params)


def test_export_decoder_only(tmp_path):
  config, params = _random_vlm('qwen2', 'siglip')
  io.save_pretrained(config.llm, params['llm'], tmp_path)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, output_loading_info=True, attn_implementation='eager')
  assert not info['missing_keys'] and not info['unexpected_keys']
  assert isinstance(model, transformers.Qwen2ForCausalLM)


def _tiny_tokenizer():
  words = ['<unk>', '<pad>', '<image>', 'what', 'is', 'this', '?']
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {word: i for i, word in enumerate(words)}, unk_token='<unk>'))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token='<unk>', pad_token='<pad>')
  tokenizer.add_special_tokens({'additional_special_tokens': ['<image>']})
  return tokenizer


@pytest.mark.parametrize('vision', ['clip', 'siglip', 'dinov2'])
def test_save_processor_expands_image_tokens(tmp_path, vision):
  config = _vlm_config('llama', vision)
  io.save_processor(tmp_path, _tiny_tokenizer(), config.vision)
  processor = transformers.AutoProcessor.from_pretrained(tmp_path)
  image = PIL.Image.fromarray(np.full((20, 24, 3), 128, np.uint8))
  inputs = processor(text='<image> what is this ?', images=image, return_tensors='np')
  image_token_id = processor.tokenizer.convert_tokens_to_ids('<image>')
  assert int((inputs['input_ids'] == image_token_id).sum()) == config.vision.num_image_tokens
  assert inputs['pixel_values'].shape == (1, 3, tiny_hf.IMAGE_SIZE, tiny_hf.IMAGE_SIZE)
  np.testing.assert_allclose(
      processor.image_processor.image_mean, config.vision.image_mean, rtol=1e-6)
