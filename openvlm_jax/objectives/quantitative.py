"""Quantitative objective: cross-entropy plus a number-token loss (NTL).

Zausinger et al., "Regress, Don't Guess: A Regression-like Loss on Number Tokens for Language
Models" (ICML 2025). At every target position whose token is a number token, the model's
distribution over the number tokens (a softmax over their logits only) is compared with the
true value y:
  'was' (the default): sum_j p_j |v_j - y|, the Wasserstein-1 distance to a point mass at y;
  'mse':               (sum_j p_j v_j - y)^2, the squared error of the expected value.
Total loss = cross-entropy + ntl_weight * NTL. Both are summed over target tokens and the
train step divides the sum by the global number of target tokens, as for `sft`.

Number tokens come from the tokenizer: every token whose text, with a leading word-boundary
marker removed ('Ġ4' of byte-level BPE, '▁4' of SentencePiece, plain '4'), is a run of ASCII
digits, valued as that integer. This covers single-digit tokenizers (Llama, Qwen2, the demo)
and tokenizers with multi-digit number tokens ('123' -> 123).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openvlm_jax.console import UserError
from openvlm_jax.objectives import sft
from openvlm_jax.objectives.contract import Objective

NTL_KINDS = ('was', 'mse')
_BOUNDARY_MARKERS = ('Ġ', '▁', ' ')


@dataclasses.dataclass(frozen=True)
class NumberTokens:
  """The number tokens of a vocabulary: ids [n] int32 and their values [n] float32."""

  ids: np.ndarray
  values: np.ndarray

  def __hash__(self) -> int:
    return hash((self.ids.tobytes(), self.values.tobytes()))

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, NumberTokens) and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.values, other.values))


def token_number_value(token: str) -> int | None:
  """The integer a vocabulary entry spells ('7', 'Ġ42', '▁3'), or None if it is not a number."""
  for marker in _BOUNDARY_MARKERS:
    if token.startswith(marker):
      token = token[len(marker):]
      break
  if token and token.isascii() and token.isdigit():
    return int(token)
  return None


def number_tokens_of(tokenizer: Any) -> NumberTokens:
  """Finds the number tokens of a Hugging Face tokenizer (special tokens excluded).

  Raises:
    ValueError: if the vocabulary has no number token.
  """
  special_ids = set(getattr(tokenizer, 'all_special_ids', ()) or ())
  found = sorted(
      (token_id, value) for token, token_id in tokenizer.get_vocab().items()
      if token_id not in special_ids and (value := token_number_value(token)) is not None)
  if not found:
    raise UserError('the tokenizer has no number tokens; the quantitative objective needs them')
  ids, values = zip(*found)
  return NumberTokens(ids=np.asarray(ids, np.int32), values=np.asarray(values, np.float32))


def number_token_loss(logits: jax.Array, targets: jax.Array, number_tokens: NumberTokens,
                      kind: str = 'was') -> tuple[jax.Array, jax.Array]:
  """Per-position NTL and the mask of positions it applies to.

  Args:
    logits: [batch, seq, vocab].
    targets: [batch, seq] int.
    number_tokens: the vocabulary's number tokens (`number_tokens_of`).
    kind: 'was' | 'mse'.

  Returns:
    (ntl float32 [batch, seq], zero where the target is not a number token;
     is_number float32 [batch, seq]).
  """
  if kind not in NTL_KINDS:
    raise UserError(f'ntl_kind must be one of {NTL_KINDS}, got {kind!r}')
  lookup_size = int(number_tokens.ids.max()) + 1
  value_of_id = np.full((lookup_size,), np.nan, np.float32)
  value_of_id[number_tokens.ids] = number_tokens.values
  true_values = jnp.take(jnp.asarray(value_of_id), targets, mode='fill', fill_value=np.nan)
  is_number = ~jnp.isnan(true_values)  # [batch, seq]
  true_values = jnp.where(is_number, true_values, 0.0)
  number_logits = jnp.take(logits.astype(jnp.float32), jnp.asarray(number_tokens.ids), axis=-1)
  probs = jax.nn.softmax(number_logits, axis=-1)  # [batch, seq, num_number_tokens]
  values = jnp.asarray(number_tokens.values)  # [num_number_tokens]
  if kind == 'was':
    ntl = jnp.sum(probs * jnp.abs(values - true_values[..., None]), axis=-1)
  else:
    ntl = jnp.square(jnp.sum(probs * values, axis=-1) - true_values)
  return jnp.where(is_number, ntl, 0.0), is_number.astype(jnp.float32)


def loss_terms(logits: jax.Array, batch: dict, *, number_tokens: NumberTokens,
               ntl_weight: float = 0.3, ntl_kind: str = 'was') -> dict:
  """`sft.loss_terms` plus the number-token loss; `loss_sum` = nll_sum + ntl_weight * ntl_sum.

  Adds `ntl_sum` and `number_tokens` (target number tokens under the loss mask), float32
  scalars that add up over micro-batches and devices like the others.
  """
  terms = sft.loss_terms(logits, batch)
  ntl, is_number = number_token_loss(logits, batch['targets'], number_tokens, ntl_kind)
  loss_mask = batch['loss_mask'].astype(jnp.float32)  # [batch, seq]
  if 'example_mask' in batch:
    loss_mask = loss_mask * batch['example_mask'].astype(jnp.float32)[:, None]
  ntl_sum = jnp.sum(ntl * loss_mask)
  return dict(terms, loss_sum=terms['nll_sum'] + jnp.float32(ntl_weight) * ntl_sum,
              ntl_sum=ntl_sum, number_tokens=jnp.sum(is_number * loss_mask))


def metrics(sums: dict) -> dict:
  """`sft.metrics` plus `ntl`, the number-token loss per target number token."""
  return dict(sft.metrics(sums), ntl=sums['ntl_sum'] / jnp.maximum(sums['number_tokens'], 1.0))


def make(section: Any, tokenizer: Any) -> Objective:
  """The `quantitative` objective from `config.objective` (`ntl_weight`, `ntl_kind`).

  Raises:
    UserError: without a tokenizer, or for an unknown `ntl_kind`.
  """
  if tokenizer is None:
    raise UserError("objective 'quantitative' needs the tokenizer (for its number tokens)")
  ntl_kind = section.get('ntl_kind', 'was')
  if ntl_kind not in NTL_KINDS:
    raise UserError(f'config.objective.ntl_kind={ntl_kind!r}: must be one of {list(NTL_KINDS)}')
  number_tokens = number_tokens_of(tokenizer)
  ntl_weight = float(section.get('ntl_weight', 0.3))

  def terms(batch: dict, logits_fn) -> dict:
    return loss_terms(logits_fn(batch), batch, number_tokens=number_tokens,
                      ntl_weight=ntl_weight, ntl_kind=ntl_kind)

  return Objective(name='quantitative', terms=terms, metrics=metrics, loss_term='loss_sum',
                   normalizer='num_tokens', shown=('ntl',))
