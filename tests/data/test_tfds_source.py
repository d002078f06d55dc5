"""Tests of the TFDS ArrayRecord source (written and read without TensorFlow)."""

import json
import pickle

import numpy as np
import pytest

from openvlm_jax.data import pipeline, tfds_source

SPEC = {
    'image_size': 8,
    'image_mean': (0.5,) * 3,
    'image_std': (0.25,) * 3,
    'num_image_tokens': 2,
    'seq_len': 24,
    'max_images': 1,
}


def test_tfds_records_match_the_jsonl_records(tmp_path, tokenizer, make_record, make_jsonl):
  path = make_jsonl(str(tmp_path / 'd.jsonl'), [make_record(i) for i in range(6)])
  folder = tfds_source.write_tfds_dataset({'train': [path]}, str(tmp_path / 'tfds'))
  source = tfds_source.TfdsSource(folder, 'train')
  assert len(source) == 6
  source = pickle.loads(pickle.dumps(source))  # as Grain sends it to a worker
  by_id = {source[i]['id']: source[i] for i in range(len(source))}
  assert sorted(by_id) == [f'r{i}' for i in range(6)]
  assert by_id['r2']['conversations'] == make_record(2)['conversations']

  def rows(data):
    batches = pipeline.make_eval_batches(data, tokenizer=tokenizer, batch_size=6, **SPEC)
    batch = next(batches)
    order = np.lexsort(batch['images'][:, 0, 0, 0, :1].T)  # sort rows by image value
    return {key: value[order] for key, value in batch.items()}

  from_tfds, from_jsonl = rows(source), rows([path])
  for key in from_jsonl:
    np.testing.assert_array_equal(from_tfds[key], from_jsonl[key], err_msg=key)


def test_missing_image_stops_the_conversion(tmp_path, make_record, make_jsonl):
  record = dict(make_record(0), image='images/none.png')
  path = make_jsonl(str(tmp_path / 'd.jsonl'), [json.dumps(record)])
  with pytest.raises(ValueError, match=f'{path}:1: cannot read image'):
    tfds_source.write_tfds_dataset({'train': [path]}, str(tmp_path / 'tfds'))
