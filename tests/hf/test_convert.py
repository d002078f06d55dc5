"""Tensor-name conversion, checkpoint layouts, sharded loading and the stage-1 loader."""

import jax
import numpy as np
import pytest
import torch
import transformers

from openvlm_jax.hf import convert, io
from openvlm_jax.models.config import VLMConfig
from openvlm_jax.models.vlm import VLM
from tests import tiny_hf
from tests.models import test_vlm


@pytest.fixture(scope='module')
def llava_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('llava')
  model = tiny_hf.build(
      transformers.LlavaForConditionalGeneration, tiny_hf.llava_config(), folder)
  return folder, model


@pytest.mark.parametrize('layout', [
    convert.SAME, convert.FLAT, convert.KERNEL, convert.OUT_KERNEL, convert.CONV])
def test_layouts_are_inverse(layout):
  shape = (2, 3, 4, 5) if layout.kind == 'conv' else (6, 2, 4)
  param = np.random.default_rng(0).normal(size=shape)
  tensor = layout.to_hf(param)
  assert tensor.shape == layout.hf_shape(shape)
  np.testing.assert_array_equal(layout.to_param(tensor, shape), param)


def test_transformers5_in_memory_names_load_like_saved_ones(llava_folder):
  folder, hf_model = llava_folder
  config, saved = io.load_pretrained(folder)
  state = {name: tensor.numpy() for name, tensor in hf_model.state_dict().items()}
  assert any(name.startswith('model.language_model.') for name in state)
  in_memory = convert.hf_to_params(state, config)
  jax.tree.map(np.testing.assert_array_equal, in_memory, jax.tree.map(np.asarray, saved))


def test_unrolled_layers_round_trip(llava_folder):
  folder, _ = llava_folder
  config, _ = io.load_pretrained(folder, scan_layers=False)
  reader = io.SafetensorsReader(folder)
  params = convert.hf_to_params(reader, config)
  assert 'layers_1' in params['llm'] and 'layers' not in params['llm']
  exported = convert.params_to_hf(params, config)
  # transformers 5 saves the vision tower without the classic 'vision_model.' level.
  saved_names = {name.replace('vision_tower.vision_model.', 'vision_tower.'): name
                 for name in exported}
  assert set(saved_names) == set(reader)
  for saved_name, name in saved_names.items():
    np.testing.assert_array_equal(exported[name], reader[saved_name], err_msg=name)


def test_missing_tensor_is_named(llava_folder):
  folder, _ = llava_folder
  config, _ = io.load_pretrained(folder)
  tensors = dict(io.SafetensorsReader(folder))
  del tensors['language_model.model.layers.1.mlp.up_proj.weight']
  with pytest.raises(ValueError, match=r'layers\.1\.mlp\.up_proj\.weight is missing'):
    convert.hf_to_params(tensors, config)


def test_mismatched_shape_names_tensor_and_shapes(llava_folder):
  folder, _ = llava_folder
  config, _ = io.load_pretrained(folder)
  tensors = dict(io.SafetensorsReader(folder))
  tensors['multi_modal_projector.linear_1.weight'] = np.zeros((32, 7), np.float32)
  with pytest.raises(ValueError, match=r'linear_1\.weight has shape \(32, 7\), expected \(32, 24\)'):
    convert.hf_to_params(tensors, config)


def _data_sharding(mesh, shape):
  spec = ('data',) if shape and shape[0] % mesh.size == 0 else ()
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def test_load_places_each_parameter_with_its_sharding(llava_folder):
  folder, _ = llava_folder
  config, _ = io.load_pretrained(folder)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  shardings = jax.tree.map(lambda s: _data_sharding(mesh, s.shape),
                           convert.abstract_params(config))
  _, params = io.load_pretrained(folder, shardings=shardings)
  embedding = params['llm']['embed_tokens']['embedding']  # [128, 32] split over 8 devices
  assert embedding.sharding == shardings['llm']['embed_tokens']['embedding']
  assert len(embedding.addressable_shards) == mesh.size
  assert embedding.addressable_shards[0].data.shape == (128 // mesh.size, 32)
  jax.tree.map(lambda p, s: p.sharding.is_equivalent_to(s, p.ndim) or pytest.fail(str(s)),
               params, shardings)


def test_stage1_loader_combines_decoder_vision_and_fresh_projector(tmp_path):
  llm_folder, vision_folder = tmp_path / 'llm', tmp_path / 'vision'
  hf_llm = tiny_hf.build(transformers.LlamaForCausalLM, tiny_hf.llama_config(), llm_folder)
  tiny_hf.build(transformers.CLIPVisionModel, tiny_hf.clip_vision_config(), vision_folder)
  config, params = io.load_llm_and_vision(
      llm_folder, vision_folder, image_token_id=tiny_hf.IMAGE_TOKEN_ID, rng=jax.random.key(0))
  assert isinstance(config, VLMConfig) and config.projector == 'mlp2x_gelu'
  assert params['projector']['linear_1']['kernel'].shape == (24, 32)
  assert params['projector']['linear_2']['kernel'].shape == (32, 32)
  # Text-only positions through the VLM give the decoder's own logits.
  input_ids, mask, images, _ = test_vlm._batch(np.random.default_rng(0))
  text_ids = np.where(input_ids == tiny_hf.IMAGE_TOKEN_ID, 5, input_ids)
  logits = VLM(config).apply({'params': params}, text_ids, images,
                             positions=tiny_hf.positions_from_mask(mask), attention_mask=mask)
  with torch.no_grad():
    expected = hf_llm(
        input_ids=torch.from_numpy(text_ids).long(), attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(tiny_hf.positions_from_mask(mask)).long()).logits
  assert tiny_hf.max_abs_diff_at(logits, expected, mask) <= 1e-4
