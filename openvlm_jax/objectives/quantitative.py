"""Quantitative objective: cross-entropy plus a number-token loss (NTL).

Zausinger et al., "Regress, Don't Guess: A Regression-like Loss on Number Tokens for Language
Models" (ICML 2025). At every target position whose token is a number token, the model's
distribution over the number tokens (a softmax over their logits only) is compared with the
true value y:
  'was' (the default): sum_j p_j |v_j - y|, the Wasserstein-1 distance to a point mass at y;
  'mse':               (sum_j p_j v_j - y)^2, the squared error of the expected value.
Loss = CE + ntl_weight * NTL, as in the paper and its package (`ntloss`): CE is the mean over
target tokens and NTL the mean over target positions whose token is a number token, each
over the whole global batch (the objective's `loss` names both counts).

Number tokens come from the tokenizer (`number_tokens='digits' | 'all'`):
  'digits' (the paper's default): the ten tokens that are exactly one ASCII digit, '0'..'9'.
  'all': every token whose text, with a leading word-boundary marker removed ('Ġ4' of
      byte-level BPE, '▁4' of SentencePiece, plain '4'), is a run of ASCII digits, valued as
      that integer ('123' -> 123), for tokenizers with multi-digit number tokens.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openvlm_jax import console
from openvlm_jax.console import UserError
from openvlm_jax.objectives import sft
from openvlm_jax.objectives.contract import Objective

NTL_KINDS = ('was', 'mse')
NUMBER_TOKEN_SETS = ('digits', 'all')
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


def number_tokens_of(tokenizer: Any, which: str = 'digits') -> NumberTokens:
  """Finds the number tokens of a Hugging Face tokenizer (special tokens excluded).

  `which`: 'digits' keeps the single-digit tokens '0'..'9' only, 'all' every number token
  (see the module docstring).

  Raises:
    UserError: if the vocabulary has no such token.
  """
  if which not in NUMBER_TOKEN_SETS:
    raise UserError(f'number tokens must be one of {NUMBER_TOKEN_SETS}, got {which!r}')
  special_ids = set(getattr(tokenizer, 'all_special_ids', ()) or ())
  found = sorted(
      (token_id, value) for token, token_id in tokenizer.get_vocab().items()
      if token_id not in special_ids and (value := token_number_value(token)) is not None
      and (which == 'all' or (len(token) == 1 and token.isdigit())))
  if not found:
    raise UserError(f'the tokenizer has no number tokens ({which}); the quantitative '
                    'objective needs them')
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


def number_target_mask(batch: dict, number_tokens: NumberTokens) -> jax.Array:
  """float32 [batch, seq]: target positions under the loss whose token is a number token."""
  is_number = jnp.isin(batch['targets'], jnp.asarray(number_tokens.ids))
  return is_number.astype(jnp.float32) * sft.target_mask_of(batch)


def counts(batch: dict, number_tokens: NumberTokens) -> dict:
  """`sft.counts` plus `number_tokens`, the target number tokens under the loss mask."""
  return dict(sft.counts(batch), number_tokens=jnp.sum(number_target_mask(batch, number_tokens)))


def loss_terms(logits: jax.Array, batch: dict, *, number_tokens: NumberTokens,
               ntl_kind: str = 'was') -> dict:
  """`sft.loss_terms` plus `ntl_sum` (NTL summed over target number tokens) and its count."""
  ntl, _ = number_token_loss(logits, batch['targets'], number_tokens, ntl_kind)
  number_mask = number_target_mask(batch, number_tokens)  # [batch, seq]
  return dict(sft.loss_terms(logits, batch), number_tokens=jnp.sum(number_mask),
              ntl_sum=jnp.sum(ntl * number_mask))


def metrics(sums: dict) -> dict:
  """`sft.metrics` plus `ce` (per target token) and `ntl` (per target number token)."""
  return dict(sft.metrics(sums), ce=sums['nll_sum'] / jnp.maximum(sums['num_tokens'], 1.0),
              ntl=sums['ntl_sum'] / jnp.maximum(sums['number_tokens'], 1.0))


def make(section: Any, tokenizer: Any) -> Objective:
  """The `quantitative` objective from `config.objective`.

  Options: `ntl_weight` (lambda), `ntl_kind` ('was' | 'mse'), `number_tokens`
  ('digits' | 'all').

  Raises:
    UserError: without a tokenizer, or for an unknown option value.
  """
  if tokenizer is None:
    raise UserError("objective 'quantitative' needs the tokenizer (for its number tokens)")
  ntl_kind = section.get('ntl_kind', 'was')
  if ntl_kind not in NTL_KINDS:
    raise UserError(f'config.objective.ntl_kind={ntl_kind!r}: must be one of {list(NTL_KINDS)}')
  which = section.get('number_tokens', 'digits')
  if which not in NUMBER_TOKEN_SETS:
    raise UserError(f'config.objective.number_tokens={which!r}: must be one of '
                    f'{list(NUMBER_TOKEN_SETS)}')
  number_tokens = number_tokens_of(tokenizer, which)
  if which == 'digits':
    every = number_tokens_of(tokenizer, 'all')
    if len(every.ids) > len(number_tokens.ids):
      console.warn(f"config.objective.number_tokens='digits': {len(every.ids) - len(number_tokens.ids)}"
                   " other number tokens of the tokenizer (e.g. 'Ġ7', '42') get no NTL; 'all' "
                   'covers them')
  ntl_weight = float(section.get('ntl_weight', 0.3))

  def terms(batch: dict, logits_fn) -> dict:
    return loss_terms(logits_fn(batch), batch, number_tokens=number_tokens, ntl_kind=ntl_kind)

  return Objective(
      name='quantitative', terms=terms, counts=lambda batch: counts(batch, number_tokens),
      loss=(('nll_sum', 1.0, 'num_tokens'), ('ntl_sum', ntl_weight, 'number_tokens')),
      metrics=metrics, shown=('ce', 'ntl'))
