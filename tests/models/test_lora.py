"""LoRA Dense: zero B reproduces the base model exactly; adapters equal merged weights; QLoRA
bases dequantize inside the layer; adapters carry logical axes that shard with W."""

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import sft
from openvlm_jax import config_lib
from openvlm_jax.models import lora, vlm
from openvlm_jax.models.config import LoraConfig

TARGETS = (r'llm/.*/(q|k|v|o)_proj', r'llm/.*/mlp/.*', r'projector/.*', r'vision/.*/fc1')


@functools.cache
def base_config():
  config = sft.get_config('model=tiny')
  return config_lib.build_vlm_config(config.model, vocab_size=64, image_token_id=3)


def lora_config(base_dtype='float32'):
  return dataclasses.replace(base_config(), lora=LoraConfig(
      rank=4, alpha=8.0, targets=TARGETS, base_dtype=base_dtype))


@functools.cache
def jitted_logits(config):
  model = vlm.VLM(config)
  return jax.jit(lambda params, inputs: model.apply(
      {'params': params}, inputs['input_ids'], inputs['images'],
      positions=inputs['positions'], attention_mask=inputs['attention_mask']))


def inputs_for(config):
  rng = np.random.default_rng(0)
  inputs = vlm.dummy_inputs(config, batch_size=2, seq_len=12)
  input_ids = rng.integers(4, 64, size=(2, 12)).astype(np.int32)
  input_ids[:, 1:1 + config.vision.num_image_tokens] = 3
  inputs['input_ids'] = input_ids
  inputs['images'] = rng.normal(size=inputs['images'].shape).astype(np.float32)
  return inputs


def adapted(base_params, config, seed=1):
  abstract = nn.unbox(jax.eval_shape(functools.partial(vlm.init_params, config),
                                     jax.random.key(0)))['params']
  return lora.adapt_params(base_params, abstract, config.lora, jax.random.key(seed))


@pytest.fixture(scope='module')
def base_params():
  return nn.unbox(vlm.init_params(base_config(), jax.random.key(0)))['params']


def test_zero_b_gives_exactly_the_base_logits_and_adapters_equal_merged_weights(base_params):
  config, inputs = lora_config(), inputs_for(base_config())
  params = adapted(base_params, config)
  assert params['llm']['layers']['attention']['q_proj']['lora_a'].shape == (2, 32, 4)
  assert 'lora_a' in params['vision']['layers']['fc1'] and 'lora_a' not in params['vision'][
      'layers']['fc2']
  base_logits = jitted_logits(base_config())(base_params, inputs)
  lora_logits = jitted_logits(config)(params, inputs)
  np.testing.assert_array_equal(np.asarray(lora_logits), np.asarray(base_logits))

  # Random B: the adapted model equals the base model run on W + A B * alpha / r.
  keys = iter(jax.random.split(jax.random.key(2), 100))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.random.normal(next(keys), x.shape) * 0.1
      if getattr(path[-1], 'key', '') == 'lora_b' else x, params)
  lora_logits = jitted_logits(config)(params, inputs)
  merged_logits = jitted_logits(base_config())(lora.merge_params(params, config.lora), inputs)
  assert np.max(np.abs(np.asarray(lora_logits) - np.asarray(base_logits))) > 1e-3
  np.testing.assert_allclose(lora_logits, merged_logits, atol=1e-5)


@pytest.mark.parametrize('base_dtype', ['int8', 'nf4'])
def test_quantized_base_dequantizes_inside_the_layer(base_params, base_dtype):
  config, inputs = lora_config(base_dtype), inputs_for(base_config())
  params = adapted(base_params, config)
  stored = params['llm']['layers']['mlp']['up_proj']
  assert 'kernel' not in stored
  assert stored[f'kernel_{base_dtype}'].dtype == (np.int8 if base_dtype == 'int8' else np.uint8)
  lora_logits = np.asarray(jitted_logits(config)(params, inputs))
  merged = lora.merge_params(params, config.lora)
  merged_logits = np.asarray(jitted_logits(base_config())(merged, inputs))
  np.testing.assert_allclose(lora_logits, merged_logits, atol=1e-5)
  # Quantization moves the logits only a little from the float model's.
  base_logits = np.asarray(jitted_logits(base_config())(base_params, inputs))
  tolerance = {'int8': 0.01, 'nf4': 0.1}[base_dtype]
  assert 0 < np.max(np.abs(lora_logits - base_logits)) < tolerance


def test_adapters_carry_logical_axes_of_their_kernel():
  boxed = jax.eval_shape(functools.partial(vlm.init_params, lora_config('int8')),
                         jax.random.key(0))
  specs = nn.get_partition_spec(boxed)['params']
  o_proj = specs['llm']['layers']['attention']['o_proj']
  assert tuple(o_proj['kernel_int8']) == ('layers', 'heads', 'head_dim', 'embed')
  assert tuple(o_proj['kernel_scale']) == ('layers', None, None, 'embed')
  assert tuple(o_proj['lora_a']) == ('layers', 'heads', 'head_dim', 'lora_rank')
  assert tuple(o_proj['lora_b']) == ('layers', 'lora_rank', 'embed')
  assert tuple(specs['llm']['layers']['mlp']['up_proj']['lora_b']) == (
      'layers', 'lora_rank', 'mlp')
  # NF4: the packed row axis mixes input rows; the output axes shard like the kernel's.
  boxed = jax.eval_shape(functools.partial(vlm.init_params, lora_config('nf4')),
                         jax.random.key(0))
  nf4 = nn.get_partition_spec(boxed)['params']['llm']['layers']
  for name in ('kernel_nf4', 'kernel_absmax'):
    assert tuple(nf4['attention']['o_proj'][name]) == ('layers', None, 'embed')
    assert tuple(nf4['mlp']['up_proj'][name]) == ('layers', None, 'mlp')
  assert lora.is_target(lora_config().lora, 'llm/layers_3/attention/k_proj')
  assert not lora.is_target(lora_config().lora, 'llm/lm_head')
