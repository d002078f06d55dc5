"""The chart benchmark: answers recomputed from the tables, split by table, the user's path."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from openvlm_jax.data import charts, jsonl

pytest.importorskip('matplotlib')
local_data = pytest.importorskip('vega_datasets').local_data


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  folder = tmp_path_factory.mktemp('charts')
  paths = charts.build_chart_dataset(str(folder), seed=3, charts_per_series=1,
                                     eval_charts_per_series=1,
                                     questions_per_chart=len(charts.QUESTION_TYPES))
  records = {}
  for split, path in paths.items():
    with open(path) as f:
      records[split] = [jsonl.parse_record(line, path, n) | {'raw': json.loads(line)}
                        for n, line in enumerate(f, 1)]
  return paths, records


def _all(records):
  return [record for rows in records.values() for record in rows]


def _round_like_a_chart(values):
  values = np.asarray(values, np.float64)
  return np.round(values, 0 if np.abs(values).min() >= 100 else 1)


def _table_values(table, series):
  """The whole series recomputed from the raw table: {label: value}."""
  if table == 'seattle-weather':
    measure, year = series.split()
    frame = local_data.seattle_weather()
    frame = frame[frame['date'].dt.year == int(year)]
    grouped = frame.groupby(frame['date'].dt.strftime('%b'))[measure]
    values = grouped.mean() if measure == 'temp_max' else grouped.sum()
  elif table == 'barley':
    frame = local_data.barley()
    site, year = series.rsplit(' ', 1)
    values = frame[(frame['site'] == site) & (frame['year'] == int(year))].set_index(
        'variety')['yield']
  elif table == 'wheat':
    values = local_data.wheat().dropna().set_index('year')[series]
  elif table == 'iowa-electricity':
    frame = local_data.iowa_electricity()
    frame = frame[frame['source'] == series]
    values = frame.set_index(frame['year'].dt.year)['net_generation']
  elif table == 'iris':
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    iris = datasets.load_iris()
    column = list(iris.feature_names).index(series)
    values = {name: iris.data[iris.target == k, column].mean()
              for k, name in enumerate(iris.target_names)}
    labels = list(values)
    return dict(zip(labels, _round_like_a_chart([values[k] for k in labels])))
  else:
    return None
  return dict(zip(map(str, values.index), _round_like_a_chart(values.to_numpy())))


def _expected_answer(record):
  """The answer recomputed from the plotted values (labels, values) and the question."""
  chart = record['raw']['chart']
  labels, values = chart['labels'], np.asarray(chart['values'])
  question = record['conversations'][0]['value']
  named = [label for label in labels if f' {label} ' in question or f' {label}?' in question
           or f' {label},' in question]
  kind = record['question_type']
  if kind == 'value':
    return values[labels.index(named[0])]
  if kind == 'max':
    return values.max()
  if kind == 'min':
    return values.min()
  if kind == 'argmax':
    return labels[int(np.argmax(values))]
  if kind == 'count':
    return len(labels)
  first, second = sorted(named, key=question.index)
  a, b = values[labels.index(first)], values[labels.index(second)]
  return a + b if kind == 'sum' else a - b


def test_every_answer_follows_from_the_plotted_values(built):
  _, records = built
  for record in _all(records):
    expected = _expected_answer(record)
    answer = record['conversations'][1]['value']
    if isinstance(expected, str):
      assert answer == expected, record['id']
    else:
      assert float(answer) == pytest.approx(float(expected), abs=1e-6), record['id']


def test_the_plotted_values_are_the_tables_values(built):
  _, records = built
  checked = set()
  for record in _all(records):
    chart = record['raw']['chart']
    table_values = _table_values(chart['table'], chart['series'])
    if table_values is None:
      continue
    for label, value in zip(chart['labels'], chart['values']):
      assert value == pytest.approx(table_values[label]), (record['id'], label)
    checked.add(chart['table'])
  assert checked == {'seattle-weather', 'barley', 'wheat', 'iowa-electricity', 'iris'}


def test_the_split_is_by_table(built):
  _, records = built
  tables = {split: {r['raw']['chart']['table'] for r in rows} for split, rows in records.items()}
  assert tables == {split: set(names) for split, names in charts.SPLITS.items()}
  assert not tables['train'] & (tables['val'] | tables['test'])
  assert not tables['val'] & tables['test']


def test_records_take_the_users_path(built):
  paths, records = built
  test_rows = records['test']
  assert {r['question_type'] for r in test_rows} == set(charts.QUESTION_TYPES)
  # The label of a bar (often a year) is scored as a name, without the 5% tolerance.
  assert all((r['answer_kind'] == 'label') == (r['question_type'] == 'argmax')
             for r in _all(records))
  assert len({r['id'] for r in _all(records)}) == sum(map(len, records.values()))
  styles = {(r['raw']['chart']['kind'], r['raw']['chart']['value_labels'])
            for r in _all(records)}
  assert styles == {('bar', True), ('bar', False), ('line', True), ('line', False)}
  sizes = set()
  for record in test_rows[:40]:
    (path,) = record['image_paths']
    assert os.path.dirname(path).startswith(os.path.dirname(paths['test']))
    with Image.open(path) as image:
      assert image.width == image.height
      sizes.add(image.width)
  assert len(sizes) > 1


def test_argmax_is_asked_only_with_a_unique_maximum():
  tie = charts.Series(table='t', name='s', title='t', label_kind='month', labels=('a', 'b'),
                      values=(3.0, 3.0))
  assert 'argmax' not in charts.answer_types_of(tie)
  assert charts.format_number(12.0) == '12' and charts.format_number(11.25) == '11.2'
