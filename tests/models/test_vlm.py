"""The VLM against transformers' LlavaForConditionalGeneration (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from openvlm_jax.hf import io
from openvlm_jax.models.vlm import VLM, merge_image_features
from tests import tiny_hf

TOLERANCE = 1e-4
IMAGE_RUN = [tiny_hf.IMAGE_TOKEN_ID] * tiny_hf.NUM_PATCHES


def _batch(rng):
  """Two examples: two images in the first, one in the second (left-padded, one padding image).

  Returns input_ids [2, seq], attention_mask [2, seq], images [2, 2, H, W, 3], and the HF
  pixel_values of the real images in order of appearance.
  """
  def text(n):
    return list(rng.integers(0, 90, size=n))

  first = text(3) + IMAGE_RUN + text(4) + IMAGE_RUN + text(5)
  second = text(2) + IMAGE_RUN + text(6)
  seq = len(first)
  input_ids = np.zeros((2, seq), np.int32)
  mask = np.zeros((2, seq), np.int32)
  input_ids[0], mask[0] = first, 1
  input_ids[1, seq - len(second):], mask[1, seq - len(second):] = second, 1
  images = tiny_hf.random_images(rng, 2, 2)
  images[1, 1] = 0.0  # padding image
  pixel_values = tiny_hf.nchw(np.stack([images[0, 0], images[0, 1], images[1, 0]]))
  return input_ids, mask, images, pixel_values


def _hf_logits(model, input_ids, mask, pixel_values):
  with torch.no_grad():
    return model(
        input_ids=torch.from_numpy(input_ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        position_ids=torch.from_numpy(tiny_hf.positions_from_mask(mask)).long(),
        pixel_values=pixel_values,
    ).logits


def _apply(config, params, input_ids, mask, images):
  model = VLM(config)
  apply = jax.jit(lambda p, ids, x, pos, m: model.apply(
      {'params': p}, ids, x, positions=pos, attention_mask=m))
  return apply(params, input_ids, images, tiny_hf.positions_from_mask(mask), mask)


@pytest.mark.parametrize('text,vision', [('llama', 'clip'), ('qwen2', 'siglip'),
                                         ('llama', 'dinov2')])
def test_llava_matches_hf_with_several_images_and_padding(tmp_path, text, vision):
  hf_model = tiny_hf.build(
      transformers.LlavaForConditionalGeneration, tiny_hf.llava_config(text, vision), tmp_path)
  if vision == 'dinov2':
    tiny_hf.save_image_processor(tmp_path)
  config, params = io.load_pretrained(tmp_path)
  assert set(params) == {'vision', 'projector', 'llm'}
  assert config.vision.num_image_tokens == tiny_hf.NUM_PATCHES
  input_ids, mask, images, pixel_values = _batch(np.random.default_rng(0))
  ours = _apply(config, params, input_ids, mask, images)
  assert ours.shape == (*input_ids.shape, tiny_hf.VOCAB_SIZE)
  diff = tiny_hf.max_abs_diff_at(ours, _hf_logits(hf_model, input_ids, mask, pixel_values), mask)
  print(f'llava {text}+{vision} max abs diff {diff:.2e}')
  assert diff <= TOLERANCE


def test_image_changes_logits_only_from_its_tokens_on(tmp_path):
  tiny_hf.build(transformers.LlavaForConditionalGeneration, tiny_hf.llava_config(), tmp_path)
  config, params = io.load_pretrained(tmp_path)
  input_ids, mask, images, _ = _batch(np.random.default_rng(1))
  logits = _apply(config, params, input_ids, mask, images)
  changed_images = images.copy()
  changed_images[0, 1] += 1.0  # the second image of the first example
  changed = _apply(config, params, input_ids, mask, changed_images)
  second_image_start = 3 + tiny_hf.NUM_PATCHES + 4
  np.testing.assert_array_equal(changed[0, :second_image_start], logits[0, :second_image_start])
  assert np.abs(changed[0, second_image_start:] - logits[0, second_image_start:]).min() > 0
  np.testing.assert_array_equal(changed[1], logits[1])  # the other example is untouched
  # The padding image is never read.
  padded_images = images.copy()
  padded_images[1, 1] = 5.0
  np.testing.assert_array_equal(_apply(config, params, input_ids, mask, padded_images), logits)


def test_precomputed_image_features_give_same_logits(tmp_path):
  tiny_hf.build(transformers.LlavaForConditionalGeneration, tiny_hf.llava_config(), tmp_path)
  config, params = io.load_pretrained(tmp_path)
  input_ids, mask, images, _ = _batch(np.random.default_rng(2))
  model = VLM(config)
  features = jax.jit(lambda p, x: model.apply({'params': p}, x, method=VLM.encode_images))(
      params, images)
  assert features.shape == (2, 2, tiny_hf.NUM_PATCHES, 32)
  from_features = jax.jit(lambda p, ids, m, f: model.apply(
      {'params': p}, ids, attention_mask=m, image_features=f))(params, input_ids, mask, features)
  from_images = _apply(config, params, input_ids, mask, images)
  np.testing.assert_allclose(from_features, from_images, atol=1e-6)


def test_merge_replaces_image_tokens_in_order():
  input_ids = jnp.array([[7, 9, 9, 7, 9, 7]])
  text_embeds = jnp.zeros((1, 6, 1))
  image_features = jnp.arange(1, 7, dtype=jnp.float32).reshape(1, 2, 3, 1)  # 2 images x 3
  merged = merge_image_features(input_ids, text_embeds, image_features, image_token_id=9)
  np.testing.assert_array_equal(merged[0, :, 0], [0, 1, 2, 0, 3, 0])


def test_bfloat16_compute_runs_close_to_float32(tmp_path):
  tiny_hf.build(transformers.LlavaForConditionalGeneration, tiny_hf.llava_config(), tmp_path)
  config, params = io.load_pretrained(tmp_path)
  bf16_config, _ = io.load_pretrained(tmp_path, dtype='bfloat16')
  input_ids, mask, images, _ = _batch(np.random.default_rng(3))
  full = _apply(config, params, input_ids, mask, images)
  half = _apply(bf16_config, params, input_ids, mask, images)
  assert half.dtype == jnp.float32
  assert tiny_hf.max_abs_diff_at(half, full, mask) < 0.1
