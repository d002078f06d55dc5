"""Supervised fine-tuning: cross-entropy over the assistant's tokens."""

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in float32.

  logits: [batch, seq, vocab]; targets: [batch, seq] int. Returns [batch, seq].
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def loss_terms(logits: jax.Array, batch: dict) -> dict:
  """Sums over the batch's target tokens; the train step divides by the global token count.

  Returns `loss_sum` (what is minimised), `nll_sum`, `num_tokens` and `correct_tokens`, each a
  float32 scalar, so micro-batches and devices can be added up before normalising.
  """
  loss_mask = batch['loss_mask'].astype(jnp.float32)  # [batch, seq]
  nll = token_cross_entropy(logits, batch['targets'])  # [batch, seq]
  correct = (jnp.argmax(logits, axis=-1) == batch['targets']).astype(jnp.float32)
  nll_sum = jnp.sum(nll * loss_mask)
  return dict(
      loss_sum=nll_sum,
      nll_sum=nll_sum,
      num_tokens=jnp.sum(loss_mask),
      correct_tokens=jnp.sum(correct * loss_mask),
  )
