"""Supervised fine-tuning: cross-entropy over the assistant's tokens."""

from typing import Any

import jax
import jax.numpy as jnp

from openvlm_jax.objectives.contract import Objective


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in float32.

  logits: [batch, seq, vocab]; targets: [batch, seq] int. Returns [batch, seq].
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def example_mask_of(batch: dict) -> jax.Array:
  """float32 [batch]: 1 for real rows, 0 for the padding rows of a last eval batch."""
  example_mask = batch.get('example_mask')
  if example_mask is None:
    return jnp.ones(batch['targets'].shape[:1], jnp.float32)
  return example_mask.astype(jnp.float32)


def target_mask_of(batch: dict) -> jax.Array:
  """float32 [batch, seq]: the loss mask of real rows."""
  return batch['loss_mask'].astype(jnp.float32) * example_mask_of(batch)[:, None]


def counts(batch: dict) -> dict:
  """`num_tokens` (target tokens) and `num_examples` (real rows), from the batch alone."""
  return dict(num_tokens=jnp.sum(target_mask_of(batch)),
              num_examples=jnp.sum(example_mask_of(batch)))


def loss_terms(logits: jax.Array, batch: dict) -> dict:
  """Sums over the batch's target tokens: `nll_sum`, `correct_tokens`, `exact_match`, counts.

  Returns float32 scalars that add up over micro-batches and devices: `nll_sum` (what is
  minimised, per target token), `correct_tokens`, per example `exact_match` (every target
  token is the argmax: what greedy decoding of the answer would produce), and `counts`.
  Rows with `batch['example_mask']` 0 count nowhere.
  """
  example_mask = example_mask_of(batch)  # [batch]
  loss_mask = target_mask_of(batch)  # [batch, seq]
  nll = token_cross_entropy(logits, batch['targets'])  # [batch, seq]
  correct = (jnp.argmax(logits, axis=-1) == batch['targets']).astype(jnp.float32) * loss_mask
  answer_tokens = jnp.sum(loss_mask, axis=1)  # [batch]
  all_correct = (jnp.sum(correct, axis=1) == answer_tokens) & (answer_tokens > 0)
  return dict(
      counts(batch),
      nll_sum=jnp.sum(nll * loss_mask),
      correct_tokens=jnp.sum(correct),
      exact_match=jnp.sum(all_correct * example_mask),
  )


def metrics(sums: dict) -> dict:
  """Exact match (the headline), token accuracy, loss, perplexity and the example count."""
  num_tokens = jnp.maximum(sums['num_tokens'], 1.0)
  return dict(
      exact_match=sums['exact_match'] / jnp.maximum(sums['num_examples'], 1.0),
      token_accuracy=sums['correct_tokens'] / num_tokens,
      loss=sums['nll_sum'] / num_tokens,
      perplexity=jnp.exp(sums['nll_sum'] / num_tokens),
      num_examples=sums['num_examples'],
  )


def make(section: Any, tokenizer: Any = None) -> Objective:
  """The `sft` objective: cross-entropy over assistant tokens, per target token."""
  del section, tokenizer
  return Objective(name='sft', terms=lambda batch, logits_fn: loss_terms(logits_fn(batch), batch),
                   counts=counts, loss=(('nll_sum', 1.0, 'num_tokens'),), metrics=metrics)
