"""Objectives: (logits, batch) -> summed loss terms. `get(config.objective, tokenizer)` picks one."""

import functools
from collections.abc import Callable
from typing import Any

from openvlm_jax.console import UserError
from openvlm_jax.objectives import quantitative, sft

_OBJECTIVES = ('sft', 'quantitative')


def get(objective: Any, tokenizer: Any = None) -> Callable:
  """The loss-terms function of an objective: a name, or a `config.objective` section.

  'quantitative' reads `ntl_weight` (default 0.3) and `ntl_kind` ('was' | 'mse') from the
  section and needs the tokenizer to find the number tokens.
  """
  name = objective if isinstance(objective, str) else objective.name
  if name not in _OBJECTIVES:
    raise UserError(f'config.objective.name={name!r} is unknown; known: {sorted(_OBJECTIVES)}')
  if name == 'sft':
    return sft.loss_terms
  if tokenizer is None:
    raise UserError("objective 'quantitative' needs the tokenizer (for its number tokens)")
  options = {} if isinstance(objective, str) else objective
  return functools.partial(
      quantitative.loss_terms, number_tokens=quantitative.number_tokens_of(tokenizer),
      ntl_weight=float(options.get('ntl_weight', 0.3)), ntl_kind=options.get('ntl_kind', 'was'))
