"""Tests of the JSONL -> ArrayRecord conversion and the TFDS source (no TensorFlow)."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from openvlm_jax.console import UserError
from openvlm_jax.data import convert, jsonl, pipeline, sources, tfds_source



def _varied_records(make_record):
  """Records with every kind of field: extra keys, two images, none, a question record."""
  records = [make_record(i) for i in range(6)]
  records[1] = dict(records[1], question_type='value', answer_kind='number',
                    meta={'table': 'wheat', 'tags': ['a', 'b']})
  records[2] = dict(records[2], image=['images/2.png', 'images/12.png'],
                    conversations=[{'from': 'human', 'value': '<image>\n<image>\nSum?'},
                                   {'from': 'gpt', 'value': '14'}])
  records[3] = {'id': 7, 'conversations': [{'from': 'human', 'value': 'No image?'},
                                           {'from': 'gpt', 'value': 'None.'}]}
  records[4] = {'image': 'images/4.png', 'question': '<image>\nWhat number is shown?',
                'answer': '4'}  # a question record, without an id
  return records


def test_conversion_round_trips_every_field_and_image_byte(tmp_path, make_record, make_jsonl):
  records = _varied_records(make_record)
  path = make_jsonl(str(tmp_path / 'd.jsonl'), records)
  folder, bad = convert.convert_jsonl({'train': [path]}, str(tmp_path / 'ar'),
                                      show_progress=False)
  assert bad['train'].count == 0 and bad['train'].total == len(records)
  source = pickle.loads(pickle.dumps(tfds_source.TfdsSource(folder, 'train')))  # as to a worker
  assert len(source) == len(records)
  for index, record in enumerate(records):  # JSONL order is kept
    stored = source.raw(index)
    assert json.loads(stored['record']) == record
    assert stored['origin'] == f'{path}:{index + 1}'
    expected = jsonl.parse_record(json.dumps(record), path, index + 1)
    image_bytes = []
    for image_path in expected.pop('image_paths'):
      with open(image_path, 'rb') as f:
        image_bytes.append(f.read())
    assert stored['images'] == image_bytes
    read = source[index]
    assert read.pop('image_bytes') == image_bytes
    assert read.pop('where') == f'{folder}:train[{index}] (from {path}:{index + 1})'
    expected.pop('where')
    assert read == expected  # id (given or 'd.jsonl:5'), conversations, question fields


def test_arrayrecord_batches_equal_the_jsonl_batches(tmp_path, tokenizer, small_spec,
                                                     make_record, make_jsonl):
  path = make_jsonl(str(tmp_path / 'd.jsonl'), [make_record(i) for i in range(6)])
  convert.convert_jsonl({'train': [path]}, str(tmp_path / 'ar'), show_progress=False)
  options = dict(small_spec, tokenizer=tokenizer, batch_size=6)
  from_ar = next(pipeline.make_eval_batches([str(tmp_path / 'ar')], **options))
  from_jsonl = next(pipeline.make_eval_batches([path], **options))
  for key in from_jsonl:
    np.testing.assert_array_equal(from_ar[key], from_jsonl[key], err_msg=key)


def test_bad_records_are_skipped_counted_and_named(tmp_path, make_record, make_jsonl):
  corrupt = tmp_path / 'images' / 'corrupt.png'
  lines = [make_record(0), json.dumps(dict(make_record(1), image='images/none.png')), '{"id": ',
           dict(make_record(3), image='images/corrupt.png'), make_record(4)]
  path = make_jsonl(str(tmp_path / 'd.jsonl'), lines)
  corrupt.write_bytes(b'\x89PNG\r\n\x1a\n not really')
  folder, bad = convert.convert_jsonl({'train': [path]}, str(tmp_path / 'ar'),
                                      show_progress=False)
  assert (bad['train'].count, bad['train'].total) == (3, 5)
  assert [message.split(': ')[0] for message in bad['train'].first_offenders] == [
      f'{path}:2', f'{path}:3', f'{path}:4']
  source = tfds_source.TfdsSource(folder, 'train')
  assert [source[i]['id'] for i in range(len(source))] == ['r0', 'r4']
  assert bad['train'].first_offenders[0] == f'{path}:2: image not found: {tmp_path}/images/none.png'
  with pytest.raises(UserError, match=f'^{path}:2: image not found'):
    convert.convert_jsonl({'train': [path]}, str(tmp_path / 'ar2'), on_bad_record='raise',
                          show_progress=False)


def test_source_names_pick_the_split_or_say_which_exist(tmp_path, make_record, make_jsonl):
  train = make_jsonl(str(tmp_path / 'train.jsonl'), [make_record(i) for i in range(4)])
  held_out = make_jsonl(str(tmp_path / 'eval.jsonl'), [make_record(i) for i in range(4, 6)])
  out = str(tmp_path / 'ar')
  folder, _ = convert.convert_jsonl({'train': [train], 'eval': [held_out]}, out,
                                    show_progress=False)
  assert folder == os.path.join(out, 'llava_records', '2.0.0')
  assert len(sources.open_source(f'{out}:eval')) == 2
  assert len(sources.open_source(f'{folder}:train')) == 4
  with pytest.raises(UserError, match=r'name a split as .*:<split> \(splits: eval, train\)'):
    sources.open_source(out)
  with pytest.raises(UserError, match=r"no split 'test' \(splits: eval, train\)"):
    sources.open_source(f'{out}:test')
  with pytest.raises(UserError, match='config.data.train_files.0.: no such file or converted'):
    sources.check_spec(str(tmp_path / 'nowhere.jsonl'), 'config.data.train_files[0]')
  with pytest.raises(UserError, match='not a converted dataset'):
    sources.open_source(str(tmp_path / 'images'))
  with pytest.raises(UserError, match='already holds a converted dataset'):
    convert.convert_jsonl({'train': [train]}, out, show_progress=False)

  # JSONL and a converted split read as one source, each record saying where it is from.
  both = sources.open_sources([train, f'{out}:eval', held_out])
  assert isinstance(both, sources.ConcatSource) and len(both) == 8
  assert [both[i]['id'] for i in range(8)] == [f'r{i}' for i in range(6)] + ['r4', 'r5']
  assert both.where(0) == f'{train}:1'
  assert both.where(4) == f'{folder}:eval[0] (from {held_out}:1)'
  assert both.where(7) == f'{held_out}:2'


def test_arrayrecord_iterator_resumes_exactly_in_a_worker(tmp_path, tokenizer, small_spec,
                                                           make_record, make_jsonl):
  path = make_jsonl(str(tmp_path / 'd.jsonl'), [make_record(i) for i in range(10)])
  convert.convert_jsonl({'train': [path]}, str(tmp_path / 'ar'), show_progress=False)
  options = dict(small_spec, tokenizer=tokenizer, batch_size=4, seed=3)
  name = [f'{tmp_path}/ar:train']
  expected = pipeline.make_iterator(name, **options)
  batches = [next(expected) for _ in range(6)]  # into the third epoch
  iterator = pipeline.make_iterator(name, worker_count=1, **options)
  try:
    for _ in range(2):
      next(iterator)
    state = iterator.get_state()
  finally:
    iterator.close()
  resumed = pipeline.make_iterator(name, worker_count=1, **options)
  try:
    resumed.set_state(state)
    for batch in batches[2:]:
      got = next(resumed)
      for key in batch:
        np.testing.assert_array_equal(got[key], batch[key], err_msg=key)
  finally:
    resumed.close()


def test_convert_command_reports_counts_and_where_to_read(tmp_path, make_record, make_jsonl):
  path = make_jsonl(str(tmp_path / 'd.jsonl'),
                    [make_record(0), json.dumps(dict(make_record(1), image='images/none.png'))])
  out = str(tmp_path / 'ar')
  command = [sys.executable, '-m', 'openvlm_jax.data.convert', f'--train={path}',
             f'--out={out}']
  done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert 'train: 1 records written; skipped 1 of 2 records' in done.stdout
  assert f'{path}:2: image not found' in done.stdout
  assert f'--config.data.train_files={out}:train' in done.stdout
  assert 'INFO' not in done.stderr  # TFDS's log lines stay out of the console
  again = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1] == (
      f'error: {out} already holds a converted dataset; remove it or choose another --out')
