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
    ('Yes', 'yes', True, True, True),
    ('Paris.', 'paris', True, True, True),
    ('Lyon', 'Paris', False, False, False),
    ('12%', '12', False, True, True),
    ('twelve', '12', False, False, False),
])
def test_metrics_on_a_table_of_cases(prediction, target, exact, numeric, relaxed):
  assert evaluation.exact_match(prediction, target) is exact
  assert evaluation.numeric_exact_match(prediction, target) is numeric
  assert evaluation.relaxed_match(prediction, target) is relaxed


def test_score_answers_averages():
  scores = evaluation.score_answers(['15', '104', 'x', '1,000'], ['15', '100', 'y', '1000'])
  assert scores == {'exact_match': 0.25, 'numeric_exact_match': 0.5, 'relaxed_accuracy': 0.75,
                    'num_examples': 4.0}
  with pytest.raises(ValueError):
    evaluation.score_answers(['1'], [])
