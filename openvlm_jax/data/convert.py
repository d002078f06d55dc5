r"""Converts LLaVA JSONL files and their images into a TFDS ArrayRecord dataset, once.

  python -m openvlm_jax.data.convert --train=a.jsonl,b.jsonl --eval=eval.jsonl --out=data/ar

Each record keeps its whole JSON object and its images' bytes (see `tfds_source`). A record
that cannot be read (malformed JSON or fields, an image that is missing, escapes its
folder or does not decode) is skipped and counted, or stops the conversion with
`--on_bad_record=raise`; its `path:line: reason` is reported. Tokenization is not checked
here (it depends on the run's tokenizer): the run checks it when it loads the records.

A run reads the result with `--config.data.train_files=data/ar:train` (see `sources`).
"""

import functools
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence

import tqdm
from absl import app, flags, logging

from openvlm_jax.console import UserError
from openvlm_jax.data import images as images_lib
from openvlm_jax.data import jsonl, pipeline, tfds_source


def keyed_examples(split: str, files: Sequence[str], num_lines: int, on_bad_record: str,
                   bad_records: pipeline.BadRecords,
                   progress: tqdm.tqdm) -> Iterator[tfds_source.KeyedExample]:
  """Yields (key, example) for the good records of `files` (`num_lines` records in all);
  counts the bad ones.

  Keys grow with the record's position, so the dataset keeps the JSONL order, and are spread
  over TFDS's 128-bit key range: its writer sorts large splits in 1000 buckets by key, and
  keys 0, 1, 2, ... would put a whole split in one bucket, sorted in memory.
  """
  key_step = 2**128 // max(num_lines, 1)
  kept = 0
  for path in files:
    for _, line_no, line in jsonl.iter_lines(path):
      bad_records.total += 1
      progress.update(1)
      try:
        example = _example(line, path, line_no)
      except ValueError as error:
        if on_bad_record == 'raise':
          raise UserError(str(error)) from error
        bad_records.add(str(error))
        continue
      yield kept * key_step, example
      kept += 1
  if not kept:
    first = f'; the first bad one: {bad_records.first_offenders[0]}' if bad_records.count else ''
    raise UserError(f'{split}: no usable records in {", ".join(files)}{first}')


def _example(line: bytes, path: str, line_no: int) -> dict:
  """One JSONL line as the dataset's features; `ValueError('path:line: reason')` if bad."""
  record = jsonl.parse_record(line, path, line_no)
  # Stored as parsed (every field, the text normalised: no byte-order mark, valid UTF-8).
  text = json.dumps(jsonl.load_object(line, record['where']), ensure_ascii=False)
  encoded = []
  for image_path in record['image_paths']:
    try:
      images_lib.verify_image(image_path, full_decode=True)
      with open(image_path, 'rb') as f:
        encoded.append(f.read())
    except OSError as error:
      raise ValueError(f"{record['where']}: cannot read image {image_path}") from error
    except ValueError as error:
      raise ValueError(f"{record['where']}: {error}") from error
  return {'id': record['id'], 'origin': record['where'], 'record': text, 'images': encoded}


def convert_jsonl(split_files: Mapping[str, Sequence[str]], data_dir: str, *,
                  on_bad_record: str = 'skip',
                  show_progress: bool = True) -> tuple[str, dict[str, pipeline.BadRecords]]:
  """Converts JSONL files per split into one ArrayRecord dataset under `data_dir`.

  Args:
    split_files: e.g. `{"train": ["a.jsonl", "b.jsonl"], "eval": ["eval.jsonl"]}`.
    data_dir: the output folder; it must not hold a converted dataset already.
    on_bad_record: 'skip' (count and report) or 'raise'.
    show_progress: a progress bar over the records.

  Returns:
    The dataset folder, and per split the `BadRecords` (counts and first offenders).
  """
  pipeline.check_policy(on_bad_record)
  for split, files in split_files.items():
    for path in files:
      if not os.path.isfile(path):
        raise UserError(f'{split}: no such file {path}')
  if tfds_source.is_dataset(data_dir):
    raise UserError(f'{data_dir} already holds a converted dataset; remove it or choose '
                    'another --out')
  num_lines = {split: sum(1 for path in files for _ in jsonl.iter_lines(path))
               for split, files in split_files.items()}
  bad = {split: pipeline.BadRecords() for split in split_files}
  with tqdm.tqdm(total=sum(num_lines.values()), unit='record', disable=not show_progress,
                 dynamic_ncols=True) as progress:
    folder = tfds_source.write_tfds_dataset(
        {split: functools.partial(keyed_examples, split, files, num_lines[split],
                                  on_bad_record, bad[split], progress)
         for split, files in split_files.items()}, data_dir)
  return folder, bad


FLAGS = flags.FLAGS
_TRAIN = flags.DEFINE_list('train', [], 'JSONL files of the train split.')
_EVAL = flags.DEFINE_list('eval', [], 'JSONL files of the eval split.')
_TEST = flags.DEFINE_list('test', [], 'JSONL files of the test split.')
_OUT = flags.DEFINE_string('out', None, 'The output folder (a TFDS data folder).')
_ON_BAD_RECORD = flags.DEFINE_enum('on_bad_record', 'skip', ['skip', 'raise'],
                                   'Skip and count bad records, or stop at the first.')


def main(argv: Sequence[str]) -> None:
  """Converts the named splits and prints where they went and what was skipped."""
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS's INFO lines stay out of the console
  split_files = {name: flag.value for name, flag in
                 (('train', _TRAIN), ('eval', _EVAL), ('test', _TEST)) if flag.value}
  try:
    if not split_files or not _OUT.value:
      raise UserError('name --out and at least one of --train, --eval, --test')
    folder, bad = convert_jsonl(split_files, _OUT.value, on_bad_record=_ON_BAD_RECORD.value)
  except UserError as error:
    sys.exit(f'error: {error}')
  for split, report in bad.items():
    print(f'{split}: {report.total - report.count} records written'
          + (f'; {report.summary()}' if report.count else ''))
    print(f'  read it with --config.data.{"train" if split == "train" else "eval"}_files='
          f'{_OUT.value}:{split}')
  print(f'dataset: {folder}')


if __name__ == '__main__':
  app.run(main)
