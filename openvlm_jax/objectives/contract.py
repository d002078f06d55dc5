"""The `Objective` record: what the step and the loop know of a loss (see `objectives`)."""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

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
  reference: `terms` call `logits_fn(rows, reference=True)`, the starting model: the LoRA
      adapters switched off when only they train, else a frozen copy the loop keeps.
  rollouts: the loop samples each step's batch from the policy (`Rollouts`, GRPO) instead of
      training on the data's answers; the data then gives prompts and reference answers.
  """

  name: str
  terms: Callable[[dict, Callable], dict]
  counts: Callable[[dict], dict]
  loss: tuple[tuple[str, float, str], ...]
  metrics: Callable[[dict], dict]
  shown: tuple[str, ...] = ()
  pairs: bool = False
  reference: bool = False
  rollouts: 'Rollouts | None' = None

  def loss_of(self, sums: Mapping, counts: Mapping | None = None) -> jax.Array:
    """sum(weight * sums[term] / max(counts[count], 1)); `counts` defaults to `sums`."""
    counts = sums if counts is None else counts
    return sum(weight * sums[term] / jnp.maximum(counts[count], 1.0)
               for term, weight, count in self.loss)


@dataclasses.dataclass(frozen=True)
class Rollouts:
  """How the loop turns a batch of prompts into an on-policy batch (GRPO).

  Each prompt gets `group_size` answers sampled from the current params (temperature,
  top_k, top_p; up to `max_new_tokens`); `rewards` scores them and `advantages` compares
  each answer with its group. The step then makes `num_updates` optimizer updates on them.
  """

  group_size: int
  num_updates: int
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  # (answers, references, questions) -> (reward [n] float32, {reward name: values [n]})
  rewards: Callable[[Sequence[str], Sequence[str], Sequence[str]], tuple]
  # rewards [n] (groups of `group_size` in a row) -> advantages [n] float32
  advantages: Callable
  # (logits [rows, seq, vocab], targets [rows, seq]) -> log-probs [rows, seq] of the targets
  # under the sampling distribution (logits / temperature), as the loss reads them
  logps: Callable
