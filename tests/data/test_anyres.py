"""LLaVA-NeXT anyres views and token layout against transformers' LlavaNext processors."""

import functools
import types

import numpy as np
import pytest
import skimage.data
import sklearn.datasets
from PIL import Image
from transformers import LlavaNextProcessor, LlavaOnevisionProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from openvlm_jax.data import anyres
from openvlm_jax.data import tokenizer as tokenizer_lib

# llava-hf/llava-v1.6-*'s processor: 336 px views on CLIP ViT-L/14.
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CROP, PATCH = 336, 14
# Photos that ship inside packages, cut to several aspect ratios (left, top, right, bottom).
PHOTOS = {
    'astronaut': skimage.data.astronaut,  # 512 x 512
    'coffee': skimage.data.coffee,  # 600 x 400
    'china': lambda: sklearn.datasets.load_sample_image('china.jpg'),  # 640 x 427
}
# llava-hf/llava-onevision-qwen2-*'s: 384 px views on SigLIP-so400m/14, grids up to 6 x 6.
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
ONEVISION_CROP = 384
BOXES = [None, (0, 0, 200, 500), (0, 0, 400, 150), (10, 20, 333, 111), (5, 5, 90, 380)]


def _image_processor() -> LlavaNextImageProcessorPil:
  return LlavaNextImageProcessorPil(
      size={'shortest_edge': CROP}, crop_size={'height': CROP, 'width': CROP},
      image_grid_pinpoints=PINPOINTS)


def _photo(name: str, box) -> Image.Image:
  image = Image.fromarray(PHOTOS[name]())
  return image.crop(box) if box else image


@pytest.mark.parametrize('name', sorted(PHOTOS))
def test_views_equal_the_transformers_processor_pixel_for_pixel(name):
  processor = _image_processor()
  for box in BOXES:
    image = _photo(name, box)
    inputs = processor(image, return_tensors='np')
    theirs = inputs['pixel_values'][0].transpose(0, 2, 3, 1)  # [views, H, W, 3]
    ours = anyres.preprocess_anyres(image, pinpoints=PINPOINTS, crop_size=CROP,
                                    image_mean=processor.image_mean, image_std=processor.image_std)
    width, height = image.size
    assert ours.shape == theirs.shape, (name, box)
    assert len(ours) == anyres.num_views(height, width, pinpoints=PINPOINTS, crop_size=CROP)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=f'{name} {box}')
    assert tuple(inputs['image_sizes'][0]) == (height, width)


@pytest.mark.parametrize('name', sorted(PHOTOS))
def test_onevision_views_equal_its_processor_tiled_alone_and_untiled_in_a_pair(name):
  processor = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=ONEVISION_PINPOINTS)
  mean, std = processor.image_mean, processor.image_std
  images = [_photo(name, box) for box in BOXES[:3]]
  alone = processor([[images[0]]], return_tensors='np')['pixel_values'][0]
  ours = anyres.preprocess_anyres(images[0], pinpoints=ONEVISION_PINPOINTS,
                                  crop_size=ONEVISION_CROP, image_mean=mean, image_std=std)
  np.testing.assert_allclose(ours, alone.transpose(0, 2, 3, 1), atol=1e-5)
  pair = processor([images[1:]], return_tensors='np')['pixel_values']  # [2, 1, 3, H, W]
  for image, theirs in zip(images[1:], pair):
    ours = anyres.preprocess_anyres(image, pinpoints=ONEVISION_PINPOINTS,
                                    crop_size=ONEVISION_CROP, image_mean=mean, image_std=std,
                                    tile=False)
    np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), atol=1e-5)


def test_the_layout_has_as_many_tokens_as_the_processor_writes(tokenizer):
  image_token = tokenizer_lib.image_token_of(tokenizer)
  # As llava-hf/llava-v1.6-*'s processor_config.json: the CLIP class token, dropped.
  processor = LlavaNextProcessor(image_processor=_image_processor(), tokenizer=tokenizer,
                                 patch_size=PATCH, vision_feature_select_strategy='default',
                                 num_additional_image_tokens=1, image_token=image_token)
  image_token_id = tokenizer.convert_tokens_to_ids(image_token)
  sizes = [(512, 512), (500, 200), (150, 400), (91, 323), (375, 85), (1000, 30), (17, 900)]
  for height, width in sizes:
    image = Image.new('RGB', (width, height), (90, 120, 30))
    inputs = processor(text=f'{image_token} What is shown?', images=image, return_tensors='np')
    written = int((inputs['input_ids'] == image_token_id).sum())
    layout = anyres.feature_layout(height, width, pinpoints=PINPOINTS, crop_size=CROP,
                                   patch_size=PATCH)
    assert len(layout) == written, (height, width)
    assert layout.weight is None


def test_the_onevision_layout_has_as_many_tokens_as_its_processor_writes():
  # LlavaOnevisionProcessor cannot be built without torchvision (its video processor), so
  # its token count runs on a stand-in holding the attributes the two methods read.
  processor = types.SimpleNamespace(
      image_processor=LlavaOnevisionImageProcessorPil(image_grid_pinpoints=ONEVISION_PINPOINTS),
      num_image_tokens=(ONEVISION_CROP // PATCH) ** 2, vision_aspect_ratio='anyres_max_9')
  processor._get_unpadded_features = functools.partial(
      LlavaOnevisionProcessor._get_unpadded_features, processor)
  shrunk = 0
  sizes = [(512, 512), (2000, 1500), (3000, 3000), (150, 400), (91, 323), (4000, 300)]
  for height, width in sizes:
    layout = anyres.feature_layout(height, width, pinpoints=ONEVISION_PINPOINTS,
                                   crop_size=ONEVISION_CROP, patch_size=PATCH, max_crops=9)
    written = LlavaOnevisionProcessor._get_number_of_features(
        processor, height, width, ONEVISION_CROP, ONEVISION_CROP)
    assert len(layout) == written, (height, width)
    np.testing.assert_allclose(layout.weight.sum(axis=1), 1.0, rtol=1e-6)
    shrunk += int(((layout.weight > 0) & (layout.weight < 1)).any())
  assert shrunk >= 2  # the large ones are shrunk to ~9 crops' worth


def test_the_layout_reads_the_unpadded_grid_row_by_row():
  # A wide 16 x 40 image on 8-px crops of 4-px patches (2 x 2 features per crop) fits
  # (16, 48): 2 x 6 crops, a 4 x 12 feature grid, of which the image fills 4 x 10 once the
  # 4 px of padding on each side (one feature column each) are removed.
  layout = anyres.feature_layout(16, 40, pinpoints=[[16, 48], [48, 16]], crop_size=8,
                                 patch_size=4).index
  base, grid = layout[:4], layout[4:].reshape(4, 11)
  np.testing.assert_array_equal(base, np.arange(4))
  assert (grid[:, -1] == anyres.NEWLINE).all()
  # Feature column 1 is crop 0's right column; crop c (view 1 + c) holds columns 2c, 2c + 1.
  first_row = [(1 + col // 2) * 4 + col % 2 for col in range(1, 11)]
  np.testing.assert_array_equal(grid[0, :-1], first_row)
  second_crop_row = [(1 + 6 + col // 2) * 4 + 2 + col % 2 for col in range(1, 11)]
  np.testing.assert_array_equal(grid[3, :-1], second_crop_row)


def test_row_index_offsets_each_image_by_its_views_and_points_newlines_at_the_last_row():
  first = anyres.Layout(np.array([0, 1, 4, anyres.NEWLINE]))
  second = anyres.Layout(np.array([2, anyres.NEWLINE]))
  row = anyres.row_feature_index([first, second], [2, 3], tokens_per_view=4, max_views=6,
                                 length=8)
  np.testing.assert_array_equal(row.index, [0, 1, 4, 24, 2 + 8, 24, 0, 0])
  assert row.weight is None
  with pytest.raises(ValueError, match='more than 4'):
    anyres.row_feature_index([first, second], [2, 3], tokens_per_view=4, max_views=4, length=8)
  with pytest.raises(ValueError, match='6 image tokens, more than 5'):
    anyres.row_feature_index([first, second], [2, 3], tokens_per_view=4, max_views=6, length=5)
