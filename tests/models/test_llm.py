"""The decoder against transformers' LlamaForCausalLM and Qwen2ForCausalLM (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from openvlm_jax.hf import convert, io
from openvlm_jax.models.config import LLMConfig
from openvlm_jax.models.llm import LLM
from tests import tiny_hf

TOLERANCE = 1e-4


def _hf_logits(model, input_ids, attention_mask):
  positions = tiny_hf.positions_from_mask(attention_mask)
  with torch.no_grad():
    return model(
        input_ids=torch.from_numpy(input_ids).long(),
        attention_mask=torch.from_numpy(attention_mask).long(),
        position_ids=torch.from_numpy(positions).long(),
    ).logits


def _our_logits(config, params, input_ids, attention_mask, **module_kwargs):
  model = LLM(config, **module_kwargs)
  positions = tiny_hf.positions_from_mask(attention_mask)
  apply = jax.jit(lambda p, ids, pos, mask: model.apply(
      {'params': p}, ids, positions=pos, attention_mask=mask))
  return apply(params, input_ids, positions, attention_mask)


def _tokens(rng, batch=2, seq=12):
  return rng.integers(0, tiny_hf.VOCAB_SIZE, size=(batch, seq)).astype(np.int32)


@pytest.mark.parametrize('rope_scaling', [False, True], ids=['rope_default', 'rope_llama3'])
def test_llama_gqa_matches_hf(tmp_path, rope_scaling):
  hf_model = tiny_hf.build(
      transformers.LlamaForCausalLM, tiny_hf.llama_config(rope_scaling=rope_scaling), tmp_path)
  config, params = io.load_pretrained(tmp_path)
  assert config.num_kv_heads < config.num_heads
  assert (config.rope_scaling is not None) == rope_scaling
  input_ids = _tokens(np.random.default_rng(0), seq=24)
  mask = np.ones_like(input_ids)
  ours = _our_logits(config, params, input_ids, mask)
  diff = tiny_hf.max_abs_diff_at(ours, _hf_logits(hf_model, input_ids, mask), mask)
  print(f'llama rope_scaling={rope_scaling} max abs diff {diff:.2e}')
  assert diff <= TOLERANCE


def test_qwen2_biases_and_tied_embeddings_match_hf(tmp_path):
  hf_model = tiny_hf.build(transformers.Qwen2ForCausalLM, tiny_hf.qwen2_config(), tmp_path)
  config, params = io.load_pretrained(tmp_path)
  assert config.qkv_bias and config.tie_embeddings
  assert 'lm_head' not in params
  input_ids = _tokens(np.random.default_rng(1))
  mask = np.ones_like(input_ids)
  ours = _our_logits(config, params, input_ids, mask)
  diff = tiny_hf.max_abs_diff_at(ours, _hf_logits(hf_model, input_ids, mask), mask)
  print(f'qwen2 max abs diff {diff:.2e}')
  assert diff <= TOLERANCE


@pytest.mark.parametrize('scan_layers,remat', [(True, 'none'), (False, 'dots')])
def test_left_padded_batch_matches_hf(tmp_path, scan_layers, remat):
  hf_model = tiny_hf.build(transformers.LlamaForCausalLM, tiny_hf.llama_config(), tmp_path)
  config, _ = io.load_pretrained(tmp_path)
  params = convert.hf_to_params(io.SafetensorsReader(tmp_path), config, scan_layers=scan_layers)
  input_ids = _tokens(np.random.default_rng(2), batch=3, seq=10)
  mask = np.ones_like(input_ids)
  mask[1, :4] = 0  # left padding
  mask[2, :9] = 0
  input_ids[mask == 0] = 0
  ours = _our_logits(config, params, input_ids, mask, scan_layers=scan_layers, remat=remat)
  diff = tiny_hf.max_abs_diff_at(ours, _hf_logits(hf_model, input_ids, mask), mask)
  print(f'padded batch scan={scan_layers} max abs diff {diff:.2e}')
  assert diff <= TOLERANCE


def _random_llm(dtype=jnp.float32):
  config = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=1, qkv_bias=True)
  model = LLM(config, dtype=dtype)
  input_ids = jnp.asarray(_tokens(np.random.default_rng(3), batch=2, seq=7) % 64)
  mask = jnp.ones_like(input_ids)
  params = jax.jit(model.init)(jax.random.key(0), input_ids, attention_mask=mask)['params']
  return model, params, input_ids, mask


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_logits_shape_and_dtype(dtype):
  model, params, input_ids, mask = _random_llm(dtype)
  logits = model.apply({'params': params}, input_ids, attention_mask=mask)
  assert logits.shape == (2, 7, 64)
  assert logits.dtype == jnp.float32
  embeds = model.apply({'params': params}, input_ids, method=LLM.embed)
  assert embeds.shape == (2, 7, 32) and embeds.dtype == dtype
  from_embeds = model.apply({'params': params}, inputs_embeds=embeds, attention_mask=mask)
  np.testing.assert_allclose(from_embeds, logits, atol=1e-6)


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
  model, params, input_ids, mask = _random_llm()
  logits = model.apply({'params': params}, input_ids, attention_mask=mask)
  changed = input_ids.at[:, 4].set((input_ids[:, 4] + 1) % 64)
  changed_logits = model.apply({'params': params}, changed, attention_mask=mask)
  np.testing.assert_array_equal(changed_logits[:, :4], logits[:, :4])
  assert np.abs(changed_logits[:, 4:] - logits[:, 4:]).max() > 1e-4
