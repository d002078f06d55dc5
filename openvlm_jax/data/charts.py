"""A chart-reading benchmark from real tables, written as LLaVA JSONL + PNG.

The tables ship inside packages, so this builds offline: vega_datasets' local data
(seattle-weather, barley, wheat, us-employment, iowa-electricity, crimea, stocks, cars) and
scikit-learn's iris and wine. Each table gives named series (labels and values, e.g. Seattle's
mean daily high per month of 2013); a chart plots a window of 3-8 consecutive points of one
series as bars or a line, with or without value labels, at one of several sizes. Questions
have exact answers computed from the plotted values:

  value       "What is the value for Mar?"              -> "11.2"
  max / min   "What is the highest value shown?"         -> "23.6"
  argmax      "Which month has the highest value?"      -> "Jul"
  difference  "What is the difference between A and B?"  -> value(A) - value(B)
  sum         "What is the sum of A and B?"              -> value(A) + value(B)
  count       "How many bars are shown?"                 -> "6"

Values are rounded to the precision their chart shows (integers from 100 up, else one
decimal) before plotting, so every answer is exact. The split is by table: `SPLITS` holds whole
tables out for `val` (choosing hyperparameters) and `test`. Records carry `question_type` for
per-type scores, `answer_kind` ('label' for argmax: a year naming a bar is not a quantity, so
it gets no 5% tolerance) and `chart` (table, series, labels, values) for checking.

Needs the `charts` extra (matplotlib, pandas, vega_datasets).
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator

import numpy as np

from openvlm_jax.console import UserError

SPLITS = {
    'train': ('seattle-weather', 'barley', 'us-employment', 'cars', 'wine'),
    'val': ('stocks', 'iris'),
    'test': ('wheat', 'crimea', 'iowa-electricity'),
}
QUESTION_TYPES = ('value', 'max', 'min', 'argmax', 'difference', 'sum', 'count')
_MARKER = '.charts-complete'
_MONTHS = ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec')
_SIDES_PX = (160, 224, 288)  # square charts; the image processor resizes them for the model


@dataclasses.dataclass(frozen=True)
class Series:
  """One named series of a table: `labels[i]` has `values[i]` (in `unit`)."""

  table: str
  name: str  # e.g. 'temp_max 2013'
  title: str
  label_kind: str  # what a label is: 'month', 'variety', 'year', ...
  labels: tuple[str, ...]
  values: tuple[float, ...]
  unit: str = ''


def display_round(values) -> np.ndarray:
  """Rounds to what a chart shows: integers when every |value| >= 100, else one decimal."""
  values = np.asarray(values, np.float64)
  decimals = 0 if np.all(np.abs(values) >= 100) else 1
  return np.round(values, decimals)


def format_number(value: float) -> str:
  """'12' for integral values, else one decimal ('11.2'); no thousands separators."""
  value = round(float(value), 1)
  return str(int(value)) if value == int(value) else f'{value:.1f}'


def _series(table, name, title, label_kind, labels, values, unit='') -> Series:
  return Series(table=table, name=name, title=title, label_kind=label_kind,
                labels=tuple(str(label) for label in labels),
                values=tuple(float(v) for v in display_round(values)), unit=unit)


def _seattle_weather(local_data) -> Iterator[Series]:
  frame = local_data.seattle_weather()
  frame['year'], frame['month'] = frame['date'].dt.year, frame['date'].dt.month
  for year, rows in frame.groupby('year'):
    highs = rows.groupby('month')['temp_max'].mean()
    rainfall = rows.groupby('month')['precipitation'].sum()
    yield _series('seattle-weather', f'temp_max {year}', f'Seattle {year}: mean daily high',
                  'month', [_MONTHS[m - 1] for m in highs.index], highs, '°C')
    yield _series('seattle-weather', f'precipitation {year}', f'Seattle {year}: rainfall',
                  'month', [_MONTHS[m - 1] for m in rainfall.index], rainfall, 'mm')


def _barley(local_data) -> Iterator[Series]:
  frame = local_data.barley()
  for (site, year), rows in frame.groupby(['site', 'year']):
    rows = rows.sort_values('variety')
    yield _series('barley', f'{site} {year}', f'Barley yield, {site} {year}', 'variety',
                  rows['variety'], rows['yield'], 'bushels/acre')


def _us_employment(local_data) -> Iterator[Series]:
  frame = local_data.us_employment()
  frame['year'] = frame['month'].str[:4].astype(int)
  sectors = ('mining_and_logging', 'construction', 'manufacturing', 'information',
             'financial_activities', 'leisure_and_hospitality')
  yearly = frame.groupby('year')[list(sectors)].mean()
  for sector in sectors:
    yield _series('us-employment', sector, f"US jobs: {sector.replace('_', ' ')}", 'year',
                  yearly.index, yearly[sector], 'thousand')


def _cars(local_data) -> Iterator[Series]:
  frame = local_data.cars()
  frame['year'] = frame['Year'].dt.year
  for origin, rows in frame.groupby('Origin'):
    mpg = rows.groupby('year')['Miles_per_Gallon'].mean()
    horsepower = rows.groupby('year')['Horsepower'].mean()
    yield _series('cars', f'mpg {origin}', f'Mean MPG of cars from {origin}', 'year',
                  mpg.index, mpg, 'mpg')
    yield _series('cars', f'horsepower {origin}', f'Mean horsepower, {origin}', 'year',
                  horsepower.index, horsepower, 'hp')


def _stocks(local_data) -> Iterator[Series]:
  frame = local_data.stocks()
  frame['year'] = frame['date'].dt.year
  for symbol, rows in frame.groupby('symbol'):
    prices = rows.groupby('year')['price'].mean()
    yield _series('stocks', symbol, f'{symbol}: mean share price', 'year', prices.index, prices,
                  'USD')


def _wheat(local_data) -> Iterator[Series]:
  frame = local_data.wheat().dropna()
  yield _series('wheat', 'wheat', 'Price of wheat', 'year', frame['year'], frame['wheat'],
                'shillings')
  yield _series('wheat', 'wages', 'Weekly wages', 'year', frame['year'], frame['wages'],
                'shillings')


def _crimea(local_data) -> Iterator[Series]:
  frame = local_data.crimea()
  labels = [f"{_MONTHS[d.month - 1]} {d.year % 100:02d}" for d in frame['date']]
  for cause in ('wounds', 'other', 'disease'):
    yield _series('crimea', cause, f'Crimean War deaths: {cause}', 'month', labels,
                  frame[cause], 'deaths')


def _iowa_electricity(local_data) -> Iterator[Series]:
  frame = local_data.iowa_electricity()
  frame['year'] = frame['year'].dt.year
  for source, rows in frame.groupby('source'):
    yield _series('iowa-electricity', source, f'Iowa electricity: {source}', 'year',
                  rows['year'], rows['net_generation'], 'GWh')


def _sklearn_classes(name: str, loader: Callable) -> Iterator[Series]:
  bunch = loader()
  classes = [str(c) for c in bunch.target_names]
  for column, feature in enumerate(bunch.feature_names):
    means = [bunch.data[bunch.target == k, column].mean() for k in range(len(classes))]
    yield _series(name, feature, f'{name}: mean {feature}', 'class', classes, means)


def table_series() -> dict[str, list[Series]]:
  """Every table's series, by table name."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top (slow imports)
  try:
    from vega_datasets import local_data  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise UserError("the chart benchmark needs the 'charts' extra: "
                    "pip install -e '.[charts]'") from error
  makers = {
      'seattle-weather': lambda: _seattle_weather(local_data),
      'barley': lambda: _barley(local_data),
      'us-employment': lambda: _us_employment(local_data),
      'cars': lambda: _cars(local_data),
      'wine': lambda: _sklearn_classes('wine', datasets.load_wine),
      'stocks': lambda: _stocks(local_data),
      'iris': lambda: _sklearn_classes('iris', datasets.load_iris),
      'wheat': lambda: _wheat(local_data),
      'crimea': lambda: _crimea(local_data),
      'iowa-electricity': lambda: _iowa_electricity(local_data),
  }
  return {table: list(make()) for table, make in makers.items()}


def window(series: Series, rng: np.random.Generator) -> Series:
  """A run of 3-8 consecutive points of `series` (all of it when shorter)."""
  size = min(len(series.labels), int(rng.integers(3, 9)))
  start = int(rng.integers(0, len(series.labels) - size + 1))
  return dataclasses.replace(series, labels=series.labels[start:start + size],
                             values=series.values[start:start + size])


def question(chart: Series, question_type: str, kind: str,
             rng: np.random.Generator) -> tuple[str, str]:
  """(question, exact answer) of one type about a chart's plotted values."""
  labels, values = chart.labels, np.asarray(chart.values)
  unit = f', in {chart.unit}' if chart.unit and rng.random() < 0.5 else ''
  if question_type == 'value':
    i = int(rng.integers(len(labels)))
    return f'What is the value for {labels[i]}{unit}?', format_number(values[i])
  if question_type == 'max':
    return f'What is the highest value shown{unit}?', format_number(values.max())
  if question_type == 'min':
    return f'What is the lowest value shown{unit}?', format_number(values.min())
  if question_type == 'argmax':
    return f'Which {chart.label_kind} has the highest value?', labels[int(values.argmax())]
  if question_type in ('difference', 'sum'):
    i, j = rng.choice(len(labels), size=2, replace=False)
    if question_type == 'difference' and values[i] == values[j]:
      distinct = np.flatnonzero(values != values[i])  # answer_types_of leaves one at least
      j = int(rng.choice(distinct))
    if question_type == 'sum':
      return (f'What is the sum of the values for {labels[i]} and {labels[j]}{unit}?',
              format_number(values[i] + values[j]))
    if values[i] < values[j]:
      i, j = j, i
    return (f'How much higher is the value for {labels[i]} than for {labels[j]}{unit}?',
            format_number(values[i] - values[j]))
  if question_type == 'count':
    thing = 'bars' if kind == 'bar' else 'points'
    return f'How many {thing} are shown?', str(len(labels))
  raise ValueError(f'unknown question type {question_type!r}')


def answer_types_of(chart: Series) -> tuple[str, ...]:
  """The question types with one right, nonzero-informative answer for this chart: argmax
  needs a unique maximum, difference two distinct values."""
  values = np.asarray(chart.values)
  unique_max = np.sum(values == values.max()) == 1
  distinct = len(set(values.tolist())) > 1
  return tuple(t for t in QUESTION_TYPES
               if (t != 'argmax' or unique_max) and (t != 'difference' or distinct))


def render(chart: Series, path: str, *, kind: str, value_labels: bool, side_px: int) -> None:
  """Draws `chart` as a square PNG of `side_px` pixels: bars or a line, value labels or not.

  Text scales with the side, so every size reads alike once the image processor resizes it.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top (slow import)
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  dpi = 80
  small, title = 7 * side_px / _SIDES_PX[0], 8 * side_px / _SIDES_PX[0]  # points
  figure, axes = plt.subplots(figsize=(side_px / dpi, side_px / dpi), dpi=dpi)
  positions = np.arange(len(chart.labels))
  values = np.asarray(chart.values)
  if kind == 'bar':
    artists = axes.bar(positions, values, color='tab:blue')
  else:
    axes.plot(positions, values, marker='o', color='tab:blue')
    artists = None
  if value_labels:
    texts = [format_number(v) for v in values]
    if artists is not None:
      axes.bar_label(artists, labels=texts, fontsize=small)
    else:
      for x, y, text in zip(positions, values, texts):
        axes.annotate(text, (x, y), textcoords='offset points', xytext=(0, 4), ha='center',
                      fontsize=small)
  axes.set_xticks(positions, chart.labels, rotation=45 if len(chart.labels) > 5 else 0,
                  fontsize=small)
  axes.tick_params(axis='y', labelsize=small)
  axes.set_title(chart.title, fontsize=title)
  axes.margins(y=0.15)
  figure.tight_layout()
  figure.savefig(path, dpi=dpi)
  plt.close(figure)


def build_chart_dataset(out_dir: str, *, seed: int = 0, charts_per_series: int = 30,
                        eval_charts_per_series: int = 6, questions_per_chart: int = 3,
                        splits: tuple[str, ...] = ('train', 'val', 'test'),
                        tables: tuple[str, ...] | None = None) -> dict[str, str]:
  """Builds the chart benchmark in `out_dir` once; later calls with the same options reuse it.

  Args:
    out_dir: destination folder: `<split>.jsonl` and `images/*.png`.
    seed: fixes the windows, chart styles and questions.
    charts_per_series: charts drawn from each series of a train table (one window each).
    eval_charts_per_series: the same for the val and test tables.
    questions_per_chart: questions asked about each chart (distinct types).
    splits: which of `SPLITS` to write.
    tables: only these tables (all of each split's tables when None).

  Returns:
    `{split: path}` of the JSONL files.
  """
  unknown = set(splits) - set(SPLITS)
  if unknown:
    raise UserError(f'unknown chart splits {sorted(unknown)}; known: {list(SPLITS)}')
  options = {'seed': seed, 'charts_per_series': charts_per_series,
             'eval_charts_per_series': eval_charts_per_series,
             'questions_per_chart': questions_per_chart, 'splits': list(splits),
             'tables': list(tables) if tables is not None else None}
  paths = {split: os.path.join(out_dir, f'{split}.jsonl') for split in splits}
  marker = os.path.join(out_dir, _MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == options and all(map(os.path.exists, paths.values())):
        return paths
    os.remove(marker)

  all_series = table_series()
  rng = np.random.default_rng(seed)
  shutil.rmtree(os.path.join(out_dir, 'images'), ignore_errors=True)
  os.makedirs(os.path.join(out_dir, 'images'))
  for split in splits:
    records = []
    for table in SPLITS[split]:
      if tables is not None and table not in tables:
        continue
      for series in all_series[table]:
        for _ in range(charts_per_series if split == 'train' else eval_charts_per_series):
          records.extend(_chart_records(window(series, rng), split, len(records), out_dir,
                                        questions_per_chart, rng))
    with open(paths[split], 'w') as f:
      f.writelines(json.dumps(record) + '\n' for record in records)
  with open(marker, 'w') as f:
    json.dump(options, f)
  return paths


def _chart_records(chart: Series, split: str, first_number: int, out_dir: str,
                   questions_per_chart: int, rng: np.random.Generator) -> list[dict]:
  """Renders one chart and returns the records of its questions."""
  kind = 'bar' if rng.random() < 0.6 else 'line'
  value_labels = bool(rng.random() < 0.5)
  side_px = int(rng.choice(_SIDES_PX))
  image_name = f'images/{split}_{first_number:06d}.png'
  render(chart, os.path.join(out_dir, image_name), kind=kind, value_labels=value_labels,
         side_px=side_px)
  types = answer_types_of(chart)
  chosen = rng.choice(len(types), size=min(questions_per_chart, len(types)), replace=False)
  records = []
  for offset, type_index in enumerate(sorted(chosen)):
    text, answer = question(chart, types[type_index], kind, rng)
    records.append({
        'id': f'chart-{split}-{first_number + offset}',
        'image': image_name,
        'conversations': [{'from': 'human', 'value': f'<image>\n{text}'},
                          {'from': 'gpt', 'value': answer}],
        'question_type': types[type_index],
        'answer_kind': 'label' if types[type_index] == 'argmax' else 'number',
        'chart': {'table': chart.table, 'series': chart.name, 'kind': kind,
                  'value_labels': value_labels, 'labels': list(chart.labels),
                  'values': list(chart.values), 'unit': chart.unit},
    })
  return records


def built_files(out_dir: str) -> dict[str, str] | None:
  """`{split: path}` of a finished build in `out_dir`, or None (nothing is built)."""
  marker = os.path.join(out_dir, _MARKER)
  if not os.path.exists(marker):
    return None
  with open(marker) as f:
    splits = json.load(f)['splits']
  paths = {split: os.path.join(out_dir, f'{split}.jsonl') for split in splits}
  return paths if all(map(os.path.exists, paths.values())) else None
