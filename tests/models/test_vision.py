"""The vision tower against transformers' CLIPVisionModel, SiglipVisionModel and Dinov2Model
(float32)."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from openvlm_jax.hf import io
from openvlm_jax.models import vision
from openvlm_jax.models.vision import VisionTower
from tests import tiny_hf

TOLERANCE = 1e-4


def _run(tmp_path, model_cls, hf_config, image_processor=False):
  hf_model = tiny_hf.build(model_cls, hf_config, tmp_path)
  if image_processor:
    tiny_hf.save_image_processor(tmp_path)
  config, params = io.load_pretrained(tmp_path)
  images = tiny_hf.random_images(np.random.default_rng(0), 3)
  tower = VisionTower(config)
  encode = jax.jit(lambda p, x, output: tower.apply({'params': p}, x, output=output),
                   static_argnums=2)
  with torch.no_grad():
    hf_out = hf_model(pixel_values=tiny_hf.nchw(images), output_hidden_states=True)
  return config, encode(params, images, 'features'), encode(params, images, 'post_norm'), hf_out


def test_clip_features_match_llava_feature_layer(tmp_path):
  config, features, pooled, hf_out = _run(
      tmp_path, transformers.CLIPVisionModel, tiny_hf.clip_vision_config())
  assert (config.kind, config.feature_layer, config.feature_select) == ('clip', -2, 'default')
  assert features.shape == (3, config.num_image_tokens, 24)
  expected = hf_out.hidden_states[-2][:, 1:].numpy()  # LLaVA drops the class token
  diff = float(np.abs(np.asarray(features) - expected).max())
  pooled_diff = float(np.abs(np.asarray(pooled) - hf_out.pooler_output.numpy()).max())
  print(f'clip features max abs diff {diff:.2e}, pooled {pooled_diff:.2e}')
  assert diff <= TOLERANCE and pooled_diff <= TOLERANCE


def test_siglip_features_match_last_hidden_state_before_post_norm(tmp_path):
  config, features, post_normed, hf_out = _run(
      tmp_path, transformers.SiglipVisionModel, tiny_hf.siglip_vision_config(use_head=True))
  assert (config.kind, config.feature_layer, config.feature_select) == ('siglip', -1, 'full')
  assert features.shape == (3, tiny_hf.NUM_PATCHES, 24)
  # LLaVA reads hidden_states[-1]: the last layer's output without the post-layernorm.
  diff = float(np.abs(np.asarray(features) - hf_out.hidden_states[-1].numpy()).max())
  post_diff = float(np.abs(np.asarray(post_normed) - hf_out.last_hidden_state.numpy()).max())
  print(f'siglip features max abs diff {diff:.2e}, post-norm {post_diff:.2e}')
  assert diff <= TOLERANCE and post_diff <= TOLERANCE
  assert np.abs(np.asarray(features) - np.asarray(post_normed)).max() > 1e-2


def test_inner_feature_layer_and_embeddings(tmp_path):
  hf_model = tiny_hf.build(transformers.CLIPVisionModel, tiny_hf.clip_vision_config(), tmp_path)
  config, params = io.load_pretrained(tmp_path)
  images = tiny_hf.random_images(np.random.default_rng(1), 2)
  with torch.no_grad():
    hidden_states = hf_model(pixel_values=tiny_hf.nchw(images), output_hidden_states=True)
  for layer in (0, 1, -1):
    tower = VisionTower(
        dataclasses.replace(config, feature_layer=layer, feature_select='full'))
    features = tower.apply({'params': params}, images)
    expected = hidden_states.hidden_states[layer].numpy()
    assert np.abs(np.asarray(features) - expected).max() <= TOLERANCE, layer


@pytest.mark.parametrize('table_size', [tiny_hf.IMAGE_SIZE, 24, 12])
def test_dinov2_features_match_with_the_position_table_resized(tmp_path, table_size):
  config, features, post_normed, hf_out = _run(
      tmp_path, transformers.Dinov2Model, tiny_hf.dinov2_config(table_size), image_processor=True)
  assert (config.kind, config.feature_layer, config.feature_select) == ('dinov2', -2, 'default')
  assert (config.image_size, config.table_grid) == (tiny_hf.IMAGE_SIZE, table_size // 4)
  assert config.image_mean == (0.485, 0.456, 0.406)
  assert features.shape == (3, tiny_hf.NUM_PATCHES, 24)
  diff = float(np.abs(np.asarray(features) - hf_out.hidden_states[-2][:, 1:].numpy()).max())
  post_diff = float(np.abs(np.asarray(post_normed) - hf_out.last_hidden_state.numpy()).max())
  print(f'dinov2 (table {table_size} px) features max abs diff {diff:.2e}, '
        f'post-norm {post_diff:.2e}')
  assert diff <= TOLERANCE and post_diff <= TOLERANCE


@pytest.mark.parametrize('in_size, out_size', [(6, 4), (4, 6), (37, 16), (3, 3)])
def test_bicubic_matrix_is_torchs_bicubic_resize(in_size, out_size):
  grid = np.random.default_rng(0).normal(size=(1, 2, in_size, in_size)).astype(np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(grid), size=(out_size, out_size), mode='bicubic', align_corners=False)
  resize = vision.bicubic_matrix(in_size, out_size)
  ours = np.einsum('ih,bchw,jw->bcij', resize, grid, resize)
  np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)
