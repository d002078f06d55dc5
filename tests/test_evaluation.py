"""Number parsing and the answer metrics (ChartQA's relaxed accuracy) on tables of cases."""

import pytest

from openvlm_jax import evaluation


@pytest.mark.parametrize('text,value', [
    ('1,234', 1234.0),
    ('12%', 12.0),
    ('-3.5e2', -350.0),
    ('  42 ', 42.0),
    ('0.5', 0.5),
    ('.5', 0.5),
    ('+7', 7.0),
    ('$4.20', 4.2),
    ('7 bar', 7.0),
    ('1,234,567.89', 1234567.89),
    ('\u22122', -2.0),
    ('15.', 15.0),
])
def test_parse_number_reads_numbers(text, value):
  assert evaluation.parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize('text', ['', 'seven', 'about 5', '1 2', '12,34', '1e', '-', 'v2', 'nan'])
def test_parse_number_rejects_non_numbers(text):
  assert evaluation.parse_number(text) is None


@pytest.mark.parametrize('prediction,target,exact,numeric,relaxed', [
    ('15', '15', True, True, True),
    ('1,000', '1000', False, True, True),
    ('104', '100', False, False, True),  # 4% off
    ('105', '100', False, False, True),  # 5% off: the boundary counts
    ('106', '100', False, False, False),
    ('-98', '-100', False, False, True),
    ('0.1', '0', False, False, False),  # a zero target needs an exact match
    ('0', '0', True, True, True),
    ('Yes', 'yes', False, True, True),
    ('Paris.', 'paris', False, True, True),
    ('Lyon', 'Paris', False, False, False),
    ('12%', '12', False, True, True),
    ('twelve', '12', False, False, False),
])
def test_metrics_on_a_table_of_cases(prediction, target, exact, numeric, relaxed):
  assert evaluation.exact_match(prediction, target) is exact
  assert evaluation.numeric_exact_match(prediction, target) is numeric
  assert evaluation.normalized_exact_match(prediction, target) is numeric
  assert evaluation.relaxed_match(prediction, target, question='') is relaxed


@pytest.mark.parametrize('answer,question,normalized', [
    ('15.', '', '15'),
    ('15.0', '', '15'),
    ('1,500', '', '1500'),
    ('1.5k', '', '1500'),
    ('2 bn', '', '2000000000'),
    ('12%', 'What share is it?', '12'),
    ('1,500 mm.', 'What is the rainfall for Mar, in mm?', '1500'),
    ('11.2 °C', 'What is the highest value shown, in °C?', '11.2'),
    ('7 bar', 'What is the pressure?', '7 bar'),  # a unit the question did not name stays
    ('Jul!', 'Which month has the highest value?', 'jul'),
    ('12013', 'What was the value in 2013?', '12013'),  # '2013' is no unit
    ('Jim', 'Who ran farthest, in m?', 'jim'),  # a unit goes only after a number
    ('4.1M', '', '4100000'),  # no float noise
    ('12 mm', 'What is it, in mm?\n<image>', '12'),
])
def test_normalize_answer(answer, question, normalized):
  assert evaluation.normalize_answer(answer, question) == normalized


def test_score_answers_reports_raw_and_normalised_scores():
  scores = evaluation.score_answers(['15', '104', 'x', '1,000.'], ['15', '100', 'y', '1000'])
  assert scores == pytest.approx({
      'exact_match': 0.25, 'normalized_exact_match': 0.5, 'relaxed_accuracy': 0.75,
      'raw_relaxed_accuracy': 0.5, 'mean_relative_error': (0 + 0.04 + 0) / 3,
      'num_examples': 4.0})
  # A trailing dot and a named unit cost the raw scores only.
  scores = evaluation.score_answers(['11.2 mm.', '3.'], ['11.2', '3'],
                                    ['What is it, in mm?', 'How many?'])
  assert scores['exact_match'] == 0 and scores['raw_relaxed_accuracy'] == 0.5
  assert scores['normalized_exact_match'] == scores['relaxed_accuracy'] == 1.0
  assert scores['mean_relative_error'] == 0.0
  # A label that is a number (the year naming a bar) gets no tolerance and no relative error.
  scores = evaluation.score_answers(['2003', '2003'], ['2004', '2004'], ['Which year?'] * 2,
                                    labels=[True, False])
  assert scores['relaxed_accuracy'] == 0.5 and scores['mean_relative_error'] == pytest.approx(
      1 / 2004)
  with pytest.raises(ValueError):
    evaluation.score_answers(['1'], [])
