"""Shared fixtures for the data tests: a tiny tokenizer and tiny LLaVA datasets on disk."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from openvlm_jax.data import tokenizer as tokenizer_lib

CORPUS = [
    'user: What number is shown?',
    'user: Which digit is this?',
    'assistant: The answer is 7.',
    'user: What is the sum of these digits?',
    'assistant: 0 1 2 3 4 5 6 7 8 9',
    'user: Describe the picture in one word.',
    'assistant: A square.',
] * 20


@pytest.fixture(scope='session')
def tokenizer(tmp_path_factory):
  """A byte-level BPE with digit splitting, trained on a few sentences."""
  out_dir = tmp_path_factory.mktemp('tokenizer')
  return tokenizer_lib.train_tokenizer(CORPUS, str(out_dir), vocab_size=320)


def write_png(path: str, value: int, size: int = 8) -> None:
  """Writes a size x size RGB PNG filled with `value`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def image_value(image_name: str) -> int:
  """The fill value of a test image: distinct for `images/0.png` ... `images/22.png`."""
  return (int(re.sub(r'\D', '', image_name) or 0) * 11 + 3) % 256


def good_record(index: int) -> dict:
  """A valid one-image record whose answer is `index % 10`."""
  return {
      'id': f'r{index}',
      'image': f'images/{index}.png',
      'conversations': [
          {'from': 'human', 'value': '<image>\nWhat number is shown?'},
          {'from': 'gpt', 'value': str(index % 10)},
      ],
  }


def write_jsonl(path: str, lines: list) -> str:
  """Writes records (dicts, dumped as JSON) or raw strings, one per line; makes their images."""
  folder = os.path.dirname(path)
  with open(path, 'w') as f:
    for line in lines:
      if isinstance(line, dict):
        for image in ([line['image']] if isinstance(line.get('image'), str)
                      else line.get('image') or []):
          target = os.path.join(folder, image)
          if '..' not in image and not os.path.isabs(image) and not os.path.exists(target):
            write_png(target, value=image_value(image))
        line = json.dumps(line)
      f.write(line + '\n')
  return path


@pytest.fixture
def good_dataset(tmp_path):
  """20 valid records in one JSONL file (images 8x8)."""
  return write_jsonl(str(tmp_path / 'train.jsonl'), [good_record(i) for i in range(20)])


@pytest.fixture
def make_record():
  """`good_record`, as a fixture for test modules."""
  return good_record


@pytest.fixture
def make_jsonl():
  """`write_jsonl`, as a fixture for test modules."""
  return write_jsonl


@pytest.fixture
def small_spec():
  """Example sizes for 8x8 test images: 2 image tokens, 24 tokens, one image."""
  return {'image_size': 8, 'image_mean': (0.5,) * 3, 'image_std': (0.25,) * 3,
          'num_image_tokens': 2, 'seq_len': 24, 'max_images': 1}


@pytest.fixture
def record_ids():
  """batch -> each row's record index, recovered from its image fill value (`image_value`)."""
  def ids(batch):
    value = np.round((batch['images'][:, 0, 0, 0, 0] * 0.25 + 0.5) * 255).astype(int)
    return [int(v) for v in (value - 3) // 11]
  return ids
