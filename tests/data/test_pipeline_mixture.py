"""Tests of weighted mixtures of sources (Grain's mix): proportions, bad records, resume."""

import json

import numpy as np
import pytest

from openvlm_jax.console import UserError
from openvlm_jax.data import convert, pipeline

@pytest.fixture
def three_sources(tmp_path, make_record, make_jsonl):
  """Records 0-5 in a.jsonl (one bad line more), 6-13 converted to ArrayRecord, 14-22 in c."""
  first = make_jsonl(str(tmp_path / 'a.jsonl'), [make_record(i) for i in range(6)]
                     + [json.dumps(dict(make_record(99), image='images/none.png'))])
  second = make_jsonl(str(tmp_path / 'b.jsonl'), [make_record(i) for i in range(6, 14)])
  convert.convert_jsonl({'train': [second]}, str(tmp_path / 'ar'), show_progress=False)
  third = make_jsonl(str(tmp_path / 'c.jsonl'), [make_record(i) for i in range(14, 23)])
  return [first, f'{tmp_path}/ar:train', third]


@pytest.fixture
def make_iterator(tokenizer, small_spec):
  """make_iterator(files, **options): batches of 8 over the small test examples."""
  return lambda files, **kwargs: pipeline.make_iterator(
      files, tokenizer=tokenizer, batch_size=8, seed=0, **dict(small_spec, **kwargs))


def test_mixture_proportions_follow_the_weights(three_sources, make_iterator, record_ids):
  weights = (0.5, 0.3, 0.2)
  reports = [pipeline.BadRecords() for _ in weights]
  iterator = make_iterator(three_sources, weights=weights, bad_records=reports)
  ids = [i for _ in range(50) for i in record_ids(next(iterator))]  # 400 examples
  shares = [np.mean([lo <= i < hi for i in ids]) for lo, hi in ((0, 6), (6, 14), (14, 23))]
  np.testing.assert_allclose(shares, weights, atol=0.03)
  # Each source keeps its own bad-record count; all of each source's records are seen.
  assert [(report.count, report.total) for report in reports] == [(1, 7), (0, 8), (0, 9)]
  assert sorted(set(ids)) == list(range(23))


def test_mixture_resumes_exactly(three_sources, make_iterator):
  options = dict(weights=(2.0, 1.0, 1.0), shuffle=True)
  iterator = make_iterator(three_sources, **options)
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  resumed = make_iterator(three_sources, **options)
  resumed.set_state(state)
  for batch in expected:
    got = next(resumed)
    for key in batch:
      np.testing.assert_array_equal(got[key], batch[key], err_msg=key)


def test_mixture_rows_can_be_packed(three_sources, make_iterator):
  iterator = make_iterator(three_sources, weights=(1.0, 1.0, 2.0), packing=True,
                       pack_max_images=4, seq_len=72)
  batch = next(iterator)
  assert batch['attention_mask'].max() == 3  # three 23-token examples in a row
  assert batch['num_images'].sum() == 3 * 8


def test_mixture_weights_must_pair_with_the_sources(three_sources, make_iterator):
  with pytest.raises(UserError, match='2 weights for 3 train_files'):
    make_iterator(three_sources, weights=(1.0, 1.0))
  with pytest.raises(UserError, match='every weight must be > 0'):
    make_iterator(three_sources, weights=(1.0, 0.0, 1.0))
