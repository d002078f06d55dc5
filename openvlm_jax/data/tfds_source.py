"""LLaVA records as a TFDS ArrayRecord dataset, written and read without TensorFlow.

Features: `id` (text), `conversations` (the LLaVA turns as JSON text) and `images` (the
encoded image files' bytes, PNG or JPEG as they were). `tfds.features.Image` would need
TensorFlow, so images are kept encoded and decoded by `images.decode_image_bytes`.

  folder = write_tfds_dataset({'train': ['train.jsonl']}, data_dir)
  source = TfdsSource(folder, 'train')
  iterator = pipeline.make_iterator(source, tokenizer=..., ...)
"""

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from openvlm_jax.data import jsonl

DATASET_NAME = 'llava_records'


class LlavaRecords(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder that copies LLaVA JSONL files (and their images) into ArrayRecord."""

  VERSION = tfds.core.Version('1.0.0')
  # No checksums or metadata files live next to this module; without this, TFDS looks for
  # them through `importlib_resources`, which it does not declare as a dependency.
  code_path = None

  def __init__(self, *, split_files: Mapping[str, Sequence[str]] | None = None, **kwargs):
    """`split_files` maps a split name to its JSONL files; `kwargs` go to the TFDS builder."""
    self._split_files = dict(split_files or {})
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='LLaVA conversations with their images stored as encoded bytes.',
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'conversations': tfds.features.Text(),
            'images': tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(files) for split, files in self._split_files.items()}

  def _generate_examples(self, files: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (key, example) per JSONL record; a bad line stops with `path:line: reason`."""
    for path in files:
      for _, line_no, line in jsonl.iter_lines(path):
        record = jsonl.parse_record(line, path, line_no)
        image_bytes = []
        for image_path in record['image_paths']:
          try:
            with open(image_path, 'rb') as f:
              image_bytes.append(f.read())
          except OSError as error:
            raise ValueError(f"{record['where']}: cannot read image {image_path}") from error
        yield record['where'], {
            'id': str(record['id'] if record['id'] is not None else record['where']),
            'conversations': json.dumps(record['conversations']),
            'images': image_bytes,
        }


def write_tfds_dataset(split_files: Mapping[str, Sequence[str]], data_dir: str) -> str:
  """Converts LLaVA JSONL files into a TFDS ArrayRecord dataset under `data_dir`.

  Args:
    split_files: e.g. `{"train": ["train.jsonl"], "eval": ["eval.jsonl"]}`.
    data_dir: TFDS data folder; one such dataset per folder.

  Returns:
    The dataset folder (`data_dir/llava_records/1.0.0`), for `TfdsSource`.
  """
  builder = LlavaRecords(split_files=split_files, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


class TfdsSource:
  """Random access over one split of a TFDS dataset of LLaVA records.

  `source[i]` is a record for `examples.make_example`: `where`, `id`, `conversations` and
  `image_bytes`. The TFDS reader is reopened lazily, so the source pickles into Grain workers.
  """

  def __init__(self, dataset_dir: str, split: str):
    """`dataset_dir` is the folder holding `dataset_info.json` (see `write_tfds_dataset`)."""
    self._dataset_dir = os.fspath(dataset_dir)
    self._split = split
    self._reader = None
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

  def where(self, index: int) -> str:
    """`dataset_dir[split][index]`."""
    return f'{self._dataset_dir}[{self._split}][{index}]'

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._open()[int(index)]
    where = self.where(index)
    try:
      conversations = json.loads(example['conversations'])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise ValueError(f'{where}: malformed conversations JSON: {error}') from error
    if not isinstance(conversations, list):
      raise ValueError(f"{where}: 'conversations' must be a list")  # noqa: TRY004 (bad data)
    return {
        'where': where,
        'id': example['id'].decode() if isinstance(example['id'], bytes) else example['id'],
        'conversations': conversations,
        'image_bytes': [bytes(data) for data in example['images']],
    }

  def __repr__(self) -> str:
    return f'TfdsSource({self._dataset_dir!r}, split={self._split!r}, num_records={len(self)})'
