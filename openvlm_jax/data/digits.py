"""The embedded dataset: scikit-learn's handwritten digits written as LLaVA JSONL + PNG.

`load_digits()` ships inside scikit-learn (1797 grayscale 8x8 images, labels 0-9), so this
builds offline. It is written to disk in the same format a user's data has, so training on it
exercises the real input path. Tasks:
  'read': one digit per image; "What number is shown?" -> "7".
  'sum':  digits in the cells of a 2x2 grid, 1-3 in training images and 2-3 in held-out
          ones; "What is the sum of these digits?" -> "15". Each training digit leads `train_repeats` records (other digits
          drawn at random from the training digits), so the training set can grow well past
          the 1527 images; each held-out digit leads one.
  'sum_pairs': the sum images as preference pairs (DPO): the question with the true sum
          as `chosen` and a near miss (1-3 off) as `rejected`.
  'read_small': small print: one digit in a random cell of a 4x4 grid, the image 4 times
          the tower's size, so a single view shrinks the digit below its 8x8 pixels and a
          4x4 anyres tiling sees it whole; "What number is shown?" -> "7".
The train/eval split is over the digit images, so no eval digit appears in training.
"""

import json
import os
import shutil
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

from openvlm_jax.console import UserError
from openvlm_jax.data import conversation, sources

TASKS = ('read', 'sum', 'sum_pairs', 'read_small')
SMALL_PRINT_GRID = 4  # 'read_small': cells along each side
_MARKER = '.complete'
_READ_QUESTIONS = (
    '<image>\nWhat number is shown?',
    '<image>\nWhich digit is this?',
    '<image>\nRead the digit in the image.',
    'What digit is written here?\n<image>',
)
_SUM_QUESTIONS = (
    '<image>\nWhat is the sum of these digits?',
    '<image>\nAdd the digits shown. What is their sum?',
    'What do the numbers in the image add up to?\n<image>',
)


def _to_png(pixels_8bit: np.ndarray, image_size: int, path: str) -> None:
  """Writes a grayscale uint8 [h, w] array, padded to a square and resized, as an RGB PNG."""
  height, width = pixels_8bit.shape
  side = max(height, width)
  square = np.zeros((side, side), dtype=np.uint8)
  top, left = (side - height) // 2, (side - width) // 2
  square[top:top + height, left:left + width] = pixels_8bit
  image = Image.fromarray(square)
  resample = Image.Resampling.NEAREST if image_size % side == 0 else Image.Resampling.BILINEAR
  image.resize((image_size, image_size), resample=resample).convert('RGB').save(path)


def _small_print(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One digit [8, 8] in a random cell of a SMALL_PRINT_GRID-square grid of 8x8 cells."""
  side = 8 * SMALL_PRINT_GRID
  canvas = np.zeros((side, side), np.float32)
  top, left = 8 * rng.integers(SMALL_PRINT_GRID, size=2)
  canvas[top:top + 8, left:left + 8] = digit
  return canvas


def _sum_grid(digit_images: np.ndarray, chosen: np.ndarray, rng: np.random.Generator):
  """The digits `chosen`, in reading order, in random distinct cells of a 2x2 grid: [16, 16]."""
  cells = np.sort(rng.choice(4, size=len(chosen), replace=False))
  grid = np.zeros((16, 16), np.float32)
  for cell, index in zip(cells, chosen):
    top, left = 8 * (cell // 2), 8 * (cell % 2)
    grid[top:top + 8, left:left + 8] = digit_images[index]
  return grid


def _records_for_split(
    split: str,
    digit_indices: np.ndarray,
    digit_images: np.ndarray,
    labels: np.ndarray,
    *,
    task: str,
    image_size: int,
    repeats: int,
    out_dir: str,
    rng: np.random.Generator,
) -> list[dict]:
  """Writes the PNGs of one split and returns its LLaVA records (`repeats` per digit)."""
  records = []
  leading = np.repeat(digit_indices, repeats)
  for number, index in enumerate(leading):
    side = image_size
    if task in ('read', 'read_small'):
      question = _READ_QUESTIONS[rng.integers(len(_READ_QUESTIONS))]
      answer = str(labels[index])
      strip = digit_images[index]  # [8, 8]
      if task == 'read_small':
        strip, side = _small_print(strip, rng), image_size * SMALL_PRINT_GRID
    else:
      # Training images hold 1-3 digits (one digit: its sum is itself, which teaches reading
      # a cell), held-out images 2-3.
      num_others = rng.integers(0 if split == 'train' else 1, 3)
      others = rng.choice(digit_indices[digit_indices != index], size=num_others, replace=False)
      chosen = rng.permutation(np.concatenate([[index], others]))
      question = _SUM_QUESTIONS[rng.integers(len(_SUM_QUESTIONS))]
      answer = str(int(labels[chosen].sum()))
      strip = _sum_grid(digit_images, chosen, rng)  # [16, 16]
    pixels_8bit = np.round(strip * (255.0 / 16.0)).astype(np.uint8)
    image_name = f'images/{task}_{split}_{number:05d}.png'
    _to_png(pixels_8bit, side, os.path.join(out_dir, image_name))
    record = {'id': f'{task}-{split}-{number}', 'image': image_name,
              'conversations': [{'from': 'human', 'value': question}]}
    if task == 'sum_pairs':
      records.append(dict(record, chosen=answer, rejected=near_miss(int(answer), rng)))
    else:
      record['conversations'].append({'from': 'gpt', 'value': answer})
      records.append(record)
  return records


def near_miss(answer: int, rng: np.random.Generator) -> str:
  """A wrong answer 1-3 away from `answer`, never negative."""
  offset = int(rng.integers(1, 4))
  return str(answer - offset if answer >= offset and rng.random() < 0.5 else answer + offset)


def build_digits_dataset(
    out_dir: str,
    *,
    seed: int = 0,
    eval_fraction: float = 0.15,
    image_size: int = 32,
    task: str = 'read',
    train_repeats: int = 1,
) -> dict[str, str]:
  """Builds the digits dataset in `out_dir` once; later calls with the same options reuse it.

  Writes `train.jsonl`, `eval.jsonl` and `images/*.png`, then a marker file holding the
  options; a build interrupted before the marker is redone. Deterministic given the seed.

  Args:
    out_dir: destination folder (one dataset per folder).
    seed: fixes the split, the question phrasings and the digit combinations.
    eval_fraction: share of the 1797 digit images held out for evaluation.
    image_size: side of the square RGB PNGs ('read_small': of a grid cell).
    task: 'read' (one digit, answer the digit), 'sum' (1-3 digits in training, 2-3 held
      out; answer their sum), 'sum_pairs' (those sums as chosen/rejected pairs) or
      'read_small' (one digit in a cell of a 4x4 grid).
    train_repeats: records each training digit leads (the eval split has one per digit).

  Returns:
    `{"train": path, "eval": path}` of the JSONL files.
  """
  if task not in TASKS:
    raise UserError(f'task must be one of {TASKS}, got {task!r}')
  if train_repeats < 1:
    raise UserError(f'train_repeats must be >= 1, got {train_repeats}')
  if not 0.0 < eval_fraction < 1.0:
    raise UserError(f'eval_fraction must be in (0, 1), got {eval_fraction}')
  from sklearn import datasets  # pylint: disable=g-import-not-at-top (slow import)

  paths = {split: os.path.join(out_dir, f'{split}.jsonl') for split in ('train', 'eval')}
  options = {'seed': seed, 'eval_fraction': eval_fraction, 'image_size': image_size,
             'task': task, 'train_repeats': train_repeats}
  marker = os.path.join(out_dir, _MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == options and all(os.path.exists(p) for p in paths.values()):
        return paths
    os.remove(marker)

  digits = datasets.load_digits()
  digit_images = digits.images  # [1797, 8, 8], values 0..16
  labels = digits.target  # [1797]
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(labels))
  num_eval = round(len(labels) * eval_fraction)
  split_indices = {'train': np.sort(order[num_eval:]), 'eval': np.sort(order[:num_eval])}

  shutil.rmtree(os.path.join(out_dir, 'images'), ignore_errors=True)
  os.makedirs(os.path.join(out_dir, 'images'))
  for split, indices in split_indices.items():
    records = _records_for_split(
        split, indices, digit_images, labels, task=task, image_size=image_size,
        repeats=train_repeats if split == 'train' else 1, out_dir=out_dir, rng=rng)
    with open(paths[split], 'w') as f:
      f.writelines(json.dumps(record) + '\n' for record in records)
  with open(marker, 'w') as f:
    json.dump(options, f)
  return paths


def built_files(out_dir: str) -> dict[str, str] | None:
  """`{"train", "eval"}` paths of a finished build in `out_dir`, or None (nothing is built)."""
  paths = {split: os.path.join(out_dir, f'{split}.jsonl') for split in ('train', 'eval')}
  if os.path.exists(os.path.join(out_dir, _MARKER)) and all(map(os.path.exists, paths.values())):
    return paths
  return None


def tokenizer_corpus(data: Iterable[str]) -> Iterator[str]:
  """Yields the texts of LLaVA records as the chat template shows them, for BPE training.

  `data` names sources as `config.data.train_files` does (JSONL files, converted datasets).
  Each turn becomes "user:\n..." or "assistant:\n..." with `<image>` placeholders removed
  (the image token is a special token, added to the vocabulary separately).
  """
  for record in sources.iter_records(list(data)):
    for turn in record['conversations']:
      if not isinstance(turn, dict):
        continue
      role = conversation.ROLES.get(turn.get('from'), 'user')
      text = str(turn.get('value', '')).replace(conversation.IMAGE_PLACEHOLDER, '')
      yield f'{role}:\n{text.strip()}'
