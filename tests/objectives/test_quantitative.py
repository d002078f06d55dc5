"""The number-token loss against a numpy reference, its limits, gradients and number tables."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from openvlm_jax import objectives
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.objectives import quantitative, sft

VOCAB = 16
# Token ids 4..13 are the digits 0..9; the rest are words.
DIGITS = quantitative.NumberTokens(ids=np.arange(4, 14, dtype=np.int32),
                                   values=np.arange(10, dtype=np.float32))


def _one_hot_logits(predicted_ids, scale=50.0):
  """Logits [1, n, VOCAB] that put (almost) all mass on predicted_ids[i] at position i."""
  return jnp.asarray(scale * np.eye(VOCAB, dtype=np.float32)[np.asarray(predicted_ids)][None])


@pytest.mark.parametrize('kind', ['was', 'mse'])
def test_ntl_is_zero_on_the_true_digit_and_grows_with_distance(kind):
  true_digit = 3
  targets = jnp.full((1, 10), 4 + true_digit, jnp.int32)
  logits = _one_hot_logits(4 + np.arange(10))  # position i predicts digit i
  ntl, is_number = quantitative.number_token_loss(logits, targets, DIGITS, kind)
  ntl = np.asarray(ntl[0])
  assert np.all(np.asarray(is_number) == 1)
  assert ntl[true_digit] < 1e-6
  distance = np.abs(np.arange(10) - true_digit)
  expected = distance if kind == 'was' else distance**2
  np.testing.assert_allclose(ntl, expected, atol=1e-4)
  order = np.argsort(distance, kind='stable')
  assert np.all(np.diff(ntl[order]) >= -1e-6)


def _reference_ntl(logits, targets, kind):
  """numpy: softmax over the digit logits, then WAS or MSE against the target digit."""
  logits, targets = np.asarray(logits, np.float64), np.asarray(targets)
  digit_logits = logits[..., DIGITS.ids]
  probs = np.exp(digit_logits - digit_logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  is_number = np.isin(targets, DIGITS.ids)
  true_value = np.where(is_number, targets - 4, 0).astype(np.float64)
  if kind == 'was':
    ntl = (probs * np.abs(DIGITS.values - true_value[..., None])).sum(-1)
  else:
    ntl = ((probs * DIGITS.values).sum(-1) - true_value) ** 2
  return np.where(is_number, ntl, 0.0)


@pytest.mark.parametrize('kind', ['was', 'mse'])
def test_loss_terms_match_a_numpy_reference(kind):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 6, VOCAB)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, VOCAB, size=(2, 6)).astype(np.int32))
  loss_mask = jnp.asarray((rng.random((2, 6)) < 0.7).astype(np.float32))
  batch = {'targets': targets, 'loss_mask': loss_mask}
  terms = quantitative.loss_terms(logits, batch, number_tokens=DIGITS, ntl_kind=kind)
  expected_ntl = (_reference_ntl(logits, targets, kind) * np.asarray(loss_mask)).sum()
  np.testing.assert_allclose(terms['ntl_sum'], expected_ntl, rtol=1e-5)
  sft_terms = sft.loss_terms(logits, batch)
  np.testing.assert_allclose(terms['nll_sum'], sft_terms['nll_sum'], rtol=1e-6)
  expected_count = (np.isin(np.asarray(targets), DIGITS.ids) * np.asarray(loss_mask)).sum()
  assert float(terms['number_tokens']) == expected_count
  objective = objectives.contract.Objective(
      name='q', terms=None, counts=None, metrics=quantitative.metrics,
      loss=(('nll_sum', 1.0, 'num_tokens'), ('ntl_sum', 0.3, 'number_tokens')))
  # CE per target token + lambda * NTL per target number token, as the paper defines it.
  expected_loss = (sft_terms['nll_sum'] / float(loss_mask.sum())
                   + 0.3 * expected_ntl / expected_count)
  np.testing.assert_allclose(objective.loss_of(terms), expected_loss, rtol=1e-5)
  metrics = quantitative.metrics(terms)
  np.testing.assert_allclose(metrics['ntl'], expected_ntl / expected_count, rtol=1e-5)
  np.testing.assert_allclose(metrics['ce'], metrics['loss'], rtol=1e-6)


def test_ntl_gradient_reaches_the_digit_logits_of_digit_positions_only():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(1, 3, VOCAB)).astype(np.float32))
  targets = jnp.asarray([[4 + 7, 1, 4 + 2]], jnp.int32)  # digit 7, a word, digit 2
  batch = {'targets': targets, 'loss_mask': jnp.ones((1, 3), jnp.float32)}
  ntl_sum = jax.jit(lambda x: quantitative.loss_terms(x, batch, number_tokens=DIGITS)['ntl_sum'])
  grad = np.asarray(jax.jit(jax.grad(ntl_sum))(logits))
  assert np.abs(grad[0, 0, DIGITS.ids]).min() > 0
  assert np.abs(grad[0, 2, DIGITS.ids]).min() > 0
  np.testing.assert_array_equal(grad[0, 1], 0.0)  # a word target: no NTL
  np.testing.assert_array_equal(np.delete(grad[0], DIGITS.ids, axis=-1), 0.0)
  # A step against the gradient lowers the expected distance to the true digits.
  assert float(ntl_sum(logits - 0.5 * grad)) < float(ntl_sum(logits))


class _FakeTokenizer:
  """A vocabulary with byte-level, SentencePiece and multi-digit number tokens."""

  all_special_ids = (0,)

  def get_vocab(self):
    return {'0': 0, 'Ġ4': 1, '▁7': 2, '123': 3, 'Ġ12a': 4, 'hello': 5, '²': 6, '9': 7, '': 8}


def test_number_tokens_from_any_tokenizer(tmp_path):
  table = quantitative.number_tokens_of(_FakeTokenizer(), 'all')
  np.testing.assert_array_equal(table.ids, [1, 2, 3, 7])  # '0' is special here
  np.testing.assert_array_equal(table.values, [4, 7, 123, 9])
  digits_only = quantitative.number_tokens_of(_FakeTokenizer(), 'digits')
  np.testing.assert_array_equal(digits_only.ids, [7])  # '9'; not 'Ġ4', '▁7' or '123'
  texts = ['user:\nWhat is 12 plus 30?', 'assistant:\n42'] * 20
  demo = tokenizer_lib.train_tokenizer(texts, str(tmp_path), vocab_size=300)
  demo_table = quantitative.number_tokens_of(demo)
  assert sorted(demo_table.values.tolist()) == list(range(10))  # one token per digit
  for token_id, value in zip(demo_table.ids, demo_table.values):
    assert demo.decode([int(token_id)]).strip() == str(int(value))


def test_get_builds_the_objective_from_its_config(tmp_path):
  assert objectives.get('sft').loss == (('nll_sum', 1.0, 'num_tokens'),)
  section = ml_collections.ConfigDict(
      {'name': 'quantitative', 'ntl_weight': 0.5, 'ntl_kind': 'mse', 'number_tokens': 'all'})
  objective = objectives.get(section, _FakeTokenizer())
  assert objective.name == 'quantitative' and objective.shown == ('ce', 'ntl')
  assert objective.loss == (('nll_sum', 1.0, 'num_tokens'), ('ntl_sum', 0.5, 'number_tokens'))
  hash(objective)  # usable as a static jit argument or a cache key
  logits = jax.random.normal(jax.random.key(0), (1, 3, 9))
  batch = {'targets': jnp.asarray([[1, 5, 7]]), 'loss_mask': jnp.ones((1, 3))}
  terms = objective.terms(batch, lambda rows: logits)
  assert {name: float(value) for name, value in objective.counts(batch).items()} == {
      'num_tokens': 3.0, 'num_examples': 1.0, 'number_tokens': 2.0}
  expected = quantitative.loss_terms(logits, batch, number_tokens=quantitative.number_tokens_of(
      _FakeTokenizer(), 'all'), ntl_kind='mse')
  assert float(terms['ntl_sum']) == pytest.approx(float(expected['ntl_sum']))
  metrics = objective.metrics(terms)
  assert float(metrics['ntl']) == pytest.approx(float(terms['ntl_sum']) / 2)  # 2 number tokens
  with pytest.raises(ValueError, match='number_tokens'):
    objectives.get(ml_collections.ConfigDict({'name': 'quantitative', 'number_tokens': 'some'}),
                   _FakeTokenizer())
  with pytest.raises(ValueError, match='tokenizer'):
    objectives.get('quantitative')
  with pytest.raises(ValueError, match='unknown'):
    objectives.get('regress')
