"""PEFT export: `peft.PeftModel` on our adapter folder, and transformers on our merged export,
give our LoRA model's logits on a tiny LLaVA."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import numpy as np
import peft
import torch
import transformers

from openvlm_jax.hf import io, peft_export
from openvlm_jax.models import lora
from openvlm_jax.models.config import LoraConfig
from openvlm_jax.models.vlm import init_params
from tests import tiny_hf
from tests.models import test_vlm

TARGETS = (r'llm/.*/(q|k|v|o)_proj', r'llm/.*/mlp/.*', r'vision/.*/(fc1|o_proj)',
           r'projector/linear_2')


def _lora_model(base_folder, base_dtype='float32'):
  """Our tiny LLaVA from `base_folder` with adapters whose B is random (so they matter)."""
  config, float_params = io.load_pretrained(base_folder)
  config = dataclasses.replace(config, lora=LoraConfig(
      rank=4, alpha=8.0, targets=TARGETS, base_dtype=base_dtype))
  abstract = nn.unbox(jax.eval_shape(functools.partial(init_params, config),
                                     jax.random.key(0)))['params']
  params = lora.adapt_params(float_params, abstract, config.lora, jax.random.key(1))
  keys = iter(jax.random.split(jax.random.key(2), 100))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.random.normal(next(keys), x.shape) * 0.2
      if getattr(path[-1], 'key', '') == 'lora_b' else x, params)
  return config, params


def test_peft_adapter_and_merged_export_match_our_logits(tmp_path):
  base_folder, adapter_folder, merged_folder = (tmp_path / name for name in
                                                ('base', 'adapter', 'merged'))
  hf_base = tiny_hf.build(transformers.LlavaForConditionalGeneration, tiny_hf.llava_config(),
                          base_folder)
  config, params = _lora_model(base_folder)
  params['projector']['linear_1']['bias'] = params['projector']['linear_1']['bias'] + 0.5
  input_ids, mask, images, pixel_values = test_vlm._batch(np.random.default_rng(0))
  ours = test_vlm._apply(config, params, input_ids, mask, images)
  base_logits = test_vlm._hf_logits(hf_base, input_ids, mask, pixel_values)
  assert tiny_hf.max_abs_diff_at(ours, base_logits, mask) > 1e-2  # the adapters matter

  # The projector trains in full in the LoRA + projector recipe: saved whole.
  adapter_config = peft_export.save_adapter(
      adapter_folder, config, params, base_model_name_or_path=str(base_folder),
      full_components=('projector',))
  assert 'model.language_model.layers.1.mlp.down_proj' in adapter_config['target_modules']
  assert 'model.vision_tower.encoder.layers.0.self_attn.out_proj' in adapter_config[
      'target_modules']
  assert adapter_config['modules_to_save'] == ['model.multi_modal_projector']
  saved = json.loads((adapter_folder / 'adapter_config.json').read_text())
  assert saved['base_model_name_or_path'] == str(base_folder) and saved['r'] == 4
  peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_folder).eval()
  theirs = test_vlm._hf_logits(peft_model, input_ids, mask, pixel_values)
  diff = tiny_hf.max_abs_diff_at(ours, theirs, mask)
  print(f'PEFT adapter vs ours max abs diff {diff:.2e}')
  assert diff <= 1e-4

  io.save_pretrained(config, params, merged_folder)
  merged_model = transformers.LlavaForConditionalGeneration.from_pretrained(
      merged_folder, attn_implementation='eager', dtype=torch.float32).eval()
  merged = test_vlm._hf_logits(merged_model, input_ids, mask, pixel_values)
  diff = tiny_hf.max_abs_diff_at(ours, merged, mask)
  print(f'merged export vs ours max abs diff {diff:.2e}')
  assert diff <= 1e-4


def test_merged_export_dequantizes_an_nf4_base(tmp_path):
  tiny_hf.build(transformers.LlavaForConditionalGeneration, tiny_hf.llava_config(),
                tmp_path / 'base')
  config, params = _lora_model(tmp_path / 'base', base_dtype='nf4')
  assert 'kernel_nf4' in params['llm']['layers']['mlp']['up_proj']
  merged = lora.merge_params(params, config.lora)
  io.save_pretrained(config, params, tmp_path / 'merged')
  _, loaded = io.load_pretrained(tmp_path / 'merged')
  np.testing.assert_allclose(loaded['llm']['layers']['mlp']['up_proj']['kernel'],
                             merged['llm']['layers']['mlp']['up_proj']['kernel'], atol=1e-6)
  assert 'lora_a' not in loaded['llm']['layers']['mlp']['up_proj']
