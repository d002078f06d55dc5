"""Objectives: (logits, batch) -> summed loss terms. `get(name)` picks one by config name."""

from typing import Callable

from openvlm_jax.objectives import sft

_OBJECTIVES = {'sft': sft.loss_terms}


def get(name: str) -> Callable:
  """The loss-terms function of the objective called `name`."""
  if name not in _OBJECTIVES:
    raise ValueError(f'config.objective.name={name!r} is unknown; known: {sorted(_OBJECTIVES)}')
  return _OBJECTIVES[name]
