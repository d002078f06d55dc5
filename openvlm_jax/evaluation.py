"""Metrics over generated answers: exact match, numeric exact match, relaxed accuracy.

Relaxed accuracy is the ChartQA convention: a numeric answer counts when it is within 5% of
the numeric target (|p - t| / |t| <= 0.05); when the target is not a number, or is 0, the
answer must match it exactly (after normalising case and surrounding whitespace).
"""

import math
import re
from collections.abc import Sequence

RELAXED_TOLERANCE = 0.05

# An optional sign, digits with optional thousands commas, an optional fraction, an optional
# exponent; surrounding currency signs, units and percent signs are ignored.
_NUMBER = re.compile(
    r'[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?')
_LEADING = ' \t\n$€£'
_TRAILING = ' \t\n.%*'


def normalize_text(text: str) -> str:
  """Lower case, collapsed whitespace, no trailing full stop: the exact-match view of a text."""
  return ' '.join(str(text).lower().split()).rstrip('.').strip()


def parse_number(text: str) -> float | None:
  """The number a short answer states, or None.

  Accepts "1,234", "12%" (-> 12.0), "-3.5e2", "$4.20", "7 bar" (a number followed by a unit
  word). Text with more than one number or words in front ("about 5") is not a number.
  """
  text = str(text).lstrip(_LEADING).rstrip(_TRAILING).replace('\u2212', '-')
  if not text:
    return None
  head, _, unit = text.partition(' ')
  if unit and not re.fullmatch(r'[^\d\s]+', unit.strip()):
    return None
  match = _NUMBER.fullmatch(head.rstrip(_TRAILING))
  if match is None or not re.search(r'\d', head):
    return None
  try:
    value = float(match.group(0).replace(',', ''))
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def exact_match(prediction: str, target: str) -> bool:
  """Equal after `normalize_text`."""
  return normalize_text(prediction) == normalize_text(target)


def numeric_exact_match(prediction: str, target: str) -> bool:
  """Both parse as numbers and are equal (so "1,000" matches "1000.0"); else exact match."""
  predicted, true = parse_number(prediction), parse_number(target)
  if predicted is None or true is None:
    return exact_match(prediction, target)
  return predicted == true


def relaxed_match(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
  """ChartQA's relaxed accuracy for one answer (see the module docstring)."""
  predicted, true = parse_number(prediction), parse_number(target)
  if predicted is None or true is None or true == 0:
    return exact_match(prediction, target)
  return abs(predicted - true) / abs(true) <= tolerance


def score_answers(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
  """Mean `exact_match`, `numeric_exact_match` and `relaxed_accuracy` over paired answers."""
  if len(predictions) != len(targets):
    raise ValueError(f'{len(predictions)} predictions for {len(targets)} targets')
  count = max(len(targets), 1)
  pairs = list(zip(predictions, targets))
  return {
      'exact_match': sum(exact_match(p, t) for p, t in pairs) / count,
      'numeric_exact_match': sum(numeric_exact_match(p, t) for p, t in pairs) / count,
      'relaxed_accuracy': sum(relaxed_match(p, t) for p, t in pairs) / count,
      'num_examples': float(len(targets)),
  }
