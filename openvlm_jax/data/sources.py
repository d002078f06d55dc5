"""Where a run's records come from: LLaVA JSONL files and converted ArrayRecord datasets.

Each entry of `config.data.train_files` / `eval_files` names a source:
  'train.jsonl'     a LLaVA JSONL file (image paths relative to its folder);
  'data/ar:train'   a split of a dataset written by `python -m openvlm_jax.data.convert`
                    (its `--out` folder, or the `llava_records/<version>` folder in it);
  'data/ar'         the same, when the dataset has a single split.
Several entries are read as one source, in order, unless `config.data.train_weights` makes
them a mixture (`pipeline.make_dataset`). Every source has `len`, `source[i]` (a record for
`examples.make_example`) and `where(i)`, so validation, sharding, shuffling and exact resume
work alike for all of them.
"""

import bisect
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from openvlm_jax.console import UserError
from openvlm_jax.data import jsonl


def _dataset_and_split(spec: str) -> tuple[str, str | None] | None:
  """('folder', split or None) when `spec` names a folder, optionally with ':split'.

  A file is never a dataset, even with a ':' in its name.
  """
  if os.path.isfile(spec):
    return None
  if os.path.isdir(spec):
    return spec, None
  folder, sep, split = spec.rpartition(':')
  if sep and folder and split and os.path.isdir(folder):
    return folder, split
  return None


def check_spec(spec: str, key: str) -> None:
  """Raises a one-line `UserError` naming `key` when `spec` names neither a file nor a folder."""
  if not isinstance(spec, str) or not spec:
    raise UserError(f'{key}: expected a JSONL file or a converted dataset, got {spec!r}')
  if not os.path.isfile(spec) and _dataset_and_split(spec) is None:
    raise UserError(f'{key}: no such file or converted dataset {spec}')


def open_source(spec: str) -> Any:
  """One source: an indexed JSONL file or one split of a converted dataset."""
  found = _dataset_and_split(spec)
  if found is None:
    check_spec(spec, 'data')
    return jsonl.index_jsonl([spec])
  from openvlm_jax.data import tfds_source  # pylint: disable=g-import-not-at-top (TFDS only here)
  folder, split = found
  dataset_dir = tfds_source.find_dataset_dir(folder)
  if split is None:
    splits = tfds_source.split_names(dataset_dir)
    if len(splits) != 1:
      raise UserError(f'{folder}: name a split as {folder}:<split> (splits: '
                      f'{", ".join(splits)})')
    split = splits[0]
  return tfds_source.TfdsSource(dataset_dir, split)


def open_sources(specs: Sequence[str]) -> Any:
  """The records of all `specs`, in order, as one source.

  Consecutive JSONL files are indexed together (their records read `path:line`); other
  sources are chained with `ConcatSource`.
  """
  if not specs:
    raise UserError('no data files given')
  parts, jsonl_run = [], []
  for spec in map(os.fspath, specs):
    if _dataset_and_split(spec) is None:
      check_spec(spec, 'data')
      jsonl_run.append(spec)
      continue
    if jsonl_run:
      parts.append(jsonl.index_jsonl(jsonl_run))
      jsonl_run = []
    parts.append(open_source(spec))
  if jsonl_run:
    parts.append(jsonl.index_jsonl(jsonl_run))
  return parts[0] if len(parts) == 1 else ConcatSource(parts)


class ConcatSource:
  """Several sources read one after another as one random-access source."""

  def __init__(self, parts: Sequence[Any]):
    """`parts` each need `__len__`, `__getitem__` and `where(index)`."""
    self._parts = list(parts)
    self._starts = np.cumsum([0] + [len(part) for part in self._parts])  # [num_parts + 1]

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def images_decoded(self) -> bool:
    """Whether every part's images were decoded at conversion (see `pipeline.load_records`)."""
    return all(getattr(part, 'images_decoded', False) for part in self._parts)

  def _locate(self, index: int) -> tuple[Any, int]:
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of {len(self)}')
    part = bisect.bisect_right(self._starts, index) - 1
    return self._parts[part], index - int(self._starts[part])

  def __getitem__(self, index: int) -> dict[str, Any]:
    part, local = self._locate(int(index))
    return part[local]

  def where(self, index: int) -> str:
    """Where record `index` comes from, as its own source says."""
    part, local = self._locate(int(index))
    return part.where(local)

  @property
  def name(self) -> str:
    """The parts' names, for messages."""
    return ', '.join(getattr(part, 'name', repr(part)) for part in self._parts)

  def __repr__(self) -> str:
    return f'ConcatSource({self._parts!r})'


def iter_records(specs: Sequence[str]) -> Iterator[dict[str, Any]]:
  """Every readable record of `specs`, in order (bad ones are left to validation)."""
  source = open_sources(specs)
  for index in range(len(source)):
    try:
      yield source[index]
    except ValueError:
      continue
