"""Verifiable rewards of generated answers (GRPO, `objectives.grpo`).

A reward function maps (answer, reference, question) strings to a float, higher is better.
Answers and references are compared through `evaluation.normalize_answer` (trailing
punctuation, thousands separators, a unit the question names), as the eval scores them:

  relaxed  1 within ChartQA's 5% of a numeric reference (else the texts must be equal), else 0
  numeric  1 - relative error, capped to [0, 1]: graded closeness, 0 for an answer that is
           no number; a reference that is no nonzero number asks for equal texts (1 or 0)
  exact    1 when the normalised answers are equal, else 0
  format   1 when the answer is a bare number (the question's unit allowed), else 0

`config.objective.rewards` is a tuple of (name, weight); the reward of an answer is the
weighted sum. A name 'package.module:function' imports a function with the same signature.
"""

import importlib
import re
from collections.abc import Callable, Sequence

import numpy as np

from openvlm_jax import evaluation
from openvlm_jax.console import UserError

RewardFn = Callable[[str, str, str], float]
# A number as `normalize_answer` writes it: '1500', '-2.5', '1e-05'.
_CANONICAL_NUMBER = re.compile(r'-?\d+(\.\d+)?(e[-+]\d+)?')


def relaxed_reward(answer: str, reference: str, question: str = '') -> float:
  """1.0 if the answer passes ChartQA's relaxed match (normalised), else 0.0."""
  return float(evaluation.relaxed_match(answer, reference, question=question))


def numeric_reward(answer: str, reference: str, question: str = '') -> float:
  """1 - |p - t| / |t| (at least 0) for a numeric reference; equal texts otherwise."""
  error = evaluation.relative_error(answer, reference, question)
  if error is None:
    return exact_reward(answer, reference, question)
  return 1.0 - error


def exact_reward(answer: str, reference: str, question: str = '') -> float:
  """1.0 if the normalised answers are equal, else 0.0."""
  return float(evaluation.normalized_exact_match(answer, reference, question))


def format_reward(answer: str, reference: str = '', question: str = '') -> float:
  """1.0 if the answer is one bare number (after normalisation), else 0.0."""
  del reference
  normalized = evaluation.normalize_answer(answer, question)  # numbers come out canonical
  return float(_CANONICAL_NUMBER.fullmatch(normalized) is not None)


BUILT_IN: dict[str, RewardFn] = {
    'relaxed': relaxed_reward,
    'numeric': numeric_reward,
    'exact': exact_reward,
    'format': format_reward,
}


def reward_function(name: str) -> RewardFn:
  """A built-in reward by name, or the function a 'package.module:function' name imports.

  Raises:
    UserError: naming `config.objective.rewards` for an unknown name or a failed import.
  """
  if name in BUILT_IN:
    return BUILT_IN[name]
  module_name, _, attribute = name.partition(':')
  if not attribute:
    raise UserError(f'config.objective.rewards: unknown reward {name!r}; built in: '
                    f"{sorted(BUILT_IN)}, or 'package.module:function'")
  try:
    function = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError) as error:
    raise UserError(f'config.objective.rewards: cannot import {name!r}: {error}') from error
  if not callable(function):
    raise UserError(f'config.objective.rewards: {name!r} is not a function')
  return function


def parse_rewards(pairs: Sequence) -> tuple[tuple[str, float], ...]:
  """((name, weight), ...) from the config, checked; refused in one line when malformed."""
  parsed = []
  for index, pair in enumerate(pairs):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise UserError(f'config.objective.rewards[{index}]={pair!r}: give (name, weight)')
    name, weight = str(pair[0]), float(pair[1])
    reward_function(name)  # refuses an unknown name now, not at the first rollout
    parsed.append((name, weight))
  if not parsed:
    raise UserError("config.objective.rewards is empty; e.g. (('numeric', 1.0),)")
  return tuple(parsed)


def score_rewards(rewards: Sequence[tuple[str, float]], answers: Sequence[str],
                  references: Sequence[str],
                  questions: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The weighted reward of each answer, float32 [n], and each named reward's values."""
  values = {}
  for name, _ in rewards:
    function = reward_function(name)
    values[name] = np.asarray([function(answer, reference, question) for answer, reference,
                               question in zip(answers, references, questions)], np.float32)
  total = sum(weight * values[name] for name, weight in rewards)
  return np.asarray(total, np.float32).reshape(len(answers)), values
