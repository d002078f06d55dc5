"""Tests of the Grain pipeline: batches, bad records, determinism, checkpoints, shards."""

import json
import logging
import re

import numpy as np
import pytest

from openvlm_jax.data import pipeline

SPEC = {
    'image_size': 8,
    'image_mean': (0.5,) * 3,
    'image_std': (0.25,) * 3,
    'num_image_tokens': 2,
    'seq_len': 24,
    'max_images': 1,
}


def _record_ids(batch):
  """Recovers each row's record index from its image fill value (see conftest.image_value)."""
  value = np.round((batch['images'][:, 0, 0, 0, 0] * 0.25 + 0.5) * 255).astype(int)
  return [int(v) for v in (value - 3) // 11]


def _iterator(files, tokenizer, **kwargs):
  options = dict(SPEC, batch_size=4, shuffle=True, seed=0)
  options.update(kwargs)
  return pipeline.make_iterator(files, tokenizer=tokenizer, **options)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_format(good_dataset, tokenizer):
  batch = next(_iterator([good_dataset], tokenizer))
  shapes = {key: (value.shape, value.dtype.name) for key, value in batch.items()}
  assert shapes == {
      'input_ids': ((4, 24), 'int32'),
      'targets': ((4, 24), 'int32'),
      'loss_mask': ((4, 24), 'float32'),
      'attention_mask': ((4, 24), 'int32'),
      'positions': ((4, 24), 'int32'),
      'prefix_len': ((4,), 'int32'),
      'images': ((4, 1, 8, 8, 3), 'float32'),
      'num_images': ((4,), 'int32'),
  }
  pad_id = tokenizer.pad_token_id
  np.testing.assert_array_equal(batch['targets'][:, :-1], batch['input_ids'][:, 1:])
  assert (batch['targets'][:, -1] == pad_id).all()
  np.testing.assert_array_equal(batch['num_images'], 1)
  for row, record_id in enumerate(_record_ids(batch)):
    num_tokens = int(batch['attention_mask'][row].sum())
    assert (batch['input_ids'][row, num_tokens:] == pad_id).all()
    np.testing.assert_array_equal(batch['positions'][row, :num_tokens], np.arange(num_tokens))
    answer = tokenizer.decode(batch['targets'][row][batch['loss_mask'][row] == 1])
    assert answer == f'{record_id % 10}</s>'
    # The prefix ends where the answer starts.
    prefix_len, num_answer = int(batch['prefix_len'][row]), int(batch['loss_mask'][row].sum())
    assert tokenizer.decode(batch['input_ids'][row, prefix_len:prefix_len + num_answer]) == answer
    assert (batch['input_ids'][row] == tokenizer.convert_tokens_to_ids('<image>')).sum() == 2


def _bad_dataset(tmp_path, make_record, make_jsonl):
  """One file with two good records (lines 1 and 11) and one bad record of each kind."""
  (tmp_path / 'images').mkdir()
  (tmp_path / 'images' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\ngarbage')
  def raw(record):
    return json.dumps(record)
  lines = [
      make_record(1),
      '{"id": 2, "conversations": [',
      {'id': 3, 'image': 'images/3.png'},
      dict(make_record(4), conversations=[]),
      raw(dict(make_record(5), image='images/nowhere.png')),
      raw(dict(make_record(6), image='images/corrupt.png')),
      dict(make_record(7), conversations=[
          {'from': 'human', 'value': '<image> ' + 'What number is shown? ' * 5},
          {'from': 'gpt', 'value': '7'}]),
      dict(make_record(8), conversations=[
          {'from': 'human', 'value': '<image><image>'}, {'from': 'gpt', 'value': '8'}]),
      dict(make_record(9), image='../9.png'),
      dict(make_record(10), conversations=[{'from': 'human', 'value': '<image> hi'}]),
      make_record(11),
  ]
  path = make_jsonl(str(tmp_path / 'bad.jsonl'), lines)
  reasons = {
      2: 'malformed JSON',
      3: "'conversations' is missing",
      4: 'empty conversation',
      5: 'image not found',
      6: 'cannot decode image',
      7: 'longer than seq_len=24',
      8: r'2 <image> placeholder\(s\) in the text but 1 image',
      9: 'escapes the dataset folder',
      10: 'no assistant turn',
  }
  return path, reasons


def test_bad_records_are_skipped_counted_and_logged(tmp_path, tokenizer, make_record,
                                                    make_jsonl, caplog, capsys):
  path, reasons = _bad_dataset(tmp_path, make_record, make_jsonl)
  bad_records = pipeline.BadRecords()
  with caplog.at_level(logging.WARNING):
    iterator = _iterator([path], tokenizer, batch_size=2, shuffle=False,
                         bad_records=bad_records)
    batch = next(iterator)
  assert _record_ids(batch) == [1, 11]
  assert (bad_records.count, bad_records.total) == (9, 11)
  assert len(bad_records.first_offenders) == 9
  for message, (line_no, reason) in zip(bad_records.first_offenders, sorted(reasons.items())):
    assert message.startswith(f'{path}:{line_no}: ')
    assert re.search(reason, message), message
  summary = bad_records.summary()
  assert summary.startswith('skipped 9 of 11 records')
  printed = capsys.readouterr().out
  assert f'warning: {path}: skipped 9 of 11 records' in printed
  assert f'{path}:6: cannot decode image' in printed


@pytest.mark.parametrize('line_no', range(2, 11))
def test_bad_records_raise_with_file_and_line(tmp_path, tokenizer, make_record, make_jsonl,
                                              line_no):
  path, reasons = _bad_dataset(tmp_path, make_record, make_jsonl)
  with open(path) as f:
    lines = f.readlines()
  with open(path, 'w') as f:
    f.writelines(lines[:1] + lines[line_no - 1:line_no])  # one good, one bad at line 2
  with pytest.raises(ValueError, match=f'^{path}:2: .*{reasons[line_no]}'):
    _iterator([path], tokenizer, on_bad_record='raise')


def test_failure_inside_the_map_is_handled(tmp_path, tokenizer, make_record, make_jsonl,
                                           caplog):
  path = make_jsonl(str(tmp_path / 'd.jsonl'), [make_record(i) for i in range(3)])
  # A truncated image passes Pillow's cheap verify() but fails to decode.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(noise).save(tmp_path / 'images' / 'noise.jpg')
  data = (tmp_path / 'images' / 'noise.jpg').read_bytes()
  (tmp_path / 'images' / '1.png').write_bytes(data[:len(data) // 2])
  eval_kwargs = dict(SPEC, tokenizer=tokenizer, batch_size=4)
  bad_records = pipeline.BadRecords()
  eval_kwargs = dict(eval_kwargs, decode_images=False)  # Pillow's cheap verify() only
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.make_eval_batches([path], bad_records=bad_records, **eval_kwargs))
  assert bad_records.count == 0  # not caught up front
  assert len(batches) == 1 and _record_ids(batches[0])[:2] == [0, 2]
  np.testing.assert_array_equal(batches[0]['example_mask'], [1, 1, 0, 0])
  assert f'{path}:2: cannot decode image' in caplog.text
  with pytest.raises(ValueError, match=f'{path}:2: cannot decode image'):
    list(pipeline.make_eval_batches([path], on_bad_record='raise', **eval_kwargs))
  # The same in the Grain pipeline, where a late failure is logged once, not once per epoch.
  train_kwargs = {'num_epochs': 3, 'shuffle': False, 'batch_size': 2, 'decode_images': False}
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert [_record_ids(b) for b in _iterator([path], tokenizer, **train_kwargs)] == [[0, 2]] * 3
  assert caplog.text.count(f'{path}:2: cannot decode image') == 1
  with pytest.raises(ValueError, match=f'{path}:2: cannot decode image'):
    next(_iterator([path], tokenizer, on_bad_record='raise', **train_kwargs))
  # By default (decode_images=True) validation finds it up front instead, counted once.
  bad_records = pipeline.BadRecords()
  list(pipeline.make_eval_batches([path], bad_records=bad_records,
                                  **dict(eval_kwargs, decode_images=True)))
  assert bad_records.count == 1 and bad_records.first_offenders[0].startswith(f'{path}:2: ')


def test_order_is_deterministic_given_the_seed(good_dataset, tokenizer):
  first = _take(_iterator([good_dataset], tokenizer, seed=3), 6)
  again = _take(_iterator([good_dataset], tokenizer, seed=3), 6)
  _assert_same_batches(first, again)
  other_seed = _take(_iterator([good_dataset], tokenizer, seed=4), 6)
  assert [_record_ids(b) for b in first] != [_record_ids(b) for b in other_seed]


def test_epochs_cover_every_record_once_in_a_new_order(good_dataset, tokenizer):
  batches = list(_iterator([good_dataset], tokenizer, num_epochs=2, batch_size=8,
                           drop_remainder=False))
  ids = [i for batch in batches for i in _record_ids(batch)]
  assert [len(_record_ids(b)) for b in batches] == [8, 8, 8, 8, 8]
  assert sorted(ids[:20]) == sorted(ids[20:]) == list(range(20))
  assert ids[:20] != ids[20:]


def test_iterator_state_restores_the_same_next_batches(good_dataset, tokenizer):
  iterator = _iterator([good_dataset], tokenizer)
  _take(iterator, 7)  # into the second epoch
  state = iterator.get_state()
  expected = _take(iterator, 4)
  resumed = _iterator([good_dataset], tokenizer)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 4), expected)


def test_iterator_checkpoints_with_orbax(good_dataset, tokenizer, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  import grain  # pylint: disable=g-import-not-at-top
  iterator = _iterator([good_dataset], tokenizer)
  _take(iterator, 3)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as manager:
    manager.save(3, args=ocp.args.Composite(
        step=ocp.args.JsonSave({'step': 3}),
        data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 3)
  resumed = _iterator([good_dataset], tokenizer)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as manager:
    restored = manager.restore(3, args=ocp.args.Composite(
        step=ocp.args.JsonRestore(),
        data=grain.checkpoint.CheckpointRestore(resumed)))
  assert restored['step'] == {'step': 3}
  _assert_same_batches(_take(resumed, 3), expected)


def test_worker_process_gives_the_same_batches(good_dataset, tokenizer):
  expected = _take(_iterator([good_dataset], tokenizer), 3)
  iterator = _iterator([good_dataset], tokenizer, worker_count=1)
  try:
    _take(iterator, 1)
    state = iterator.get_state()
    _assert_same_batches(_take(iterator, 2), expected[1:])
  finally:
    iterator.close()
  resumed = _iterator([good_dataset], tokenizer, worker_count=1)
  try:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), expected[1:])
  finally:
    resumed.close()


def test_shards_are_disjoint_and_cover_the_data(tmp_path, tokenizer, make_record, make_jsonl):
  first = make_jsonl(str(tmp_path / 'a.jsonl'), [make_record(i) for i in range(7)])
  second = make_jsonl(str(tmp_path / 'b.jsonl'), [make_record(i) for i in range(7, 20)])
  eval_kwargs = dict(SPEC, tokenizer=tokenizer, batch_size=3, shard_count=3)
  shards = []
  for shard_index in range(3):
    batches = pipeline.make_eval_batches([first, second], shard_index=shard_index, **eval_kwargs)
    shards.append([i for b in batches for i, real in zip(_record_ids(b), b['example_mask'])
                   if real])
  assert [len(shard) for shard in shards] == [7, 7, 6]
  assert sorted(i for shard in shards for i in shard) == list(range(20))
  with pytest.raises(ValueError, match='shard_index'):
    list(pipeline.make_eval_batches([first], shard_index=3, **eval_kwargs))


def test_eval_batches_keep_file_order_and_pad(good_dataset, tokenizer):
  batches = list(pipeline.make_eval_batches(
      [good_dataset], tokenizer=tokenizer, batch_size=6, **SPEC))
  assert len(batches) == 4
  assert [b['example_mask'].tolist() for b in batches][-1] == [1, 1, 0, 0, 0, 0]
  ids = [i for b in batches for i, real in zip(_record_ids(b), b['example_mask']) if real]
  assert ids == list(range(20))
  padding = {key: value[2:] for key, value in batches[-1].items()}
  assert padding['attention_mask'].sum() == padding['loss_mask'].sum() == 0
  assert not padding['images'].any() and not padding['num_images'].any()
  assert not padding['prefix_len'].any()


def test_each_record_is_tokenized_once_per_run(good_dataset, tokenizer, monkeypatch):
  from openvlm_jax.data import conversation  # pylint: disable=g-import-not-at-top
  calls = []
  encode = conversation.encode_conversation

  def counting_encode(*args, **kwargs):
    calls.append(1)
    return encode(*args, **kwargs)

  monkeypatch.setattr(conversation, 'encode_conversation', counting_encode)
  iterator = _iterator([good_dataset], tokenizer, num_epochs=3)
  batches = list(iterator)
  assert len(batches) == 3 * 20 // 4  # every record, three times over
  assert len(calls) == 20  # tokenized when validated, never again
  # The kept tokens are what tokenizing again gives.
  source = pipeline.load_records([good_dataset], pipeline.examples_lib.ExampleSpec(
      tokenizer=tokenizer, **SPEC))
  record = source[3]
  fresh = pipeline.examples_lib.encode_tokens({k: v for k, v in record.items() if k != 'tokens'},
                                              pipeline.examples_lib.ExampleSpec(
                                                  tokenizer=tokenizer, **SPEC))
  for key in ('input_ids', 'loss_mask'):
    np.testing.assert_array_equal(record['tokens'][key], fresh[key])
