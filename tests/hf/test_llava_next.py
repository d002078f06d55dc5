"""LLaVA-NeXT and LLaVA-OneVision (anyres) folders: import with logits parity on real photos
of several aspect ratios, and export that transformers loads back."""

import jax
import numpy as np
import pytest
import skimage.data
import sklearn.datasets
import torch
import transformers
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from openvlm_jax.data import anyres
from openvlm_jax.hf import io
from openvlm_jax.models.vlm import VLM
from openvlm_jax.training import step as step_lib
from tests import tiny_hf

SIZE = tiny_hf.IMAGE_SIZE
KINDS = {
    'next': (transformers.LlavaNextForConditionalGeneration, tiny_hf.llava_next_config),
    'onevision': (transformers.LlavaOnevisionForConditionalGeneration,
                  tiny_hf.llava_onevision_config),
}


@pytest.fixture(scope='module', params=sorted(KINDS))
def anyres_folder(request, tmp_path_factory):
  model_cls, make_config = KINDS[request.param]
  folder = tmp_path_factory.mktemp(request.param)
  model = tiny_hf.build(model_cls, make_config(), folder)
  return request.param, folder, model


def _photos() -> list[Image.Image]:
  """Package photos at a wide, a tall and a large square-ish shape (width, height); the
  last one is past OneVision's 9 crops' worth, so its grid is shrunk."""
  return [Image.fromarray(skimage.data.astronaut()).resize((40, 23)),
          Image.fromarray(skimage.data.coffee()).resize((19, 44)),
          Image.fromarray(sklearn.datasets.load_sample_image('china.jpg')).resize((64, 60))]


def _image_processor(kind: str):
  if kind == 'next':
    return LlavaNextImageProcessorPil(
        size={'shortest_edge': SIZE}, crop_size={'height': SIZE, 'width': SIZE},
        image_grid_pinpoints=tiny_hf.PINPOINTS)
  return LlavaOnevisionImageProcessorPil(
      size={'height': SIZE, 'width': SIZE}, image_grid_pinpoints=tiny_hf.ONEVISION_PINPOINTS,
      image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _inputs(config, rows: list[list[Image.Image]]):
  """Our inputs for rows of images with text around them: (input_ids, mask, images, layout,
  views per image). OneVision tiles only the images of one-image rows."""
  vision, max_crops = config.vision, config.anyres_max_crops
  image = tiny_hf.IMAGE_TOKEN_ID
  ids, row_views, row_layouts = [], [], []
  for row in rows:
    tile = len(row) == 1 or not max_crops
    views = [anyres.preprocess_anyres(
        photo, pinpoints=config.image_grid_pinpoints, crop_size=vision.image_size,
        image_mean=vision.image_mean, image_std=vision.image_std, tile=tile) for photo in row]
    layouts = [anyres.feature_layout(
        photo.size[1], photo.size[0], pinpoints=config.image_grid_pinpoints,
        crop_size=vision.image_size, patch_size=vision.patch_size, max_crops=max_crops,
        tile=tile) for photo in row]
    tokens = [1, 2]
    for number, layout in enumerate(layouts):
      tokens += [image] * len(layout) + [5 + number]
    ids.append(tokens + [9])
    row_views.append(views)
    row_layouts.append(layouts)
  seq = max(map(len, ids))
  max_views = max(sum(map(len, views)) for views in row_views)
  input_ids = np.array([row + [0] * (seq - len(row)) for row in ids], np.int32)
  mask = np.array([[1] * len(row) + [0] * (seq - len(row)) for row in ids], np.int32)
  images = np.zeros((len(rows), max_views, SIZE, SIZE, 3), np.float32)
  for b, views in enumerate(row_views):
    images[b, :sum(map(len, views))] = np.concatenate(views)
  layouts = [anyres.row_feature_index(layouts, list(map(len, views)),
                                      tokens_per_view=vision.num_image_tokens,
                                      max_views=max_views, length=seq)
             for layouts, views in zip(row_layouts, row_views)]
  index = np.stack([layout.index for layout in layouts])
  weight = None if max_crops == 0 else np.stack([layout.weight for layout in layouts])
  return input_ids, mask, images, index, weight, [v for views in row_views for v in views]


def test_logits_match_transformers_on_photos_of_several_aspect_ratios(anyres_folder):
  kind, folder, hf_model = anyres_folder
  config, params = io.load_pretrained(folder)
  assert config.image_grid_pinpoints == tuple(map(tuple, hf_model.config.image_grid_pinpoints))
  assert config.anyres_max_crops == (9 if kind == 'onevision' else 0)
  wide, tall, large = _photos()
  rows = [[large], [wide, tall]] if kind == 'onevision' else [[wide], [tall, large]]
  input_ids, mask, images, index, weight, views = _inputs(config, rows)

  processor = _image_processor(kind)
  if kind == 'onevision':
    inputs = processor(rows, return_tensors='pt')  # one list per row: multi-image rows untiled
    extra = {'batch_num_images': inputs['batch_num_images']}
  else:
    inputs = processor([photo for row in rows for photo in row], return_tensors='pt')
    extra = {}
  for i, ours in enumerate(views):  # HF pads every image to the most views
    theirs = inputs['pixel_values'][i, :len(ours)].numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
  assert len({len(v) for v in views}) > 1  # the photos are tiled differently
  if kind == 'onevision':  # the large photo's grid is shrunk: tokens mix bilinear taps
    assert ((weight > 0) & (weight < 1)).any()

  positions = tiny_hf.positions_from_mask(mask)
  batch = dict(input_ids=input_ids, images=images, positions=positions, attention_mask=mask,
               image_feature_index=index)
  if weight is not None:
    batch['image_feature_weight'] = weight
  ours = step_lib.model_logits(VLM(config), params, batch)  # as the train step calls it
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.from_numpy(input_ids).long(),
                      attention_mask=torch.from_numpy(mask).long(),
                      pixel_values=inputs['pixel_values'], image_sizes=inputs['image_sizes'],
                      **extra).logits
  diff = tiny_hf.max_abs_diff_at(ours, theirs, mask)
  print(f'{kind} float32 max abs diff {diff:.2e}')
  assert diff <= 1e-4


def test_an_anyres_model_without_its_feature_layout_is_refused(anyres_folder):
  kind, folder, _ = anyres_folder
  config, params = io.load_pretrained(folder)
  input_ids, mask, images, index, _, _ = _inputs(config, [_photos()[:1]])
  apply = VLM(config).apply
  with pytest.raises(ValueError, match='needs image_feature_index'):
    jax.eval_shape(lambda: apply({'params': params}, input_ids, images, attention_mask=mask))
  if kind == 'onevision':
    with pytest.raises(ValueError, match='needs image_feature_weight'):
      jax.eval_shape(lambda: apply({'params': params}, input_ids, images, attention_mask=mask,
                                   image_feature_index=index))


def test_export_loads_in_transformers_with_every_tensor(anyres_folder, tmp_path):
  kind, folder, hf_model = anyres_folder
  config, params = io.load_pretrained(folder)
  io.save_pretrained(config, params, tmp_path)
  reloaded, info = KINDS[kind][0].from_pretrained(
      tmp_path, output_loading_info=True, dtype=torch.float32)
  for key in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs'):
    assert not info[key], (key, info[key])
  assert reloaded.config.image_grid_pinpoints == hf_model.config.image_grid_pinpoints
  original = hf_model.state_dict()
  for name, tensor in reloaded.state_dict().items():
    np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=name)
  again, params_again = io.load_pretrained(tmp_path)
  assert again == config
  jax.tree.map(np.testing.assert_array_equal, params_again, jax.tree.map(np.asarray, params))
