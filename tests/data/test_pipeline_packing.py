"""Packing in the Grain pipeline: rows of several examples, images with their tokens, resume."""

import numpy as np
import pytest

from openvlm_jax.data import pipeline
from tests.data.conftest import good_record, write_jsonl

SPEC = {'image_size': 8, 'image_mean': (0.5,) * 3, 'image_std': (0.25,) * 3,
        'num_image_tokens': 2, 'seq_len': 64, 'max_images': 2}


def mixed_records(count: int = 24) -> list[dict]:
  """One-image, two-image, text-only and two-turn records of several lengths, each text
  different (so a packed segment names its example)."""
  records = []
  for i in range(count):
    kind = i % 4
    if kind == 0:
      records.append({**good_record(i), 'conversations': [
          {'from': 'human', 'value': '<image>\nWhat number is shown?'},
          {'from': 'gpt', 'value': str(i)}]})
    elif kind == 1:
      records.append({'id': f'text{i}', 'conversations': [
          {'from': 'human', 'value': 'What shape is it?'},
          {'from': 'gpt', 'value': ' '.join(['A square.'] * (1 + i % 3)) + f' {i}'}]})
    elif kind == 2:
      records.append({'id': f'two{i}', 'image': [f'images/{i}.png', f'images/{i + 40}.png'],
                      'conversations': [
                          {'from': 'human', 'value': '<image>\n<image>\nWhat number is shown?'},
                          {'from': 'gpt', 'value': str(i)}]})
    else:
      records.append({'id': f'turns{i}', 'image': f'images/{i}.png', 'conversations': [
          {'from': 'human', 'value': '<image>\nWhat number is shown?'},
          {'from': 'gpt', 'value': str(i)},
          {'from': 'human', 'value': 'What shape is it?'},
          {'from': 'gpt', 'value': 'A square.'}]})
  return records


@pytest.fixture
def mixed_dataset(tmp_path):
  return write_jsonl(str(tmp_path / 'mixed.jsonl'), mixed_records())


def _iterator(files, tokenizer, **options):
  return pipeline.make_iterator(files, tokenizer=tokenizer, **{**SPEC, **options})


def _segments(batch):
  """(row, segment id, token slice) of every packed example in a batch."""
  for row, segments in enumerate(batch['attention_mask']):
    for segment in np.unique(segments[segments > 0]):
      where = np.flatnonzero(segments == segment)
      yield row, int(segment), slice(int(where[0]), int(where[-1]) + 1)


def test_packed_rows_hold_every_example_once_with_its_own_images(mixed_dataset, tokenizer):
  examples = list(_iterator([mixed_dataset], tokenizer, batch_size=1, shuffle=False,
                            num_epochs=1))
  packed = list(_iterator([mixed_dataset], tokenizer, batch_size=3, shuffle=False,
                          num_epochs=1, packing=True, pack_max_images=4,
                          drop_remainder=False))
  assert len(packed) * 3 < len(examples)  # several examples per row
  seen, rows_with_text_only = [], 0
  for batch in packed:
    rows = len(batch['input_ids'])  # 3, or fewer in the last batch
    assert batch['input_ids'].shape == (rows, 64) and batch['images'].shape[1] == 4
    images_used = np.zeros(rows, int)
    for row, _, tokens in _segments(batch):
      length = tokens.stop - tokens.start
      match = [i for i, example in enumerate(examples)
               if int(example['attention_mask'].sum()) == length
               and np.array_equal(example['input_ids'][0, :length],
                                  batch['input_ids'][row, tokens])]
      assert match, 'a packed segment is no example'
      example = examples[match[0]]
      seen.append(match[0])
      for key in ('targets', 'loss_mask'):
        np.testing.assert_array_equal(batch[key][row, tokens], example[key][0, :length], key)
      np.testing.assert_array_equal(batch['positions'][row, tokens], np.arange(length))
      prefix = int(example['prefix_len'][0])
      expected_end = np.where(np.arange(length) < prefix, prefix + tokens.start, 0)
      np.testing.assert_array_equal(batch['prefix_end'][row, tokens], expected_end)
      count = int(example['num_images'][0])
      np.testing.assert_array_equal(  # its images, right after the row's earlier ones
          batch['images'][row, images_used[row]:images_used[row] + count],
          example['images'][0, :count])
      images_used[row] += count
      rows_with_text_only += count == 0
    np.testing.assert_array_equal(batch['num_images'], images_used)
    assert not batch['loss_mask'][batch['attention_mask'] == 0].any()  # padding is not trained
  assert sorted(seen) == list(range(len(examples)))
  assert rows_with_text_only > 0  # text-only examples share rows with image ones


def test_packed_iterator_resumes_from_its_state(mixed_dataset, tokenizer):
  options = {'batch_size': 2, 'packing': True, 'seed': 3}
  iterator = _iterator([mixed_dataset], tokenizer, **options)
  for _ in range(5):  # into the second epoch
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  resumed = _iterator([mixed_dataset], tokenizer, **options)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
