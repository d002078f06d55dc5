"""LLaVA-format JSONL: line index, record parsing, safe image paths, a random-access source.

A record is one JSON object per line:
  {"id": ..., "image": "a.png" | ["a.png", "b.png"] (optional),
   "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}
or, for questions to answer, {"id", "image", "question", "answer" (optional, the reference)},
read as a one-turn conversation, or, for preference training (DPO), turns up to the question
(or a "prompt") with a "chosen" and a "rejected" answer.
Image paths are relative to the JSONL file's folder and may not leave it.

The source keeps only (file, byte offset, line number) per record and parses the line when
it is read, so it is small to pickle into Grain worker processes. Every error names the file
and line: `ValueError("train.jsonl:12: 'conversations' is missing")`.
"""

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def resolve_image_path(root: str, image_path: str) -> str:
  """Joins `image_path` to the JSONL folder `root`, refusing paths that leave `root`.

  Raises:
    ValueError: for a non-string or empty path, or one outside `root` (via `..`, an
      absolute path elsewhere, or a symlink pointing out).
  """
  if not isinstance(image_path, str) or not image_path:
    raise ValueError(f'image path must be a non-empty string, got {image_path!r}')
  real_root = os.path.realpath(root)
  resolved = os.path.realpath(os.path.join(real_root, image_path))
  if os.path.commonpath([real_root, resolved]) != real_root:
    raise ValueError(f'image path {image_path!r} escapes the dataset folder {root}')
  return resolved


def parse_record(line: str | bytes, path: str, line_no: int) -> dict[str, Any]:
  """Parses one JSONL line into a record with absolute, checked image paths.

  Args:
    line: the raw line.
    path: the JSONL file (its folder is the root for image paths).
    line_no: 1-based line number, for error messages.

  Returns:
    `{"where": "path:line", "id": ..., "conversations": [...], "image_paths": [str],
    "question_type": str | None, "answer_kind": 'number' | 'label' | None}`: optional
    fields eval reads (scores per question type; a 'label' answer, such as the year naming
    a bar, is scored by exact match only).
    Conversation content is checked later, by `conversation.to_messages`.

  Raises:
    ValueError: `f"{path}:{line_no}: reason"` for malformed JSON, a non-object line, a
      missing or non-list `conversations`, a malformed `image` field or an escaping path.
  """
  where = f'{path}:{line_no}'
  fields, images = record_fields(load_object(line, where), where,
                                 default_id=f'{os.path.basename(path)}:{line_no}')
  root = os.path.dirname(os.path.abspath(path))
  try:
    image_paths = [resolve_image_path(root, image) for image in images]
  except ValueError as error:
    raise ValueError(f'{where}: {error}') from error
  return dict(fields, image_paths=image_paths)


def load_object(line: str | bytes, where: str) -> dict[str, Any]:
  """One JSONL line as a JSON object; `ValueError('where: reason')` otherwise."""
  try:
    record = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f'{where}: malformed JSON: {error}') from error
  if not isinstance(record, dict):
    kind = type(record).__name__
    raise ValueError(f'{where}: a record must be a JSON object, got {kind}')  # noqa: TRY004
  return record


def record_fields(record: dict[str, Any], where: str,
                  default_id: str) -> tuple[dict[str, Any], list[str]]:
  """The checked fields of a record object, and its image names as written (not resolved).

  Returns:
    (`{"where", "id", "conversations", "question_type", "answer_kind"}`, image names); the
    id is `default_id` when the record has none. A preference record (`chosen` and
    `rejected`, see `preference_turns`) has the chosen answer in `conversations` and adds
    `rejected_conversations`.
  """
  if 'conversations' not in record and 'question' in record:
    record = dict(record, conversations=question_turns(record, where))
  rejected = None
  if 'chosen' in record or 'rejected' in record:
    record, rejected = preference_turns(record, where)
  if 'conversations' not in record:
    raise ValueError(f"{where}: 'conversations' is missing")
  if not isinstance(record['conversations'], list):
    raise ValueError(f"{where}: 'conversations' must be a list")  # noqa: TRY004 (bad data)
  images = record.get('image')
  if images is None:
    images = []
  elif isinstance(images, str):
    images = [images]
  elif not isinstance(images, list):
    raise ValueError(f"{where}: 'image' must be a path or a list of paths")
  question_type = record.get('question_type')
  if question_type is not None and not isinstance(question_type, str):
    raise ValueError(f"{where}: 'question_type' must be a string")
  answer_kind = record.get('answer_kind')
  if answer_kind not in (None, 'number', 'label'):
    raise ValueError(f"{where}: 'answer_kind' must be 'number' or 'label', got {answer_kind!r}")
  fields = {
      'where': where,
      'id': str(record['id']) if record.get('id') is not None else default_id,
      'conversations': record['conversations'],
      'question_type': question_type,
      'answer_kind': answer_kind,
  }
  if rejected is not None:
    fields['rejected_conversations'] = rejected
  return fields, images


def preference_turns(record: dict[str, Any],
                     where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """A preference record's chosen conversation (as `conversations`) and its rejected one.

  Two layouts: LLaVA turns up to the question plus `chosen` and `rejected` answers, or the
  public image-preference layout `{"image", "prompt", "chosen", "rejected"}`. Either way the
  two conversations share every turn but the last answer.
  """
  for key in ('chosen', 'rejected'):
    if not isinstance(record.get(key), str):
      raise ValueError(f"{where}: a preference record needs '{key}' as a string")
  if 'conversations' in record:
    turns = record['conversations']
  elif isinstance(record.get('prompt'), str):
    turns = [{'from': 'human', 'value': record['prompt']}]
  else:
    raise ValueError(f"{where}: a preference record needs 'prompt' or 'conversations'")
  if not isinstance(turns, list) or not turns:
    raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns")
  chosen = turns + [{'from': 'gpt', 'value': record['chosen']}]
  rejected = turns + [{'from': 'gpt', 'value': record['rejected']}]
  return dict(record, conversations=chosen), rejected


def question_turns(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
  """The LLaVA turns of a question record `{"question", "answer" (optional)}`."""
  question, answer = record['question'], record.get('answer')
  if not isinstance(question, str):
    raise ValueError(f"{where}: 'question' must be a string")  # noqa: TRY004 (bad data)
  turns = [{'from': 'human', 'value': question}]
  if answer is not None:
    turns.append({'from': 'gpt', 'value': str(answer)})
  return turns


def iter_lines(path: str) -> Iterator[tuple[int, int, bytes]]:
  """Yields (byte offset, 1-based line number, raw line) for each non-blank line of `path`."""
  with open(path, 'rb') as f:
    offset = 0
    for line_no, line in enumerate(f, start=1):
      if line.strip():
        yield offset, line_no, line
      offset += len(line)


class JsonlSource:
  """Random access over lines of JSONL files (a Grain `RandomAccessDataSource`).

  `source[i]` reads and parses line i (see `parse_record`), raising `ValueError` with
  `path:line` for a bad one. Build it with `index_jsonl`.
  """

  def __init__(
      self,
      files: Sequence[str],
      file_indices: Sequence[int],
      offsets: Sequence[int],
      line_numbers: Sequence[int],
  ):
    """Records are `files[file_indices[i]]` at byte `offsets[i]`, line `line_numbers[i]`."""
    self._files = [os.path.abspath(f) for f in files]
    self._file_indices = np.asarray(file_indices, dtype=np.int32)  # [num_records]
    self._offsets = np.asarray(offsets, dtype=np.int64)  # [num_records]
    self._line_numbers = np.asarray(line_numbers, dtype=np.int64)  # [num_records]

  def __len__(self) -> int:
    return len(self._offsets)

  def where(self, index: int) -> str:
    """`path:line` of record `index`."""
    return f'{self._files[self._file_indices[index]]}:{self._line_numbers[index]}'

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self._files[self._file_indices[index]]
    with open(path, 'rb') as f:
      f.seek(int(self._offsets[index]))
      line = f.readline()
    return parse_record(line, path, int(self._line_numbers[index]))

  @property
  def name(self) -> str:
    """The files, for messages: 'a.jsonl, b.jsonl'."""
    return ', '.join(self._files)

  def __repr__(self) -> str:
    return f'JsonlSource(files={self._files}, num_records={len(self)})'


def index_jsonl(files: Sequence[str]) -> JsonlSource:
  """Indexes every non-blank line of `files`, in order (one pass, nothing parsed)."""
  file_indices, offsets, line_numbers = [], [], []
  for file_index, path in enumerate(files):
    for offset, line_no, _ in iter_lines(path):
      file_indices.append(file_index)
      offsets.append(offset)
      line_numbers.append(line_no)
  return JsonlSource(files, file_indices, offsets, line_numbers)
