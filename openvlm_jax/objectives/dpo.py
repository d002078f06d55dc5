"""Direct preference optimisation (DPO; Rafailov et al., 2023) on image preference pairs.

A batch holds pairs: every field is [batch, 2, ...], row 0 the chosen answer and row 1 the
rejected one (`examples.make_pair_example`). With log-probabilities of each answer under the
policy (pi) and the reference (ref, the starting model: `logits_fn(rows, reference=True)`),

  margin = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
  loss   = -(1 - eps) * log sigmoid(margin) - eps * log sigmoid(-margin)   (eps: label smoothing)

averaged over the pairs of the global batch. The implicit rewards are beta * (log pi - log ref).
With `sft_weight` alpha > 0 the loss adds alpha * the cross-entropy of the chosen answers per
chosen token (RPO, Pang et al., 2024; TRL's `rpo_alpha`), which keeps DPO from lowering the
chosen answer's own probability while it widens the margin.
"""

from typing import Any

import jax
import jax.numpy as jnp

from openvlm_jax.console import UserError
from openvlm_jax.objectives import sft
from openvlm_jax.objectives.contract import Objective


def flatten_pairs(batch: dict) -> dict:
  """[batch, 2, ...] fields -> [2 * batch, ...] rows (chosen, rejected, chosen, ...)."""
  return {name: value.reshape((-1,) + value.shape[2:]) for name, value in batch.items()
          if name != 'example_mask'}


def answer_logps(logits: jax.Array, rows: dict) -> jax.Array:
  """Sum of the answer tokens' log-probabilities per row: [rows] float32."""
  return _answer_logps_of(sft.token_cross_entropy(logits, rows['targets']), rows)


def _answer_logps_of(nll: jax.Array, rows: dict) -> jax.Array:
  """[rows] answer log-probabilities from per-token NLL [rows, seq]."""
  return -jnp.sum(nll * rows['loss_mask'].astype(jnp.float32), axis=-1)


def pair_terms(policy: jax.Array, reference: jax.Array, example_mask: jax.Array, *,
               beta: float, label_smoothing: float) -> dict:
  """DPO sums over real pairs from answer log-probs [pairs, 2] (chosen, rejected).

  Returns float32 scalars: `dpo_sum` (the loss), `num_pairs`, `reward_correct` (margin > 0),
  `logp_correct` (the policy itself ranks chosen above rejected), `margin_sum`,
  `chosen_reward_sum`, `rejected_reward_sum`, `chosen_logp_sum`, `rejected_logp_sum`.
  """
  rewards = beta * (policy - reference)  # [pairs, 2]
  margin = rewards[:, 0] - rewards[:, 1]  # [pairs]
  losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin)
            - label_smoothing * jax.nn.log_sigmoid(-margin))
  mask = example_mask.astype(jnp.float32)
  total = lambda values: jnp.sum(values * mask)
  return dict(
      dpo_sum=total(losses), num_pairs=jnp.sum(mask),
      reward_correct=total((margin > 0).astype(jnp.float32)),
      logp_correct=total((policy[:, 0] > policy[:, 1]).astype(jnp.float32)),
      margin_sum=total(margin), chosen_reward_sum=total(rewards[:, 0]),
      rejected_reward_sum=total(rewards[:, 1]), chosen_logp_sum=total(policy[:, 0]),
      rejected_logp_sum=total(policy[:, 1]))


def chosen_mask(batch: dict) -> jax.Array:
  """float32 [pairs, seq]: the chosen answers' target tokens of real pairs."""
  return batch['loss_mask'][:, 0].astype(jnp.float32) * sft.example_mask_of(batch)[:, None]


def counts(batch: dict) -> dict:
  """`num_pairs` (the real pairs) and `chosen_tokens` (their chosen answers' tokens)."""
  return dict(num_pairs=jnp.sum(sft.example_mask_of(batch)),
              chosen_tokens=jnp.sum(chosen_mask(batch)))


def metrics(sums: dict) -> dict:
  """Chosen-over-rejected accuracy by the policy's log-probs (the headline), by the rewards
  (TRL's `rewards/accuracies`), the reward margin, rewards, log-probs and the loss."""
  pairs = jnp.maximum(sums['num_pairs'], 1.0)
  chosen_ce = {}
  if 'chosen_nll_sum' in sums:  # summed by `terms` (not by `pair_terms` alone)
    chosen_ce['chosen_ce'] = sums['chosen_nll_sum'] / jnp.maximum(sums['chosen_tokens'], 1.0)
  return dict(
      preference_accuracy=sums['logp_correct'] / pairs,
      reward_accuracy=sums['reward_correct'] / pairs,
      reward_margin=sums['margin_sum'] / pairs,
      chosen_reward=sums['chosen_reward_sum'] / pairs,
      rejected_reward=sums['rejected_reward_sum'] / pairs,
      chosen_logp=sums['chosen_logp_sum'] / pairs,
      rejected_logp=sums['rejected_logp_sum'] / pairs,
      dpo_loss=sums['dpo_sum'] / pairs,
      **chosen_ce,
      num_examples=sums['num_pairs'],
  )


def make(section: Any, tokenizer: Any = None) -> Objective:
  """The `dpo` objective from `config.objective`: options `beta` (0.1), `label_smoothing` (0)
  and `sft_weight` (0: plain DPO).

  Raises:
    UserError: for beta <= 0, label smoothing outside [0, 0.5) or a negative sft_weight.
  """
  del tokenizer
  beta = float(section.get('beta', 0.1))
  label_smoothing = float(section.get('label_smoothing', 0.0))
  sft_weight = float(section.get('sft_weight', 0.0))
  if sft_weight < 0:
    raise UserError(f'config.objective.sft_weight={sft_weight}: must be >= 0')
  if beta <= 0:
    raise UserError(f'config.objective.beta={beta}: must be > 0')
  if not 0.0 <= label_smoothing < 0.5:
    raise UserError(f'config.objective.label_smoothing={label_smoothing}: must be in [0, 0.5)')

  def terms(batch: dict, logits_fn) -> dict:
    rows = flatten_pairs(batch)
    pairs = batch['input_ids'].shape[0]
    nll = sft.token_cross_entropy(logits_fn(rows), rows['targets'])  # [2 * pairs, seq]
    policy = _answer_logps_of(nll, rows).reshape(pairs, 2)
    reference = answer_logps(logits_fn(rows, reference=True), rows).reshape(pairs, 2)
    chosen_nll = nll.reshape(batch['targets'].shape)[:, 0]  # [pairs, seq]
    return dict(pair_terms(policy, jax.lax.stop_gradient(reference), sft.example_mask_of(batch),
                           beta=beta, label_smoothing=label_smoothing),
                chosen_nll_sum=jnp.sum(chosen_nll * chosen_mask(batch)),
                chosen_tokens=jnp.sum(chosen_mask(batch)))

  loss = (('dpo_sum', 1.0, 'num_pairs'),)
  if sft_weight > 0:
    loss += (('chosen_nll_sum', sft_weight, 'chosen_tokens'),)
  return Objective(name='dpo', terms=terms, counts=counts, loss=loss, metrics=metrics,
                   shown=('preference_accuracy', 'reward_margin'), pairs=True, reference=True)
