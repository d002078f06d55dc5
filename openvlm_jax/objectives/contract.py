"""The `Objective` record: what the step and the loop know of a loss (see `objectives`)."""

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss as the train step, the eval step and the loop see it.

  terms: (batch, logits_fn) -> {name: float32 scalar}, sums over the batch's rows; they
      include the counts below.
  counts: batch -> {name: float32 scalar}, the normalizers, from the batch alone (no model
      call), so the step knows them for the whole global batch before any micro-batch runs.
  loss: ((summed term, weight, count), ...); the loss is sum(weight * term / count), each
      term and count summed over the global batch. It is linear in the terms, so gradients
      of micro-batches add up exactly.
  metrics: summed terms -> {name: value}; the first is the headline of the closing line.
  shown: metrics that join the loss on the console's training line.
  pairs: batches hold preference pairs, every field [batch, 2, ...] (chosen, rejected).
  reference: `terms` call `logits_fn(rows, reference=True)`, the starting model (LoRA
      adapters off), which needs a run that trains only the adapters.
  """

  name: str
  terms: Callable[[dict, Callable], dict]
  counts: Callable[[dict], dict]
  loss: tuple[tuple[str, float, str], ...]
  metrics: Callable[[dict], dict]
  shown: tuple[str, ...] = ()
  pairs: bool = False
  reference: bool = False

  def loss_of(self, sums: Mapping, counts: Mapping | None = None) -> jax.Array:
    """sum(weight * sums[term] / max(counts[count], 1)); `counts` defaults to `sums`."""
    counts = sums if counts is None else counts
    return sum(weight * sums[term] / jnp.maximum(counts[count], 1.0)
               for term, weight, count in self.loss)
