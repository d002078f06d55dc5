"""Metrics over generated answers: exact match, relaxed accuracy, mean relative error.

Relaxed accuracy is the ChartQA convention: a numeric answer counts when it is within 5% of
the numeric target (|p - t| / |t| <= 0.05); when the target is not a number, or is 0, the
answer must match it exactly (after normalising case and surrounding whitespace).

Scores come raw and normalised. Raw exact match compares the texts with only surrounding
whitespace stripped, and raw relaxed accuracy reads only plain decimals as numbers (else the
texts must be equal). Normalised scores first pass both answers through `normalize_answer`:
trailing punctuation, thousands separators, '%' and a unit the question named ("..., in mm?")
are stripped, "1.5k" reads as 1500, and numbers are compared by value ("15.0" is "15").
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


_MAGNITUDES = {'k': 1e3, 'K': 1e3, 'M': 1e6, 'B': 1e9, 'bn': 1e9}
_SCALED = re.compile(r'([-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?)\s?(k|K|M|B|bn)')
_QUESTION_UNIT = re.compile(r'\bin ([^\s?,.;:\d]+(?: [^\s?,.;:\d]+)?)\s*\??\s*$')
_TRAILING_PUNCTUATION = ' \t\n.,;:!?'


def question_unit(question: str) -> str | None:
  """The unit a question asks its answer in ("What is the rainfall in March, in mm?" -> "mm").

  A unit has no digits ("... in 2013?" names none); image placeholders are ignored.
  """
  text = str(question).replace('<image>', ' ').strip()
  match = _QUESTION_UNIT.search(text)
  return match.group(1) if match else None


def normalize_answer(text: str, question: str = '') -> str:
  """The normalised view of an answer (see the module docstring): '1,500 mm.' -> '1500'."""
  text = str(text).strip().rstrip(_TRAILING_PUNCTUATION)
  unit = question_unit(question)
  if unit:  # only after a number: '12 mm' -> '12', but 'Jim' keeps its 'm'
    text = re.sub(r'(?<=[\d\s%])' + re.escape(unit) + r'$', '', text, flags=re.IGNORECASE)
    text = text.rstrip()
  scaled = _SCALED.fullmatch(text)
  if scaled and re.search(r'\d', scaled.group(1)):
    number = float(scaled.group(1).replace(',', '').replace('\u2212', '-'))
    return _canonical(number * _MAGNITUDES[scaled.group(2)])
  number = parse_number(text)
  if number is not None and not re.search(r'[^\d\s,.%$€£+\-\u2212eE]', text):
    return _canonical(number)
  return normalize_text(text)


def _canonical(number: float) -> str:
  """'1500' for integral values, else the shortest repr ('2.5'); 9 decimals at most, so
  float noise ('4.1M' -> 4099999.9999999995) does not count."""
  number = round(number, 9)
  return str(int(number)) if number == int(number) and abs(number) < 1e15 else repr(number)


def exact_match(prediction: str, target: str) -> bool:
  """Raw exact match: equal with only surrounding whitespace stripped."""
  return str(prediction).strip() == str(target).strip()


def normalized_exact_match(prediction: str, target: str, question: str = '') -> bool:
  """Equal after `normalize_answer` (so '1,000.' matches '1000')."""
  return normalize_answer(prediction, question) == normalize_answer(target, question)


def numeric_exact_match(prediction: str, target: str) -> bool:
  """Both parse as numbers and are equal (so "1,000" matches "1000.0"); else exact match."""
  predicted, true = parse_number(prediction), parse_number(target)
  if predicted is None or true is None:
    return normalize_text(prediction) == normalize_text(target)
  return predicted == true


def relaxed_match(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE,
                  question: str | None = None, label: bool = False) -> bool:
  """ChartQA's relaxed accuracy for one answer (see the module docstring).

  With `question` (also '') both answers are normalised first (`normalize_answer`);
  without, the texts are read as they are (the raw score): a number is a plain decimal
  ('1500', '-2.5'), and anything else must match exactly. A `label` answer (a name, even one
  that is a number such as the year of a bar) gets no tolerance.
  """
  if label:
    return (normalized_exact_match(prediction, target, question) if question is not None
            else exact_match(prediction, target))
  if question is None:
    predicted, true = _plain_number(prediction), _plain_number(target)
    equal = exact_match(prediction, target)
  else:
    prediction, target = normalize_answer(prediction, question), normalize_answer(target, question)
    predicted, true = parse_number(prediction), parse_number(target)
    equal = normalize_text(prediction) == normalize_text(target)
  if predicted is None or true is None or true == 0:
    return equal
  return abs(predicted - true) / abs(true) <= tolerance


def _plain_number(text: str) -> float | None:
  """The value of a plain decimal ('15', '-2.5', '1e3'), else None."""
  text = str(text).strip()
  return float(text) if re.fullmatch(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?', text) else None


def relative_error(prediction: str, target: str, question: str = '',
                   label: bool = False) -> float | None:
  """|p - t| / |t| of the normalised answers, capped at 1 (1 when p is not a number); None
  when the target is not a nonzero number or is a `label` (a year naming a bar)."""
  if label:
    return None
  true = parse_number(normalize_answer(target, question))
  if true is None or true == 0:
    return None
  predicted = parse_number(normalize_answer(prediction, question))
  if predicted is None:
    return 1.0
  return min(abs(predicted - true) / abs(true), 1.0)


def score_answers(predictions: Sequence[str], targets: Sequence[str],
                  questions: Sequence[str] | None = None,
                  labels: Sequence[bool] | None = None) -> dict[str, float]:
  """Raw and normalised scores over paired answers (their questions name units).

  `labels[i]` marks an answer that is a name, scored by exact match only. Returns
  `exact_match` (raw), `normalized_exact_match`, `relaxed_accuracy` (normalised, the ChartQA
  number), `raw_relaxed_accuracy`, `mean_relative_error` (over numeric targets, when there
  are any) and `num_examples`.
  """
  if len(predictions) != len(targets):
    raise ValueError(f'{len(predictions)} predictions for {len(targets)} targets')
  questions = [''] * len(targets) if questions is None else list(questions)
  labels = [False] * len(targets) if labels is None else list(labels)
  count = max(len(targets), 1)
  rows = list(zip(predictions, targets, questions, labels))
  scores = {
      'exact_match': sum(exact_match(p, t) for p, t, _, _ in rows) / count,
      'normalized_exact_match': sum(normalized_exact_match(p, t, q) for p, t, q, _ in rows)
                                / count,
      'relaxed_accuracy': sum(relaxed_match(p, t, question=q, label=b) for p, t, q, b in rows)
                          / count,
      'raw_relaxed_accuracy': sum(relaxed_match(p, t, label=b) for p, t, _, b in rows) / count,
  }
  errors = [e for e in (relative_error(*row) for row in rows) if e is not None]
  if errors:
    scores['mean_relative_error'] = sum(errors) / len(errors)
  scores['num_examples'] = float(len(targets))
  return scores
