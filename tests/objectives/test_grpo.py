"""GRPO's pieces against numpy: group advantages, the clipped ratio objective with the k3 KL,
the three loss normalisations, the policy gradient at the first update, and the options."""

import statistics

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from openvlm_jax import objectives
from openvlm_jax.console import UserError
from openvlm_jax.objectives import grpo


def test_group_advantages_are_rewards_standardised_within_each_group():
  rewards = np.array([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2, 0.0, 3.0, 1.0, 2.0])
  got = grpo.group_advantages(rewards, group_size=4)
  for group in range(3):
    values = list(rewards[4 * group:4 * group + 4])
    mean, std = statistics.fmean(values), statistics.stdev(values)  # sample std, as TRL's
    expected = [(value - mean) / (std + 1e-4) for value in values]
    np.testing.assert_allclose(got[4 * group:4 * group + 4], expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got[4:8], 0.0)  # a flat group gives no signal
  unscaled = grpo.group_advantages(rewards, group_size=4, scale='none')  # Dr. GRPO
  np.testing.assert_allclose(unscaled[8:], [-1.5, 1.5, -0.5, 0.5], rtol=1e-6)
  assert got.dtype == np.float32


def _numpy_token_terms(logps, old, ref, advantages, mask, epsilon, beta):
  """The token loss, k3 and the clipped flags, written out element by element."""
  loss, kl, clipped = (np.zeros_like(logps) for _ in range(3))
  for row, column in np.ndindex(*logps.shape):
    ratio = np.exp(logps[row, column] - old[row, column])
    advantage = advantages[row]
    unclipped_term = ratio * advantage
    clipped_term = min(max(ratio, 1 - epsilon), 1 + epsilon) * advantage
    delta = ref[row, column] - logps[row, column]
    kl[row, column] = np.exp(delta) - delta - 1
    loss[row, column] = -min(unclipped_term, clipped_term) + beta * kl[row, column]
    clipped[row, column] = ((ratio > 1 + epsilon and advantage > 0)
                            or (ratio < 1 - epsilon and advantage < 0))
  return loss * mask, kl * mask, clipped * mask


@pytest.fixture
def token_data():
  rng = np.random.default_rng(0)
  rows, seq = 6, 7
  logps = -rng.random((rows, seq)) * 3
  old = logps + rng.normal(size=(rows, seq)) * 0.4  # ratios from ~0.3 to ~3: both clips
  ref = np.minimum(logps + rng.normal(size=(rows, seq)) * 0.5, -1e-3)  # log-probs: < 0
  advantages = rng.normal(size=rows)
  mask = (rng.random((rows, seq)) < 0.7).astype(np.float64)
  mask[:, 0] = 1  # every answer has a token
  return logps, old, ref, advantages, mask


def test_policy_terms_match_the_clipped_objective_and_k3_in_numpy(token_data):
  logps, old, ref, advantages, mask = token_data
  loss, kl, clipped = _numpy_token_terms(*token_data, epsilon=0.2, beta=0.04)
  assert 0 < clipped.sum() < mask.sum()
  sums = grpo.policy_terms(*(jnp.asarray(x, jnp.float32) for x in token_data),
                           epsilon=0.2, beta=0.04)
  np.testing.assert_allclose(sums['token_loss_sum'], loss.sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['sequence_loss_sum'],
                             (loss.sum(1) / mask.sum(1)).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['kl_sum'], kl.sum(), rtol=1e-5)
  assert (kl >= 0).all()
  assert float(sums['clipped_tokens']) == clipped.sum()
  assert float(sums['answer_tokens']) == mask.sum()


@pytest.mark.parametrize('loss_type', grpo.LOSS_TYPES)
def test_each_loss_type_normalises_the_token_losses_as_named(token_data, loss_type):
  logps, _, ref, advantages, mask = token_data
  rows, seq = logps.shape
  vocab = 5
  # Logits whose log-softmax at the targets is `logps` (the other tokens share the rest).
  targets = np.zeros((rows, seq), np.int32)
  probability = np.exp(logps)
  rest = np.log((1 - probability) / (vocab - 1))
  logits = np.repeat(rest[..., None], vocab, axis=-1)
  logits[..., 0] = logps
  ref_logits = logits.copy()
  ref_logits[..., 0] = ref
  ref_logits[..., 1:] = np.log((1 - np.exp(ref)) / (vocab - 1))[..., None]
  batch = {'targets': jnp.asarray(targets), 'loss_mask': jnp.asarray(mask, jnp.float32),
           'advantages': jnp.asarray(advantages, jnp.float32)}
  logits_fn = lambda rows, reference=False: jnp.asarray(ref_logits if reference else logits,
                                                        jnp.float32)
  objective = objectives.get(ml_collections.ConfigDict(
      {'name': 'grpo', 'loss_type': loss_type, 'beta': 0.1, 'max_new_tokens': seq}))
  sums = objective.terms(batch, logits_fn)
  # First update: old = logps, so every ratio is 1 and the token loss is -A + beta * k3.
  loss, _, clipped = _numpy_token_terms(logps, logps, ref, advantages, mask, 0.2, 0.1)
  assert clipped.sum() == 0
  expected = {'dapo': loss.sum() / mask.sum(),
              'grpo': (loss.sum(1) / mask.sum(1)).mean(),
              'dr_grpo': loss.sum() / (rows * seq)}[loss_type]
  np.testing.assert_allclose(objective.loss_of(sums, objective.counts(batch)), expected,
                             rtol=1e-4)
  np.testing.assert_allclose(objective.metrics(sums)['mean_ratio'], 1.0, rtol=1e-6)


def test_at_the_first_update_the_gradient_is_the_advantage_weighted_policy_gradient(token_data):
  logps, _, _, advantages, mask = token_data

  def loss(logps):
    sums = grpo.policy_terms(logps, jax.lax.stop_gradient(logps), None,
                             jnp.asarray(advantages, jnp.float32),
                             jnp.asarray(mask, jnp.float32), epsilon=0.2, beta=0.0)
    return sums['token_loss_sum']

  grad = jax.grad(loss)(jnp.asarray(logps, jnp.float32))
  np.testing.assert_allclose(grad, -advantages[:, None] * mask, rtol=1e-5, atol=1e-7)


def test_options_are_checked():
  make = lambda **options: objectives.get(ml_collections.ConfigDict({'name': 'grpo', **options}))
  with pytest.raises(UserError, match='group_size=1: must be >= 2'):
    make(group_size=1)
  with pytest.raises(UserError, match=r'epsilon=1.5: must be in \(0, 1\)'):
    make(epsilon=1.5)
  with pytest.raises(UserError, match="loss_type='bnpo'"):
    make(loss_type='bnpo')
  with pytest.raises(UserError, match='temperature=0.0: must be > 0'):
    make(temperature=0.0)
  with pytest.raises(UserError, match="unknown reward 'closeness'"):
    make(rewards=(('closeness', 1.0),))
  with pytest.raises(UserError, match=r'rewards\[0\]=.*give \(name, weight\)'):
    make(rewards=('numeric',))
  assert make(beta=0.0).reference is False and make().reference is True
  assert objectives.updates_per_step(ml_collections.ConfigDict(
      {'name': 'grpo', 'num_updates': 3})) == 3
  assert objectives.updates_per_step(ml_collections.ConfigDict({'name': 'sft'})) == 1
