"""The objective contract, and `get(config.objective, tokenizer)` to pick one by name.

An `Objective` is all the train step, the eval step, the loop's logging and the closing line
know of a loss:
  terms(batch, logits_fn) -> {name: float32 scalar}: SUMS over the batch's rows, so
      micro-batches and devices add up. `logits_fn(batch) -> [batch, seq, vocab]` runs the
      model; an objective that needs two sequences (DPO) or a reference forward calls it as
      often as it needs, `logits_fn(rows, reference=True)` for the starting model (no
      gradient). Rows whose `batch['example_mask']` is 0 (eval padding) add nothing.
  counts(batch) -> {name: float32 scalar}: the normalizers, computed from the batch alone
      (target tokens for SFT, number tokens for NTL, pairs for DPO, ...); `terms` include them.
  loss: ((term, weight, count), ...): loss = sum(weight * sum(term) / sum(count)), sums over the
      whole global batch (`Objective.loss_of`), e.g. quantitative's CE per target token plus
      lambda * NTL per number token.
  metrics(sums) -> {name: value}: what it reports, from summed terms (device arrays in the
      step, host floats in the eval); the first one is the headline of the closing line.
  shown: metrics that join the loss on the console's training line.
  pairs, reference: the batches hold preference pairs; `terms` call the reference (dpo).
  rollouts: the loop samples and rewards answers to the data's prompts for each step (grpo).
A new objective is one file here with a `make(section, tokenizer) -> Objective`, added to
`FACTORIES` (or `register`ed from outside, as the tests do).
"""

from collections.abc import Callable
from typing import Any

from openvlm_jax.console import UserError
from openvlm_jax.objectives import dpo, grpo, quantitative, sft
from openvlm_jax.objectives.contract import Objective, Rollouts

FACTORIES: dict[str, Callable[[Any, Any], Objective]] = {
    'sft': sft.make,
    'quantitative': quantitative.make,
    'dpo': dpo.make,
    'grpo': grpo.make,
}


def register(name: str, make: Callable[[Any, Any], Objective]) -> None:
  """Makes `config.objective.name=<name>` build its objective with `make(section, tokenizer)`."""
  FACTORIES[name] = make


def get(section: Any, tokenizer: Any = None) -> Objective:
  """The objective a `config.objective` section (or a bare name) asks for.

  Raises:
    UserError: for an unknown name, or options the objective cannot use.
  """
  name = section if isinstance(section, str) else section.name
  if name not in FACTORIES:
    raise UserError(f'config.objective.name={name!r} is unknown; known: {sorted(FACTORIES)}')
  return FACTORIES[name]({} if isinstance(section, str) else section, tokenizer)


def updates_per_step(section: Any) -> int:
  """Optimizer updates per train step a `config.objective` asks for: GRPO's `num_updates`
  (several updates on one rollout batch), else 1. The learning-rate schedule counts them."""
  if isinstance(section, str) or section.get('name') != 'grpo':
    return 1
  return max(int(section.get('num_updates', 1)), 1)


def for_evaluation(objective: Objective) -> Objective:
  """The objective an eval reports: the objective itself, or SFT's teacher-forced metrics
  of the reference answers for one trained on rollouts (its loss needs sampled answers)."""
  return sft.make({}) if objective.rollouts is not None else objective
