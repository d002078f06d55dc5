"""The Grain input pipeline: validated JSONL records -> shuffled, sharded numpy batches.

Bad records are found up front: `load_records` reads this process's share of the lines once,
in the main process, and checks each (JSON, fields, image paths and files, conversation,
token length). Depending on `on_bad_record` it stops with `path:line: reason` or drops the
record, counts it in a `BadRecords` report and logs the total and the first offenders. The
map that builds examples therefore does not expect failures; if one happens anyway (a file
changed under us), it raises or, with 'skip', logs `path:line: reason` and drops the record.

Checkpointing the iterator (what the trainer does with Orbax):
  import grain, orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)))
  manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(train_iter)))  # restores train_iter in place
Without Orbax, `train_iter.get_state()` / `train_iter.set_state(state)` do the same.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from openvlm_jax import console
from openvlm_jax.console import UserError
from openvlm_jax.data import examples as examples_lib
from openvlm_jax.data import sources
from openvlm_jax.data.anyres import AnyresSpec

_MAX_LOGGED_OFFENDERS = 10
# Records after which a shard whose records all failed alike stops (`_stop_if_all_bad_alike`).
EARLY_STOP_RECORDS = 32


@dataclasses.dataclass
class BadRecords:
  """Records dropped with on_bad_record='skip': how many, and the first few `path:line: why`."""

  count: int = 0
  total: int = 0  # records examined
  first_offenders: list[str] = dataclasses.field(default_factory=list)

  def add(self, message: str) -> None:
    """Counts one dropped record; keeps its message if it is among the first few."""
    self.count += 1
    if len(self.first_offenders) < _MAX_LOGGED_OFFENDERS:
      self.first_offenders.append(message)

  def summary(self) -> str:
    """A human-readable report, e.g. for the trainer's log."""
    lines = [f'skipped {self.count} of {self.total} records']
    lines += [f'  {message}' for message in self.first_offenders]
    if self.count > len(self.first_offenders):
      lines.append(f'  ... and {self.count - len(self.first_offenders)} more')
    return '\n'.join(lines)


def check_policy(on_bad_record: str) -> None:
  """Refuses an `on_bad_record` other than 'skip' or 'raise'."""
  if on_bad_record not in ('skip', 'raise'):
    raise UserError(f"on_bad_record must be 'skip' or 'raise', got {on_bad_record!r}")


class SubsetSource:
  """The records of `source` at `indices`, in that order (a Grain random-access source).

  With `tokens` (one `examples.encode_tokens` result per record, from validation) each
  record comes with its `tokens`, so it is tokenized once per run, not once per epoch. They
  are held as two flat arrays (int32 ids, bool loss mask: 5 bytes a token) and offsets.
  """

  def __init__(self, source: Any, indices: Sequence[int],
               tokens: Sequence[dict[str, np.ndarray]] | None = None):
    """`source` needs `__len__`, `__getitem__` and `where(index)`."""
    self._source = source
    self._indices = np.asarray(indices, dtype=np.int64)  # [num_records]
    self._token_ids = self._loss_mask = self._offsets = None
    if tokens:
      lengths = [len(t['input_ids']) for t in tokens]
      self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
      self._token_ids = np.concatenate([t['input_ids'] for t in tokens], dtype=np.int32)
      self._loss_mask = np.concatenate([t['loss_mask'] for t in tokens], dtype=bool)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[int(self._indices[index])]
    if self._offsets is not None:
      start, end = self._offsets[index], self._offsets[index + 1]
      record = dict(record, tokens={'input_ids': self._token_ids[start:end],
                                    'loss_mask': self._loss_mask[start:end].astype(np.int32)})
    return record

  def where(self, index: int) -> str:
    """Where record `index` comes from, e.g. `path:line`."""
    return self._source.where(int(self._indices[index]))

  def __repr__(self) -> str:
    return f'SubsetSource({self._source!r}, num_records={len(self)})'


def _compact(tokens: Any) -> dict[str, np.ndarray] | None:
  """A check's tokens as kept for a run (int32 ids, bool mask); None if it returned none."""
  if not isinstance(tokens, dict) or not {'input_ids', 'loss_mask'} <= tokens.keys():
    return None
  return {'input_ids': np.asarray(tokens['input_ids'], np.int32),
          'loss_mask': np.asarray(tokens['loss_mask']).astype(bool)}


def _as_source(data: Sequence[str] | str | Any) -> Any:
  """Source names (`sources.open_sources`: JSONL files, converted datasets) -> one source;
  a source object is returned as is."""
  if isinstance(data, (str, os.PathLike)):
    data = [data]
  if isinstance(data, (list, tuple)):
    return sources.open_sources(data)
  return data


def _stop_if_all_bad_alike(bad_records: BadRecords, reasons: set[str],
                           spec: examples_lib.ExampleSpec) -> None:
  """Stops when the first `EARLY_STOP_RECORDS` records all fail for one and the same reason.

  That is a problem of the run (most often a chat template that renders no reply), and
  dropping the rest of the data one record at a time would only hide it.
  """
  if (bad_records.total != EARLY_STOP_RECORDS or bad_records.count != bad_records.total
      or len(reasons) != 1):
    return
  hint = ''
  if 'loss mask is empty' in next(iter(reasons)):
    name = getattr(spec.tokenizer, 'name_or_path', '') or 'the tokenizer'
    hint = (f'; the chat template of {name} writes no assistant text for these conversations '
            '(check config.tokenizer and its chat_template)')
  raise UserError(f'the first {EARLY_STOP_RECORDS} records are all bad for the same reason, '
                  f'e.g. {bad_records.first_offenders[0]}{hint}')


def load_records(
    data: Sequence[str] | Any,
    spec: examples_lib.ExampleSpec,
    *,
    on_bad_record: str = 'skip',
    shard_index: int = 0,
    shard_count: int = 1,
    bad_records: BadRecords | None = None,
    decode_images: bool = True,
    check: Callable[..., None] = examples_lib.check_record,
) -> SubsetSource:
  """Validates this shard's records; returns a source of the good ones.

  Record i (non-blank lines across the files, in order) belongs to shard `i % shard_count`,
  so shards are disjoint and together cover the data. Only this shard's records are read
  and checked (see `examples.check_record`).

  Args:
    data: source names (see `sources`: JSONL files, converted datasets), or a source.
    spec: tokenizer, sizes and image preprocessing.
    on_bad_record: 'raise' stops at the first bad record with `path:line: reason`; 'skip'
      drops it and counts it in `bad_records` (logged via absl.logging).
    shard_index, shard_count: this process's share, e.g. `jax.process_index()`,
      `jax.process_count()`.
    bad_records: filled with the skipped records, if given.
    decode_images: decode every image fully while validating (the default: catches e.g.
      truncated JPEGs, which Pillow's cheap `verify()` lets through); False for very large
      sets, where a late decode failure is then dropped and logged once. A converted
      dataset's images were decoded at conversion and get the cheap check.
    check: validates one record (`examples.check_record` for training,
      `examples.check_question` for records to answer). The tokens it returns
      (`check_record`'s `{"input_ids", "loss_mask"}`) travel with the records.

  Returns:
    A `SubsetSource` over the records that passed.
  """
  check_policy(on_bad_record)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} is not in [0, shard_count={shard_count})')
  source = _as_source(data)
  # Images a converted dataset holds were decoded fully at conversion (`data.convert`).
  decode_images = decode_images and not getattr(source, 'images_decoded', False)
  bad_records = BadRecords() if bad_records is None else bad_records
  kept, kept_tokens, reduced = [], [], []
  reasons = set()  # why the records so far were bad (without their locations)
  for index in range(shard_index, len(source), shard_count):
    bad_records.total += 1
    try:
      record = source[index]  # raises with its location
      try:
        tokens = check(record, spec, decode_images)
      except UserError:
        raise  # a problem of the run (tokenizer, template), not of this record
      except ValueError as error:
        reasons.add(str(error))
        raise ValueError(f'{source.where(index)}: {error}') from error
    except UserError:
      raise
    except ValueError as error:
      if on_bad_record == 'raise':
        raise UserError(str(error)) from error
      bad_records.add(str(error))
      _stop_if_all_bad_alike(bad_records, reasons, spec)
      continue
    kept.append(index)
    kept_tokens.append(_compact(tokens))
    if isinstance(tokens, dict) and tokens.get('reduced'):
      reduced.append(f"{source.where(index)}: {tokens['reduced']}")
  label = getattr(source, 'name', None) or repr(source)
  label += f' (shard {shard_index} of {shard_count})' if shard_count > 1 else ''
  if reduced:
    console.say(f'{label}: the image budget tiled {len(reduced)} record(s) with fewer crops, '
                f'e.g. {reduced[0]}')
  if bad_records.count:
    console.warn(f'{label}: {bad_records.summary()}')
  else:
    logging.info('%s: %d records, none skipped.', label, bad_records.total)
  if not kept:
    raise UserError(f'no usable records in {source!r} for shard {shard_index}/{shard_count}'
                    + (f'; the first bad one: {bad_records.first_offenders[0]}'
                       if bad_records.first_offenders else ''))
  has_tokens = all(tokens is not None for tokens in kept_tokens)
  return SubsetSource(source, kept, kept_tokens if has_tokens else None)


def _example_or_skip(
    record: dict[str, Any], spec: examples_lib.ExampleSpec, on_bad_record: str,
    logged: set[str], pairs: bool = False
) -> dict[str, Any] | None:
  """`make_example` (`make_pair_example` with `pairs`), or None (dropped downstream) on
  failure under 'skip'.

  A drop is logged the first time (`logged` holds the records already reported), not once
  per epoch.
  """
  make = examples_lib.make_pair_example if pairs else examples_lib.make_example
  try:
    return make(record, spec)
  except ValueError as error:
    if on_bad_record == 'raise':
      raise UserError(str(error)) from error
    if record.get('where') not in logged:
      logged.add(record.get('where'))
      logging.warning('Skipping a bad record found while reading: %s', error)
    return None


def make_dataset(
    files: Sequence[str] | Any,
    *,
    tokenizer: Any,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    num_image_tokens: int,
    seq_len: int,
    max_images: int,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    num_threads: int = 2,
    on_bad_record: str = 'skip',
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    bad_records: BadRecords | Sequence[BadRecords] | None = None,
    decode_images: bool = True,
    packing: bool = False,
    pack_max_images: int = 0,
    weights: Sequence[float] = (),
    pairs: bool = False,
    anyres: AnyresSpec | None = None,
) -> grain.IterDataset:
  """Builds the Grain dataset of batches for this process (see `make_iterator`)."""
  spec = examples_lib.ExampleSpec(
      tokenizer=tokenizer, image_size=image_size, image_mean=tuple(image_mean),
      image_std=tuple(image_std), num_image_tokens=num_image_tokens, seq_len=seq_len,
      max_images=max_images, anyres=anyres)
  if pairs and packing:
    raise UserError('config.data.packing: preference pairs (DPO) are not packed')
  if anyres is not None and packing:
    raise UserError('config.data.packing: the tiled images of an anyres model are not packed')
  load = functools.partial(load_records, spec=spec, on_bad_record=on_bad_record,
                           shard_index=shard_index, shard_count=shard_count,
                           decode_images=decode_images, check=check_for(pairs))
  if weights:
    parts = mixture_parts(files, weights)
    if isinstance(bad_records, BadRecords):
      raise ValueError('a mixture counts bad records per source: pass one BadRecords each')
    reports = list(bad_records) if bad_records is not None else [BadRecords() for _ in parts]
    if len(reports) != len(parts):
      raise ValueError(f'{len(parts)} mixture sources but {len(reports)} bad-record reports')
    dataset = grain.MapDataset.mix(
        [_records(load(part, bad_records=report), shuffle, seed + index, num_epochs)
         for index, (part, report) in enumerate(zip(parts, reports))], weights=list(weights))
  else:
    dataset = _records(load(files, bad_records=bad_records), shuffle, seed, num_epochs)
  dataset = dataset.map(
      functools.partial(_example_or_skip, spec=spec, on_bad_record=on_bad_record,
                        logged=set(), pairs=pairs))
  # Records mapped to None (skipped) are dropped here.
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))
  if worker_count > 0:
    # Examples are batched after the workers so the batches do not depend on worker_count.
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  if packing:
    dataset = pack_examples(dataset, spec, rows=batch_size, max_images=pack_max_images)
  return dataset.batch(batch_size, drop_remainder=drop_remainder)


def check_for(pairs: bool) -> Callable[..., Any]:
  """How training records are validated: as conversations, or as preference pairs."""
  return examples_lib.check_pair if pairs else examples_lib.check_record


def mixture_parts(files: Sequence[str] | Any, weights: Sequence[float]) -> list[Any]:
  """The sources of a mixture, one per weight; refuses a bad pairing in one line."""
  parts = [files] if not isinstance(files, (list, tuple)) else list(files)
  if len(parts) != len(weights):
    raise UserError(f'config.data.train_weights: {len(weights)} weights for {len(parts)} '
                    'train_files; give one weight per source')
  if any(not weight > 0 for weight in weights):
    raise UserError(f'config.data.train_weights: every weight must be > 0, got {tuple(weights)}')
  return parts


def _records(source: SubsetSource, shuffle: bool, seed: int,
             num_epochs: int | None) -> grain.MapDataset:
  """The records of one source, shuffled anew each epoch and repeated `num_epochs` times."""
  dataset = grain.MapDataset.source(source)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)  # a new order each epoch, derived from the seed
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)  # None: forever
  return dataset


# The per-token fields of an example that packing concatenates (the rest are rebuilt).
_PACKED_TOKEN_FIELDS = ('input_ids', 'targets', 'loss_mask', 'prefix_end')


def _unpadded(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An example cut to its real tokens and images, with its prefix as per-token ends
  (`prefix_len` at the prefix's tokens, 0 after it; in the example's own positions)."""
  num_tokens = int(example['attention_mask'].sum())
  prefix_len = int(example['prefix_len'])
  prefix_end = np.where(np.arange(num_tokens) < prefix_len, prefix_len, 0).astype(np.int32)
  return {'input_ids': example['input_ids'][:num_tokens],
          'targets': example['targets'][:num_tokens],
          'loss_mask': example['loss_mask'][:num_tokens], 'prefix_end': prefix_end,
          'images': example['images'][:int(example['num_images'])]}


def _packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A row of packed examples in the batch layout the step reads.

  `attention_mask` holds segment ids (1, 2, ... per example, 0 at padding), `positions`
  restart at 0 in each segment, and `prefix_end` is moved from each example's own
  positions to the row's (0 outside prefixes). `prefix_len` is 0: a packed row's prefixes
  are only in `prefix_end`.
  """
  segments = row['input_ids_segment_ids'].astype(np.int32)
  positions = row['input_ids_positions'].astype(np.int32)
  segment_start = np.arange(len(segments), dtype=np.int32) - positions
  prefix_end = np.where(row['prefix_end'] > 0, row['prefix_end'] + segment_start, 0)
  return {'input_ids': row['input_ids'], 'targets': row['targets'],
          'loss_mask': row['loss_mask'], 'attention_mask': segments, 'positions': positions,
          'prefix_end': prefix_end.astype(np.int32),
          'prefix_len': np.asarray(0, np.int32), 'images': row['images'],
          'num_images': np.asarray((row['images_segment_ids'] != 0).sum(), np.int32)}


def pack_examples(dataset: grain.IterDataset, spec: examples_lib.ExampleSpec, *, rows: int,
                  max_images: int = 0) -> grain.IterDataset:
  """Several examples per row (Grain's first-fit packing), up to `spec.seq_len` tokens and
  `max_images` images per row (0: as many as the tokens can hold).

  Grain packs the images alongside the tokens (their own length budget), so a row's images
  follow each other in the order of its image tokens. Examples without images pack like any
  other. The packing iterator's state is part of the iterator's checkpoint.
  """
  max_images = max_images or max(spec.seq_len // spec.num_image_tokens, 1)
  lengths = {name: spec.seq_len for name in _PACKED_TOKEN_FIELDS}
  padding = {'input_ids': spec.pad_id, 'targets': spec.pad_id, 'loss_mask': 0.0,
             'prefix_end': 0, 'images': 0.0}
  packed = grain.experimental.FirstFitPackIterDataset(
      dataset.map(_unpadded), length_struct={**lengths, 'images': max_images},
      num_packing_bins=rows, shuffle_bins=False, padding_struct=padding)
  return packed.map(_packed_row)


def make_iterator(files: Sequence[str] | Any, **kwargs) -> grain.DatasetIterator:
  """Returns a checkpointable iterator over training batches of this process's shard.

  Args:
    files: source names (`sources`: LLaVA JSONL files, whose image paths are relative to
      each file's folder, or converted datasets as 'folder:split'), or a record source.
    **kwargs: as `make_dataset`: tokenizer, image_size, image_mean, image_std,
      num_image_tokens, seq_len, max_images, batch_size (per process), shuffle, seed,
      num_epochs (None = repeat forever), worker_count (0 = decode and preprocess in this
      process; N = in N Grain worker processes, each `worker_buffer_size` examples ahead),
      num_threads, on_bad_record ('skip' | 'raise'), shard_index, shard_count,
      drop_remainder, bad_records (a `BadRecords` to fill; one per source of a mixture),
      decode_images (see `load_records`), packing and pack_max_images (several examples per
      row, see `pack_examples`), weights (one per entry of `files`: a mixture, see below),
      pairs (preference records as chosen/rejected rows, `examples.make_pair_example`),
      anyres (an `anyres.AnyresSpec`: tile the images for a LLaVA-NeXT/OneVision model).

  With `weights`, each entry of `files` is its own source (validated, counted, sharded and
  shuffled on its own, with seed + its index) and Grain's `MapDataset.mix` interleaves them
  in those proportions; without, all entries are read as one source.

  Returns:
    A `grain.DatasetIterator` yielding dicts of numpy arrays:
      input_ids int32, targets int32, loss_mask float32, attention_mask int32,
      positions int32 [batch, seq_len]; images float32 [batch, max_images, H, W, 3];
      num_images int32 [batch]; prefix_len int32 [batch], the index of each row's first
      answer token (the prefix of `model.prefix_attention`). Packed rows hold segment ids
      in attention_mask, per-segment positions, per-token prefix_end [batch, seq_len], and
      up to pack_max_images images. With `pairs` every field has a [2] axis after the
      batch axis: [batch, 2, seq_len], images [batch, 2, max_images, H, W, 3].
    It has `get_state()` / `set_state()` and works with `grain.checkpoint.CheckpointSave`.
    Call `close()` when done if worker_count > 0.
  """
  return iter(make_dataset(files, **kwargs))


def make_eval_batches(
    files: Sequence[str] | Any,
    *,
    tokenizer: Any,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    num_image_tokens: int,
    seq_len: int,
    max_images: int,
    batch_size: int,
    on_bad_record: str = 'skip',
    shard_index: int = 0,
    shard_count: int = 1,
    bad_records: BadRecords | None = None,
    decode_images: bool = True,
    pairs: bool = False,
    anyres: AnyresSpec | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields every (good) record of this shard once, in file order, in batches.

  The last batch is padded with empty examples (`prefix_len` 0); `example_mask` float32
  [batch] is 1 for real rows and 0 for padding. Other fields, `prefix_len` included, are as
  in `make_iterator`. Row order is file order of
  the records that passed validation (see `load_records`).
  """
  spec = examples_lib.ExampleSpec(
      tokenizer=tokenizer, image_size=image_size, image_mean=tuple(image_mean),
      image_std=tuple(image_std), num_image_tokens=num_image_tokens, seq_len=seq_len,
      max_images=max_images, anyres=anyres)
  source = load_records(
      files, spec, on_bad_record=on_bad_record, shard_index=shard_index,
      shard_count=shard_count, bad_records=bad_records, decode_images=decode_images,
      check=check_for(pairs))
  yield from batches_of(source, range(len(source)), spec, batch_size,
                        on_bad_record=on_bad_record, pairs=pairs)


def batches_of(
    source: Any,
    indices: Sequence[int],
    spec: examples_lib.ExampleSpec,
    batch_size: int,
    *,
    num_batches: int | None = None,
    on_bad_record: str = 'skip',
    pairs: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Batches of the validated records `source[i]`, i in `indices`, in order, padded.

  `num_batches` (default: as many as the records need) adds all-padding batches at the end,
  so every process of a multi-host eval runs the same number of steps. With `pairs`, each
  record is a chosen/rejected pair (`examples.make_pair_example`).
  """
  rows, emitted, logged = [], 0, set()
  for index in indices:
    example = _example_or_skip(source[index], spec, on_bad_record, logged, pairs)
    if example is None:
      continue
    rows.append(example)
    if len(rows) == batch_size:
      yield _eval_batch(rows, spec, batch_size, pairs)
      rows, emitted = [], emitted + 1
  if rows:
    yield _eval_batch(rows, spec, batch_size, pairs)
    emitted += 1
  for _ in range((num_batches or emitted) - emitted):
    yield _eval_batch([], spec, batch_size, pairs)


def _eval_batch(
    rows: list[dict[str, np.ndarray]], spec: examples_lib.ExampleSpec, batch_size: int,
    pairs: bool = False
) -> dict[str, np.ndarray]:
  """Pads `rows` to `batch_size` with empty examples and adds `example_mask`."""
  num_real = len(rows)
  empty = examples_lib.empty_pair_example if pairs else examples_lib.empty_example
  rows = rows + [empty(spec)] * (batch_size - num_real)
  batch = examples_lib.stack_examples(rows)
  batch['example_mask'] = (np.arange(batch_size) < num_real).astype(np.float32)  # [batch]
  return batch
