"""The `Objective` record: what the step and the loop know of a loss (see `objectives`)."""

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss as the train step, the eval step and the loop see it.

  terms: (batch, logits_fn) -> {name: float32 scalar}, sums over the batch's rows.
  metrics: summed terms -> {name: value}; the first is the headline of the closing line.
  loss_term: the summed term that is minimised.
  normalizer: the summed term the loss is divided by, over the global batch.
  shown: metrics that join the loss on the console's training line.
  """

  name: str
  terms: Callable[[dict, Callable], dict]
  metrics: Callable[[dict], dict]
  loss_term: str = 'loss_sum'
  normalizer: str = 'num_tokens'
  shown: tuple[str, ...] = ()
