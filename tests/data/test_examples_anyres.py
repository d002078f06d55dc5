"""Examples for anyres models: each image takes its views' slots and its own token count, the
feature index points at its views, and the image budget tiles deterministically."""

import dataclasses
import io
import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from openvlm_jax.console import UserError
from openvlm_jax.data import anyres, conversation, pipeline
from openvlm_jax.data import examples as examples_lib
from tests import tiny_hf

CROP = tiny_hf.IMAGE_SIZE  # 16
PATCH = tiny_hf.PATCH_SIZE  # 4: 16 features a view
PINPOINTS = tuple(map(tuple, tiny_hf.PINPOINTS))  # 1x2, 2x1, 2x2, 3x1, 1x3 crops
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _spec(tokenizer, *, max_crops=0, max_views=10, seq_len=200,
          max_images=2) -> examples_lib.ExampleSpec:
  return examples_lib.ExampleSpec(
      tokenizer=tokenizer, image_size=CROP, image_mean=MEAN, image_std=STD,
      num_image_tokens=(CROP // PATCH) ** 2, seq_len=seq_len, max_images=max_images,
      anyres=anyres.AnyresSpec(pinpoints=PINPOINTS, patch_size=PATCH, max_crops=max_crops,
                               max_views=max_views))


def _png(width: int, height: int) -> bytes:
  photo = Image.fromarray(skimage.data.astronaut()).resize((width, height))
  buffer = io.BytesIO()
  photo.save(buffer, format='PNG')
  return buffer.getvalue()


def _record(*sizes: tuple[int, int]) -> dict:
  """A record with photos of these (width, height) and one question about them."""
  question = ' '.join(['<image>'] * len(sizes)) + '\nWhat number is shown?'
  return {'conversations': [{'from': 'human', 'value': question},
                            {'from': 'gpt', 'value': 'The answer is 7.'}],
          'image_bytes': [_png(*size) for size in sizes], 'where': 'charts.jsonl:3'}


def _layout(width: int, height: int, max_crops: int = 0, tile: bool = True,
            pinpoints=PINPOINTS) -> anyres.Layout:
  return anyres.feature_layout(height, width, pinpoints=pinpoints, crop_size=CROP,
                               patch_size=PATCH, max_crops=max_crops, tile=tile)


def test_each_image_takes_its_views_and_its_own_tokens(tokenizer):
  spec = _spec(tokenizer)
  sizes = [(40, 18), (17, 45)]  # wide: 1x3 crops, tall: 3x1
  example = examples_lib.make_example(_record(*sizes), spec)
  layouts = [_layout(*size) for size in sizes]
  image_id = conversation.image_token_id(tokenizer, 2)
  is_image = example['input_ids'] == image_id
  assert is_image.sum() == sum(map(len, layouts))
  # The first image's tokens, one text token at least, then the second image's.
  runs = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(int), [0]])))
  assert list(runs[1::2] - runs[::2]) == [len(layout) for layout in layouts]
  assert not (example['loss_mask'] * is_image).any()
  views = [anyres.preprocess_anyres(Image.open(io.BytesIO(_png(*size))), pinpoints=PINPOINTS,
                                    crop_size=CROP, image_mean=MEAN, image_std=STD)
           for size in sizes]
  assert [len(v) for v in views] == [4, 4]
  np.testing.assert_array_equal(example['images'][:8], np.concatenate(views))
  assert not example['images'][8:].any() and example['images'].shape == (10, CROP, CROP, 3)
  expected = anyres.row_feature_index(layouts, [4, 4], tokens_per_view=spec.num_image_tokens,
                                      max_views=10, length=spec.seq_len)
  np.testing.assert_array_equal(example['image_feature_index'], expected.index)
  assert int(example['num_images']) == 2
  empty = examples_lib.empty_example(spec)
  assert {k: v.shape for k, v in empty.items()} == {k: v.shape for k, v in example.items()}


def test_onevision_leaves_the_images_of_a_multi_image_record_untiled(tokenizer):
  spec = _spec(tokenizer, max_crops=2)
  one = examples_lib.make_example(_record((48, 48)), spec)  # 2x2 crops, shrunk past 2
  layout = _layout(48, 48, max_crops=2)
  assert ((layout.weight > 0) & (layout.weight < 1)).any()
  np.testing.assert_array_equal(one['image_feature_weight'][:len(layout)], layout.weight)
  assert not one['image_feature_weight'][len(layout):].any()
  two = examples_lib.make_example(_record((48, 48), (20, 40)), spec)
  image_id = conversation.image_token_id(tokenizer, 2)
  assert (two['input_ids'] == image_id).sum() == 2 * len(_layout(1, 1, max_crops=2, tile=False))
  assert two['images'][:2].any() and not two['images'][2:].any()  # one view each
  assert two['image_feature_index'].shape == (spec.seq_len, anyres.BILINEAR_TAPS)


def test_the_budget_tiles_on_smaller_grids_and_says_so():
  spec = anyres.AnyresSpec(pinpoints=PINPOINTS, patch_size=PATCH, max_crops=0, max_views=5)
  wide, tall = (18, 40), (45, 17)  # (height, width): 1x3 and 3x1 crops at best
  full = anyres.plan_images([tall], spec, crop_size=CROP, max_image_tokens=100)
  assert full.view_counts == (4,) and full.num_tokens == (66,) and not full.reduced
  # Too many tokens: the grids of at most 2 crops.
  fewer = anyres.plan_images([tall], spec, crop_size=CROP, max_image_tokens=65)
  assert fewer.view_counts == (3,) and fewer.num_tokens == (56,)
  assert fewer.reduced == 'a 17x45 image tiled 2x1 instead of 3x1 crops to fit the budget'
  again = anyres.plan_images([tall], spec, crop_size=CROP, max_image_tokens=65)
  assert again.pinpoints == fewer.pinpoints  # deterministic
  np.testing.assert_array_equal(again.layouts[0].index, fewer.layouts[0].index)
  # Too many views: 4 + 4 do not fit 7 slots, 3 + 3 do.
  seven = dataclasses.replace(spec, max_views=7)
  two = anyres.plan_images([wide, tall], seven, crop_size=CROP, max_image_tokens=200)
  assert two.view_counts == (3, 3)
  assert two.reduced.count('instead of') == 2
  with pytest.raises(ValueError, match=r'^1 image\(s\) need 3 views and 56 image tokens even on '
                     r'the smallest grids; the example has 5 view slots \(data.max_views\) and '
                     r'room for 55 image tokens'):
    anyres.plan_images([tall], spec, crop_size=CROP, max_image_tokens=55)


def test_validation_counts_the_reduced_records_in_one_line(tokenizer, tmp_path, capsys):
  path = tmp_path / 'wide.jsonl'
  (tmp_path / 'images').mkdir()
  lines = []
  for index, size in enumerate([(40, 18), (8, 8), (40, 18)]):  # the small one: 1x2 anyway
    Image.open(io.BytesIO(_png(*size))).save(tmp_path / 'images' / f'{index}.png')
    lines.append(json.dumps({'id': str(index), 'image': f'images/{index}.png',
                             'conversations': _record(size)['conversations']}))
  path.write_text('\n'.join(lines) + '\n')
  spec = _spec(tokenizer, max_views=3, max_images=1)
  source = pipeline.load_records([str(path)], spec, on_bad_record='raise')
  assert len(source) == 3
  out = capsys.readouterr().out
  assert out.count('\n') == 1
  assert 'the image budget tiled 2 record(s) with fewer crops, e.g. ' in out
  assert f'{path}:1: a 40x18 image tiled 1x2 instead of 1x3 crops' in out, out
  example = examples_lib.make_example(source[0], spec)  # the validated, reduced tokens
  assert example['images'][:3].any()
  with pytest.raises(UserError, match='tiled images of an anyres model are not packed'):
    pipeline.make_dataset([str(path)], tokenizer=tokenizer, image_size=CROP, image_mean=MEAN,
                          image_std=STD, num_image_tokens=16, seq_len=200, max_images=1,
                          batch_size=2, packing=True, anyres=spec.anyres)


def test_an_image_that_changed_after_tokenization_is_named(tokenizer):
  spec = _spec(tokenizer)
  record = _record((40, 18))
  tokens = examples_lib.encode_tokens(record, spec)
  changed = dict(record, image_bytes=[_png(17, 45)], tokens=tokens)
  with pytest.raises(ValueError, match=r'^charts.jsonl:3: the images take \d+ tokens, but the '
                     r'record was tokenized with \d+: did an image change\?'):
    examples_lib.make_example(changed, spec)


def test_prompts_lay_out_their_images_as_the_training_example(tokenizer):
  spec = _spec(tokenizer)
  record = _record((40, 18))
  prompt, reference = examples_lib.encode_prompt(record, spec)
  assert reference == 'The answer is 7.'
  inputs = examples_lib.image_inputs(record, spec, prompt)
  example = examples_lib.make_example(record, spec)
  for key in ('images', 'image_feature_index'):
    np.testing.assert_array_equal(inputs[key], example[key])
