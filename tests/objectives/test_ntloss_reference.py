"""Our number-token loss against the paper authors' package, `ntloss` (PyTorch), on one input.

`NTLoss` is NTL-WAS, `NTLossDotProduct` with its default MSE is NTL-MSE; `reweigh=False` is
the loss as the ICML paper defines it. Per position (`reduction='none'`) and the mean over
number-token positions (`reduction='mean'`) are both compared.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.objectives import quantitative

torch = pytest.importorskip('torch')
ntloss = pytest.importorskip('ntloss')

REFERENCE = {'was': ntloss.NTLoss, 'mse': ntloss.NTLossDotProduct}


@pytest.fixture(scope='module')
def digit_tokenizer(tmp_path_factory):
  """The demo's tokenizer kind: byte-level BPE with one token per digit."""
  texts = ['user:\nWhat is 12 plus 30?', 'assistant:\n42', 'assistant:\n7 and 815'] * 20
  return tokenizer_lib.train_tokenizer(texts, str(tmp_path_factory.mktemp('tok')),
                                       vocab_size=300)


@pytest.fixture(scope='module')
def number_word_tokenizer():
  """Whole numbers as single tokens ('12', '450'), as in vocabularies with multi-digit tokens."""
  words = ['<unk>', 'what', 'is', 'plus', '?', '0', '3', '7', '9', '12', '30', '450', 'x']
  backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)},
                                       unk_token='<unk>'))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token='<unk>')


def _case(tokenizer, number_tokens, seed):
  """Random logits, targets that are half number tokens, and a loss mask."""
  rng = np.random.default_rng(seed)
  vocab = len(tokenizer)
  logits = rng.normal(scale=3.0, size=(3, 7, vocab)).astype(np.float32)
  words = rng.integers(0, vocab, size=(3, 7))
  numbers = rng.choice(number_tokens.ids, size=(3, 7))
  targets = np.where(rng.random((3, 7)) < 0.5, numbers, words).astype(np.int64)
  loss_mask = (rng.random((3, 7)) < 0.8).astype(np.float32)
  return logits, targets, loss_mask


def _reference(kind, tokenizer, digit_level, logits, targets, loss_mask, reduction):
  loss = REFERENCE[kind](tokenizer, digit_level=digit_level, reweigh=False)
  return loss(torch.from_numpy(logits), torch.from_numpy(targets),
              loss_weights=torch.from_numpy(loss_mask), reduction=reduction).numpy()


# The reference's digit level adds any missing digit to the tokenizer, so it runs on the
# digit tokenizer (all ten present); 'all' runs on both.
@pytest.mark.parametrize('kind', ['was', 'mse'])
@pytest.mark.parametrize('which, tokenizer_name', [('digits', 'digit_tokenizer'),
                                                   ('all', 'digit_tokenizer'),
                                                   ('all', 'number_word_tokenizer')])
def test_ntl_equals_the_reference_package(kind, which, tokenizer_name, request):
  tokenizer = request.getfixturevalue(tokenizer_name)
  number_tokens = quantitative.number_tokens_of(tokenizer, which)
  expected_values = (list(range(10)) if tokenizer_name == 'digit_tokenizer'
                     else [0, 3, 7, 9, 12, 30, 450])
  assert sorted(number_tokens.values.tolist()) == expected_values
  logits, targets, loss_mask = _case(tokenizer, number_tokens, seed=len(kind + which))
  batch = {'targets': jnp.asarray(targets, jnp.int32), 'loss_mask': jnp.asarray(loss_mask)}

  ntl, is_number = quantitative.number_token_loss(jnp.asarray(logits), batch['targets'],
                                                  number_tokens, kind)
  ours = np.asarray(ntl) * loss_mask
  reference = _reference(kind, tokenizer, which == 'digits', logits, targets, loss_mask, 'none')
  assert np.asarray(is_number).sum() > 5
  np.testing.assert_allclose(ours, reference, rtol=2e-5, atol=2e-5)

  # The objective's NTL metric is the reference's mean over number-token positions.
  terms = quantitative.loss_terms(jnp.asarray(logits), batch, number_tokens=number_tokens,
                                  ntl_kind=kind)
  mean = _reference(kind, tokenizer, which == 'digits', logits, targets, loss_mask, 'mean')
  np.testing.assert_allclose(quantitative.metrics(terms)['ntl'], mean, rtol=2e-5)
