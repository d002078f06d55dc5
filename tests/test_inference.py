"""KV-cache decoding against recomputing the full sequence, and against transformers' generate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from openvlm_jax import inference
from openvlm_jax.hf import io
from openvlm_jax.models.vlm import VLM
from tests import tiny_hf

MAX_NEW, STOP, PAD = 8, 13, 0  # 13: a token these weights emit, so one row stops early
IMAGE_RUN = [tiny_hf.IMAGE_TOKEN_ID] * tiny_hf.NUM_PATCHES


@pytest.fixture(scope='module')
def tiny_llava(tmp_path_factory):
  """A tiny random LLaVA in torch and the same weights in our VLM."""
  folder = tmp_path_factory.mktemp('llava')
  hf_model = tiny_hf.build(transformers.LlavaForConditionalGeneration, tiny_hf.llava_config())
  # Larger weights than the default so greedy decoding does not settle on one repeated token.
  tiny_hf.perturb(hf_model, seed=1, scale=0.3).save_pretrained(folder)
  config, params = io.load_pretrained(folder)
  return hf_model, VLM(config), params


@pytest.fixture(scope='module')
def prompts():
  """Two left-padded prompts with one image each, of different lengths."""
  rng = np.random.default_rng(0)
  rows = [[1] + list(rng.integers(4, 90, size=3)) + IMAGE_RUN + list(rng.integers(4, 90, size=4)),
          [1] + IMAGE_RUN + list(rng.integers(4, 90, size=2))]
  input_ids, attention_mask = inference.left_pad(rows, PAD)
  images = tiny_hf.random_images(rng, 2, 1)
  return input_ids, attention_mask, images


@pytest.fixture(scope='module')
def greedy_tokens(tiny_llava, prompts):
  _, model, params = tiny_llava
  sampling = inference.SamplingConfig(max_new_tokens=MAX_NEW, stop_token_ids=(STOP,),
                                      pad_token_id=PAD)
  out = inference.make_generate_fn(model, sampling)(params, *prompts)
  return np.asarray(out['tokens']), np.asarray(out['num_tokens'])


def test_cached_greedy_matches_recomputing_the_whole_sequence(tiny_llava, prompts,
                                                              greedy_tokens):
  _, model, params = tiny_llava
  input_ids, attention_mask, images = prompts
  batch, prompt_len = input_ids.shape
  # One fixed-size buffer: generated slots are masked out until they are filled.
  ids = np.concatenate([input_ids, np.full((batch, MAX_NEW), PAD, np.int32)], axis=1)
  mask = np.concatenate([attention_mask, np.zeros((batch, MAX_NEW), np.int32)], axis=1)
  full = jax.jit(lambda p, i, m, x: model.apply({'params': p}, i, x, attention_mask=m))
  done = np.zeros(batch, bool)
  expected = np.full((batch, MAX_NEW), PAD, np.int32)
  for step in range(MAX_NEW):
    last = prompt_len + step - 1
    token = np.asarray(jnp.argmax(full(params, ids, mask, images)[:, last], axis=-1))
    expected[:, step] = np.where(done, PAD, token)
    done |= token == STOP
    ids[:, last + 1], mask[:, last + 1] = token, 1
  tokens, num_tokens = greedy_tokens
  np.testing.assert_array_equal(tokens, expected)
  stopped = num_tokens < MAX_NEW
  assert stopped.any() and not stopped.all()
  for row in np.flatnonzero(stopped):
    assert tokens[row, num_tokens[row] - 1] == STOP
    assert (tokens[row, num_tokens[row]:] == PAD).all()


def test_cached_greedy_with_prefix_attention_matches_recomputing_with_the_prefix_mask(
    tiny_llava, prompts):
  _, causal_model, params = tiny_llava
  model = VLM(dataclasses.replace(causal_model.config, prefix_attention=True))
  input_ids, attention_mask, images = prompts
  batch, prompt_len = input_ids.shape
  sampling = inference.SamplingConfig(max_new_tokens=MAX_NEW, pad_token_id=PAD)
  out = inference.make_generate_fn(model, sampling)(params, *prompts)
  # The whole sequence at once: the left-padded prompt (slots < prompt_len) is the prefix.
  prefix_len = np.full((batch,), prompt_len, np.int32)
  ids = np.concatenate([input_ids, np.full((batch, MAX_NEW), PAD, np.int32)], axis=1)
  mask = np.concatenate([attention_mask, np.zeros((batch, MAX_NEW), np.int32)], axis=1)
  full = jax.jit(lambda p, i, m, x, n: model.apply({'params': p}, i, x, attention_mask=m,
                                                   prefix_len=n))
  expected = np.zeros((batch, MAX_NEW), np.int32)
  for step in range(MAX_NEW):
    last = prompt_len + step - 1
    logits = full(params, ids, mask, images, prefix_len)
    if step == 0:  # the prefix mask matters: causal attention gives other logits here
      causal = full(params, ids, mask, images, None)
      assert float(jnp.max(jnp.abs(logits[:, last] - causal[:, last]))) > 1e-3
    expected[:, step] = np.asarray(jnp.argmax(logits[:, last], axis=-1))
    ids[:, last + 1], mask[:, last + 1] = expected[:, step], 1
  np.testing.assert_array_equal(np.asarray(out['tokens']), expected)
  assert len(set(expected.ravel().tolist())) > 2  # not a degenerate constant output


def test_cached_greedy_matches_transformers_generate(tiny_llava, prompts, greedy_tokens):
  hf_model, _, _ = tiny_llava
  input_ids, attention_mask, images = prompts
  with torch.no_grad():
    hf_out = hf_model.generate(
        input_ids=torch.from_numpy(input_ids).long(),
        attention_mask=torch.from_numpy(attention_mask).long(),
        pixel_values=tiny_hf.nchw(images[:, 0]), max_new_tokens=MAX_NEW, do_sample=False,
        eos_token_id=STOP, pad_token_id=PAD)
  hf_tokens = hf_out[:, input_ids.shape[1]:].numpy()
  tokens, _ = greedy_tokens
  print('ours', tokens.tolist(), 'transformers', hf_tokens.tolist())
  np.testing.assert_array_equal(tokens[:, :hf_tokens.shape[1]], hf_tokens)
  assert (tokens[:, hf_tokens.shape[1]:] == PAD).all()
  assert len(set(tokens.ravel().tolist())) > 2  # not a degenerate constant output


def test_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept_k = np.isfinite(np.asarray(inference.filter_logits(logits, top_k=2)))
  np.testing.assert_array_equal(kept_k, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept_p = np.isfinite(np.asarray(inference.filter_logits(logits, top_p=0.7)))
  np.testing.assert_array_equal(kept_p, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept_p = np.isfinite(np.asarray(inference.filter_logits(logits, top_p=0.81)))
  np.testing.assert_array_equal(kept_p, [[1, 1, 1, 0], [0, 1, 1, 1]])
  sampling = inference.SamplingConfig(temperature=1.0, top_k=1)
  draws = inference.sample_tokens(logits, jax.random.key(0), sampling)
  np.testing.assert_array_equal(draws, [0, 3])


@pytest.mark.parametrize('base_dtype,scan_layers', [('float32', True), ('nf4', True),
                                                    ('float32', False)])
def test_the_cached_decoder_runs_the_lora_adapters(tiny_llava, prompts, base_dtype,
                                                   scan_layers):
  """Trained adapters (B != 0) change the cached decoder's logits exactly as the forward's."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from openvlm_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from openvlm_jax.models.config import LoraConfig  # pylint: disable=g-import-not-at-top
  _, model, _ = tiny_llava
  lora = LoraConfig(rank=4, alpha=8.0, targets=(r'llm/.*',), base_dtype=base_dtype)
  lora_model = VLM(dataclasses.replace(model.config, lora=lora, scan_layers=scan_layers))
  input_ids, attention_mask, images = prompts
  params = nn.unbox(lora_model.init(jax.random.key(0), input_ids, images,
                                    attention_mask=attention_mask)['params'])
  params = jax.tree_util.tree_map_with_path(  # trained adapters: B away from zero
      lambda path, leaf: leaf + 0.2 if 'lora_b' in jax.tree_util.keystr(path) else leaf, params)
  forward = jax.jit(lambda p: lora_model.apply({'params': p}, input_ids, images,
                                               attention_mask=attention_mask))
  full = forward(params)
  sampling = inference.SamplingConfig(max_new_tokens=1, pad_token_id=PAD)
  first = inference.make_generate_fn(lora_model, sampling)(params, input_ids, attention_mask,
                                                           images)['tokens'][:, 0]
  np.testing.assert_array_equal(first, np.argmax(full[:, -1], axis=-1))
  image_features = lora_model.apply({'params': params}, images, method=VLM.encode_images)
  cache = inference.init_cache(model.config.llm, *input_ids.shape)
  cached, _ = lora_model.apply(
      {'params': params}, input_ids, positions=inference.positions_from_mask(attention_mask),
      cache_mask=attention_mask, cache=cache, write_index=jnp.int32(0),
      image_features=image_features, method=VLM.decode)
  real = attention_mask > 0
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=2e-4)
  base = forward(lora_lib.without_adapters(params))
  assert np.abs(np.asarray(full) - np.asarray(base))[real].max() > 1e-2  # adapters matter
