"""Tests of the embedded digits dataset builder and the tokenizer corpus."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import datasets

from openvlm_jax.data import digits


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def read_dataset(tmp_path_factory):
  return digits.build_digits_dataset(str(tmp_path_factory.mktemp('digits')), seed=1)


def test_read_task_counts_answers_and_images(read_dataset):
  train, evaluation = _read(read_dataset['train']), _read(read_dataset['eval'])
  assert (len(train), len(evaluation)) == (1527, 270)
  labels = datasets.load_digits().target
  answers = [r['conversations'][1]['value'] for r in train + evaluation]
  assert sorted(answers) == sorted(str(label) for label in labels)
  assert len({r['id'] for r in train + evaluation}) == 1797
  record = train[0]
  assert record['conversations'][0]['value'].count('<image>') == 1
  with Image.open(os.path.join(os.path.dirname(read_dataset['train']), record['image'])) as image:
    assert (image.size, image.mode) == ((32, 32), 'RGB')
    pixels = np.asarray(image)
  assert pixels.max() > 200 and pixels.min() == 0


def test_build_is_idempotent(read_dataset):
  marker = os.path.join(os.path.dirname(read_dataset['train']), '.complete')
  stamps = [os.path.getmtime(p) for p in (marker, read_dataset['train'])]
  again = digits.build_digits_dataset(os.path.dirname(read_dataset['train']), seed=1)
  assert again == read_dataset
  assert [os.path.getmtime(p) for p in (marker, read_dataset['train'])] == stamps


def test_sum_task(tmp_path):
  paths = digits.build_digits_dataset(str(tmp_path), task='sum', eval_fraction=0.5, seed=2)
  evaluation = _read(paths['eval'])
  assert len(evaluation) == 898
  answers = [int(r['conversations'][1]['value']) for r in evaluation]
  assert 0 <= min(answers) and max(answers) <= 27 and len(set(answers)) > 15
  with Image.open(tmp_path / evaluation[0]['image']) as image:
    assert image.size == (32, 32)
  with pytest.raises(ValueError, match='task'):
    digits.build_digits_dataset(str(tmp_path), task='multiply')


def test_tokenizer_corpus(read_dataset):
  texts = list(digits.tokenizer_corpus([read_dataset['eval']]))
  assert len(texts) == 2 * 270
  assert all(t.startswith(('user:\n', 'assistant:\n')) and '<image>' not in t for t in texts)


def test_sum_images_hold_their_digits_in_grid_cells(tmp_path):
  paths = digits.build_digits_dataset(str(tmp_path), task='sum', seed=4, train_repeats=2,
                                      image_size=16)
  train, evaluation = _read(paths['train']), _read(paths['eval'])
  assert (len(train), len(evaluation)) == (2 * 1527, 270)
  bunch = datasets.load_digits()
  for record in evaluation[:50] + train[:50]:
    with Image.open(tmp_path / record['image']) as image:
      pixels = np.asarray(image)[..., 0].astype(np.float64) * 16 / 255  # [16, 16], 0..16
    cells = [pixels[r:r + 8, c:c + 8] for r in (0, 8) for c in (0, 8)]
    # Each non-empty cell is one of the 1797 digit images; the answer is their labels' sum.
    found = []
    for cell in cells:
      if cell.max() == 0:
        continue
      distance = np.abs(bunch.images - cell).max(axis=(1, 2))  # [1797]
      found.append(int(bunch.target[int(np.argmin(distance))]))
      assert distance.min() < 0.1
    expected_counts = (2, 3) if record in evaluation else (1, 2, 3)
    assert len(found) in expected_counts
    assert int(record['conversations'][1]['value']) == sum(found)
  with pytest.raises(ValueError, match='train_repeats'):
    digits.build_digits_dataset(str(tmp_path), task='sum', train_repeats=0)


def test_small_print_puts_one_digit_in_a_cell_of_a_grid_four_views_wide(tmp_path):
  paths = digits.build_digits_dataset(str(tmp_path), task='read_small', seed=5, image_size=16)
  bunch = datasets.load_digits()
  cells_used = set()
  for record in _read(paths['eval'])[:60]:
    with Image.open(tmp_path / record['image']) as image:
      assert image.size == (64, 64)  # 4 cells of the 16 px the tower reads
      pixels = np.asarray(image)[::2, ::2, 0].astype(np.float64) * 16 / 255  # [32, 32]
    inked = [(r, c) for r in range(4) for c in range(4)
             if pixels[8 * r:8 * r + 8, 8 * c:8 * c + 8].max() > 0]
    assert len(inked) == 1  # one cell holds the whole digit
    (r, c), = inked
    cells_used.add((r, c))
    distance = np.abs(bunch.images - pixels[8 * r:8 * r + 8, 8 * c:8 * c + 8]).max(axis=(1, 2))
    assert distance.min() < 0.1
    assert record['conversations'][1]['value'] == str(bunch.target[int(np.argmin(distance))])
  assert len(cells_used) > 8  # the cell is random
