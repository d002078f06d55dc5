"""LLaVA records as a TFDS ArrayRecord dataset, written and read without TensorFlow.

Features per record: `record` (the JSONL line's JSON object as text, every field kept),
`origin` (the `path:line` it was converted from), `id` and `images` (the encoded image
files' bytes, PNG or JPEG as they were, in the order of the record's `image` field).
`tfds.features.Image` would need TensorFlow, so images are kept encoded and decoded by
`images.load_image`. Records keep their JSONL order (no shuffling at write time).

  python -m openvlm_jax.data.convert --train=train.jsonl --eval=eval.jsonl --out=data/ar
  source = TfdsSource(find_dataset_dir('data/ar'), 'train')  # what 'data/ar:train' opens
"""

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from openvlm_jax.console import UserError
from openvlm_jax.data import jsonl

DATASET_NAME = 'llava_records'

# key, example: what a split's generator yields.
KeyedExample = tuple[int, dict[str, Any]]


class LlavaRecords(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder that writes prepared LLaVA records (see `data.convert`) as ArrayRecord."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {'2.0.0': 'The whole JSON record, its origin, and image bytes.'}
  # No checksums or metadata files live next to this module; without this, TFDS looks for
  # them through `importlib_resources`, which it does not declare as a dependency.
  code_path = None

  def __init__(self, *, split_examples: Mapping[str, Callable[[], Iterator[KeyedExample]]]
               | None = None, **kwargs):
    """`split_examples` maps a split name to a function yielding its (key, example) pairs."""
    self._split_examples = dict(split_examples or {})
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='LLaVA records (JSON text) with their images stored as encoded bytes.',
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'origin': tfds.features.Text(),
            'record': tfds.features.Text(),
            'images': tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        }),
        disable_shuffling=True,  # records stay in JSONL order: eval order, error indices
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in self._split_examples}

  def _generate_examples(self, split: str) -> Iterator[KeyedExample]:
    yield from self._split_examples[split]()


def write_tfds_dataset(split_examples: Mapping[str, Callable[[], Iterator[KeyedExample]]],
                       data_dir: str) -> str:
  """Writes the examples as a TFDS ArrayRecord dataset under `data_dir`.

  Args:
    split_examples: e.g. `{"train": make_train}`, each a function yielding (key, example)
      with the builder's features (`data.convert.convert_jsonl` builds them).
    data_dir: TFDS data folder; one such dataset per folder.

  Returns:
    The dataset folder (`data_dir/llava_records/2.0.0`), for `TfdsSource`.
  """
  builder = LlavaRecords(split_examples=split_examples, data_dir=data_dir,
                         file_format='array_record')
  tfds.disable_progress_bar()  # the caller shows its own
  with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing"
    builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def is_dataset(folder: str) -> bool:
  """True if `folder` is a TFDS dataset folder or a data folder holding one of ours."""
  return _dataset_dir_or_none(folder) is not None


def _dataset_dir_or_none(folder: str) -> str | None:
  if os.path.isfile(os.path.join(folder, 'dataset_info.json')):
    return folder
  versions = os.path.join(folder, DATASET_NAME)
  if os.path.isdir(versions):
    found = [name for name in os.listdir(versions)
             if os.path.isfile(os.path.join(versions, name, 'dataset_info.json'))
             and all(part.isdigit() for part in name.split('.'))]
    if found:
      newest = max(found, key=lambda name: tuple(int(part) for part in name.split('.')))
      return os.path.join(versions, newest)
  return None


def find_dataset_dir(folder: str) -> str:
  """The dataset folder: `folder` itself or, for a data folder, its newest `llava_records`."""
  found = _dataset_dir_or_none(folder)
  if found is None:
    raise UserError(f'{folder}: not a converted dataset (no dataset_info.json, nor '
                    f'{DATASET_NAME}/<version>/ in it)')
  return found


def split_names(dataset_dir: str) -> list[str]:
  """The splits of the dataset in `dataset_dir`, sorted."""
  return sorted(tfds.builder_from_directory(dataset_dir).info.splits)


class TfdsSource:
  """Random access over one split of a TFDS dataset of LLaVA records.

  `source[i]` is a record for `examples.make_example`: the checked fields of
  `jsonl.record_fields` (`where`, `id`, `conversations`, `question_type`, `answer_kind`)
  and `image_bytes`. The TFDS reader is reopened lazily, so the source pickles into Grain
  workers.
  """

  # The conversion decoded every image fully, so validation checks headers only.
  images_decoded = True

  def __init__(self, dataset_dir: str, split: str):
    """`dataset_dir` is the folder holding `dataset_info.json` (see `find_dataset_dir`)."""
    self._dataset_dir = os.fspath(dataset_dir)
    self._split = split
    self._reader = None
    builder = tfds.builder_from_directory(self._dataset_dir)
    features = set(builder.info.features.keys()) if builder.info.features else set()
    if builder.info.name != DATASET_NAME or not {'id', 'origin', 'record', 'images'} <= features:
      raise UserError(f'{self._dataset_dir}: not written by this version of '
                      '`python -m openvlm_jax.data.convert` (features: '
                      f'{", ".join(sorted(features))}); convert the JSONL again')
    splits = split_names(self._dataset_dir)
    if split not in splits:
      raise UserError(f'{self._dataset_dir}: no split {split!r} (splits: {", ".join(splits)})')
    self._length = len(self._open())

  def _open(self):
    if self._reader is None:
      builder = tfds.builder_from_directory(self._dataset_dir)
      self._reader = builder.as_data_source(split=self._split)
    return self._reader

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state['_reader'] = None
    return state

  def __len__(self) -> int:
    return self._length

  @property
  def name(self) -> str:
    """`dataset_dir:split`, for messages."""
    return f'{self._dataset_dir}:{self._split}'

  def where(self, index: int) -> str:
    """`dataset_dir:split[index] (from path:line)`, naming the JSONL line it came from."""
    try:
      origin = self.raw(index)['origin']
    except Exception:  # noqa: BLE001  (an unreadable record still gets its index)
      return f'{self.name}[{index}]'
    return f'{self.name}[{index}] (from {origin})'

  def raw(self, index: int) -> dict[str, Any]:
    """Record `index` as stored: `id`, `origin`, `record` (JSON text) and `images` (bytes)."""
    example = self._open()[int(index)]
    text = lambda value: value.decode() if isinstance(value, bytes) else str(value)
    return {'id': text(example['id']), 'origin': text(example['origin']),
            'record': text(example['record']),
            'images': [bytes(data) for data in example['images']]}

  def __getitem__(self, index: int) -> dict[str, Any]:
    stored = self.raw(index)
    where = f"{self.name}[{index}] (from {stored['origin']})"
    fields, names = jsonl.record_fields(jsonl.load_object(stored['record'], where), where,
                                        default_id=stored['id'])
    if len(names) != len(stored['images']):
      raise ValueError(f"{where}: {len(names)} image names but {len(stored['images'])} images")
    return dict(fields, image_bytes=stored['images'])

  def __repr__(self) -> str:
    return f'TfdsSource({self._dataset_dir!r}, split={self._split!r}, num_records={len(self)})'
