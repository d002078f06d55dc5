"""Group relative policy optimisation (GRPO; Shao et al., 2024, DeepSeekMath) with
verifiable rewards.

The loop samples `group_size` answers per prompt from the current policy
(`training.rollout`), rewards them (`objectives.rewards`) and gives each answer its advantage
within its group, A = (r - mean(group)) / (std(group) + 1e-4) (`scale_rewards='group'`; 'none'
keeps r - mean, as Dr. GRPO does). On the answer tokens, with the policy's log-probs logp,
those at sampling time old (the same params for the first update) and the reference's ref,
all of logits / temperature (the distribution the answers were sampled from, before top-k /
top-p; as TRL):

  ratio = exp(logp - old)
  token loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3
  k3 = exp(ref - logp) - (ref - logp) - 1      (Schulman's unbiased, positive KL estimator)

`loss_type` says how token losses become the loss: 'dapo' (the default, TRL's too) averages
over every answer token of the global batch; 'grpo' averages each answer's tokens, then the
answers; 'dr_grpo' sums them and divides by answers x max_new_tokens. The reference is the
starting model (the LoRA adapters off, or a frozen copy), read only when beta > 0.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openvlm_jax.console import UserError
from openvlm_jax.objectives import rewards as rewards_lib
from openvlm_jax.objectives import sft
from openvlm_jax.objectives.contract import Objective, Rollouts

LOSS_TYPES = ('dapo', 'grpo', 'dr_grpo')
SCALE_REWARDS = ('group', 'none')
STD_EPSILON = 1e-4  # added to a group's reward std (TRL's value)


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = 'group') -> np.ndarray:
  """Each reward minus its group's mean, divided by the group's std + 1e-4 with 'group'.

  rewards: [groups * group_size], a group's answers next to each other. The std is the
  sample std (ddof 1), as torch's `std` in TRL. Returns float32, same shape.
  """
  groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  if scale == 'group':
    centred = centred / (groups.std(axis=1, ddof=1, keepdims=True) + STD_EPSILON)
  return centred.reshape(-1).astype(np.float32)


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) per token, float32 [rows, seq]."""
  return -sft.token_cross_entropy(logits, targets)


def policy_terms(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array | None,
                 advantages: jax.Array, answer_mask: jax.Array, *, epsilon: float,
                 beta: float) -> dict:
  """Sums of the clipped objective over answer tokens.

  logps, old_logps, ref_logps: [rows, seq] log-probs of each target token (ref None when
  beta is 0); advantages [rows]; answer_mask float32 [rows, seq], 1 at the answer's tokens
  of real rows. Returns float32 scalars: `token_loss_sum` (sum of token losses),
  `sequence_loss_sum` (sum over answers of their mean token loss), `kl_sum` (k3),
  `clipped_tokens` (the clip is active: ratio above 1 + eps with A > 0 or below 1 - eps with
  A < 0), `ratio_sum`, and `answer_tokens`.
  """
  ratio = jnp.exp(logps - old_logps)
  advantage = advantages[:, None].astype(jnp.float32)
  clipped_ratio = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
  token_loss = -jnp.minimum(ratio * advantage, clipped_ratio * advantage)
  kl = jnp.zeros_like(logps)
  if ref_logps is not None:
    log_ratio = ref_logps - logps
    kl = jnp.exp(log_ratio) - log_ratio - 1.0
    token_loss = token_loss + beta * kl
  clipped = (((ratio > 1.0 + epsilon) & (advantage > 0))
             | ((ratio < 1.0 - epsilon) & (advantage < 0))).astype(jnp.float32)
  total = lambda values: jnp.sum(values * answer_mask)
  tokens_per_answer = jnp.maximum(jnp.sum(answer_mask, axis=1), 1.0)  # [rows]
  return dict(
      token_loss_sum=total(token_loss),
      sequence_loss_sum=jnp.sum(jnp.sum(token_loss * answer_mask, axis=1) / tokens_per_answer),
      kl_sum=total(kl), clipped_tokens=total(clipped), ratio_sum=total(ratio),
      answer_tokens=jnp.sum(answer_mask))


def counts(batch: dict) -> dict:
  """`answer_tokens` (sampled answer tokens) and `num_answers` (real rows)."""
  return dict(answer_tokens=jnp.sum(sft.target_mask_of(batch)),
              num_answers=jnp.sum(sft.example_mask_of(batch)))


def metrics(sums: dict) -> dict:
  """KL to the reference per answer token (k3), the clipped share of tokens, the mean ratio,
  and the loss per token; the rewards are the loop's (`training.rollout`)."""
  tokens = jnp.maximum(sums['answer_tokens'], 1.0)
  return dict(kl=sums['kl_sum'] / tokens, clip_fraction=sums['clipped_tokens'] / tokens,
              mean_ratio=sums['ratio_sum'] / tokens,
              policy_loss=sums['token_loss_sum'] / tokens, num_answers=sums['num_answers'])


def _int_option(section: Any, key: str, default: int, minimum: int) -> int:
  value = int(section.get(key, default))
  if value < minimum:
    raise UserError(f'config.objective.{key}={value}: must be >= {minimum}')
  return value


def make(section: Any, tokenizer: Any = None) -> Objective:
  """The `grpo` objective from `config.objective`.

  Options: group_size (8 answers per prompt), num_updates (1 optimizer update per rollout
  batch), epsilon (0.2), beta (0.04; 0 reads no reference), loss_type ('dapo'),
  scale_rewards ('group'), rewards ((('numeric', 1.0),)), and the sampling of answers:
  max_new_tokens (16), temperature (1.0), top_k (0: all), top_p (1.0).

  Raises:
    UserError: naming the key, for a value out of range or an unknown reward.
  """
  del tokenizer
  group_size = _int_option(section, 'group_size', 8, 2)
  num_updates = _int_option(section, 'num_updates', 1, 1)
  max_new_tokens = _int_option(section, 'max_new_tokens', 16, 1)
  epsilon, beta = float(section.get('epsilon', 0.2)), float(section.get('beta', 0.04))
  temperature = float(section.get('temperature', 1.0))
  loss_type = str(section.get('loss_type', 'dapo'))
  scale_rewards = str(section.get('scale_rewards', 'group'))
  if not 0 < epsilon < 1:
    raise UserError(f'config.objective.epsilon={epsilon}: must be in (0, 1)')
  if beta < 0:
    raise UserError(f'config.objective.beta={beta}: must be >= 0')
  if temperature <= 0:
    raise UserError(f'config.objective.temperature={temperature}: must be > 0 (answers in a '
                    'group must differ)')
  top_k, top_p = int(section.get('top_k', 0)), float(section.get('top_p', 1.0))
  if top_k < 0 or not 0 < top_p <= 1:
    raise UserError(f'config.objective.top_k={top_k}, top_p={top_p}: need top_k >= 0 and '
                    '0 < top_p <= 1')
  if loss_type not in LOSS_TYPES:
    raise UserError(f'config.objective.loss_type={loss_type!r}: one of {LOSS_TYPES}')
  if scale_rewards not in SCALE_REWARDS:
    raise UserError(f'config.objective.scale_rewards={scale_rewards!r}: one of {SCALE_REWARDS}')
  reward_spec = rewards_lib.parse_rewards(section.get('rewards', (('numeric', 1.0),)))

  def logps_of(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return token_logps(logits / temperature, targets)  # the distribution answers came from

  def terms(batch: dict, logits_fn) -> dict:
    logps = logps_of(logits_fn(batch), batch['targets'])
    old_logps = batch.get('old_logps')  # computed before the first of several updates
    old_logps = jax.lax.stop_gradient(logps if old_logps is None else old_logps)
    ref_logps = None
    if beta > 0:
      ref_logps = logps_of(logits_fn(batch, reference=True), batch['targets'])
    return dict(policy_terms(logps, old_logps, ref_logps, batch['advantages'],
                             sft.target_mask_of(batch), epsilon=epsilon, beta=beta),
                num_answers=jnp.sum(sft.example_mask_of(batch)))

  loss = {'dapo': (('token_loss_sum', 1.0, 'answer_tokens'),),
          'grpo': (('sequence_loss_sum', 1.0, 'num_answers'),),
          'dr_grpo': (('token_loss_sum', 1.0 / max_new_tokens, 'num_answers'),)}[loss_type]
  rollouts = Rollouts(
      group_size=group_size, num_updates=num_updates, max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p,
      rewards=lambda answers, references, questions: rewards_lib.score_rewards(
          reward_spec, answers, references, questions),
      advantages=lambda values: group_advantages(values, group_size, scale_rewards),
      logps=logps_of)
  return Objective(name='grpo', terms=terms, counts=counts, loss=loss, metrics=metrics,
                   shown=('reward', 'kl'), reference=beta > 0, rollouts=rollouts)

