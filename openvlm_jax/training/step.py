"""The jitted training and evaluation steps: pure functions of (state, batch)."""

from typing import Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from openvlm_jax.models import lora as lora_lib
from openvlm_jax.objectives import Objective
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training.state import TrainState

# The batch fields every model call reads (and `model.init` needs); a prefix LM
# (`config.prefix_attention`) reads `prefix_len` [batch] as well, or a packed batch's
# per-token `prefix_end` [batch, seq].
MODEL_INPUTS = ('input_ids', 'images', 'positions', 'attention_mask')
# The batch fields of anyres models' image layout (see `VLM.__call__`).
ANYRES_KEYS = ('image_feature_index', 'image_feature_weight')


def uses_prefix_attention(model: nn.Module) -> bool:
  """Whether `model` attends bidirectionally within each example's prefix."""
  return bool(getattr(getattr(model, 'config', None), 'prefix_attention', False))


def model_logits(model: nn.Module, params, batch: dict, rngs: dict | None = None) -> jax.Array:
  """Runs the VLM on a batch dict. Returns logits [batch, seq, vocab].

  With `config.prefix_attention` the model also gets the prefix: `batch['prefix_end']`
  [batch, seq] in a packed batch, else `batch['prefix_len']` [batch]; without it neither is
  read. Anyres batches carry `image_feature_index` (and `image_feature_weight`, OneVision):
  which view feature each image token takes (`data/anyres.py`). A packed batch's
  `attention_mask` holds segment ids and its `positions` restart in
  each segment. `rngs` ({'dropout': key}) turns on dropout (the LoRA adapters' input
  dropout).
  """
  prefix = {}
  if uses_prefix_attention(model):
    prefix = ({'prefix_end': batch['prefix_end']} if 'prefix_end' in batch
              else {'prefix_len': batch['prefix_len']})
  anyres = {name: batch[name] for name in ANYRES_KEYS if name in batch}
  return model.apply({'params': params}, batch['input_ids'], batch['images'],
                     positions=batch['positions'], attention_mask=batch['attention_mask'],
                     rngs=rngs, **prefix, **anyres)


def logits_fn_of(model: nn.Module, params, rngs: dict | None = None,
                 reference_params=None) -> Callable:
  """The `logits_fn(rows, reference=False)` objectives call (see `objectives`).

  `reference=True` runs the starting model, without dropout and without a gradient:
  `reference_params` (a frozen copy) when given, else `params` with their LoRA adapters
  switched off (`lora.without_adapters`), which is the starting model when only adapters train.
  """
  def logits_fn(rows: dict, reference: bool = False) -> jax.Array:
    if reference:
      frozen = (lora_lib.without_adapters(params) if reference_params is None
                else reference_params)
      return jax.lax.stop_gradient(model_logits(model, jax.lax.stop_gradient(frozen), rows))
    return model_logits(model, params, rows, rngs)
  return logits_fn


def split_micro_batches(batch: dict, num_micro: int) -> dict:
  """[batch, ...] -> [num_micro, batch // num_micro, ...], interleaving rows.

  Micro-batch i takes rows i, i + num_micro, ... so every micro-batch spans all data shards.
  """
  def split(array):
    rows = array.shape[0]
    if rows % num_micro:
      raise ValueError(f'batch of {rows} rows does not split into {num_micro} micro-batches')
    return einops.rearrange(array, '(rows micro) ... -> micro rows ...', micro=num_micro)
  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, objective: Objective,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1, trainable: Callable | None = None,
                    num_updates: int = 1) -> Callable:
  """Returns train_step(state, batch, reference_params=None) -> (state, metrics).

  The objective's counts (its normalizers) are taken over the whole global batch first; each
  of `grad_accum_steps` micro-batches then adds the gradient of its share of the loss,
  `objective.loss_of(micro-batch terms, global counts)`, so accumulation is exact. When every
  loss term divides by one count (`sft`), the summed terms are differentiated and the
  gradient divided once at the end instead: the same value, rounded as it always was. With
  `trainable` (params -> tree of bools, the optimizer's mask), only trainable parameters are
  differentiated and updated; frozen ones enter the loss as constants. The metrics are the
  objective's, plus `loss`, `grad_norm`, `learning_rate` and `finite` (False when the loss or
  the gradient norm is not finite).

  `train_step(state, batch, reference_params)` takes a frozen copy of the starting params for
  an objective's reference (see `logits_fn_of`); without it (None) the reference is the
  params with the adapters off.

  With `num_updates` > 1 (GRPO reusing one rollout batch) the step makes that many optimizer
  updates on the same batch; `batch['old_logps']` [batch, seq] then holds the answer tokens'
  log-probs under the params the step started from (`objective.rollouts.logps`, micro-batch by
  micro-batch), and the metrics are the updates' means.
  The schedule counts updates: update u of step s is number s * num_updates + u.
  """
  trainable = trainable or optimizer_lib.all_trainable
  lora = getattr(getattr(model, 'config', None), 'lora', None)
  shared_count = {count for _, _, count in objective.loss}
  shared_count = shared_count.pop() if len(shared_count) == 1 else None

  def update(params, opt_state, batch: dict, counter: jax.Array, reference_params):
    """One optimizer update of `params` on `batch`; `counter` numbers it (dropout, lr)."""
    mask = trainable(params)  # Python bools: static under jit
    train_params, frozen_params = optimizer_lib.split_trainable(params, mask)
    counts = objective.counts(batch)  # the global batch's normalizers
    rngs = None
    if lora is not None and lora.dropout > 0:
      rngs = {'dropout': jax.random.fold_in(jax.random.key(0), counter)}

    def loss_share(train_params, batch):
      params = optimizer_lib.merge_trainable(train_params, frozen_params, mask)
      terms = objective.terms(batch, logits_fn_of(model, params, rngs, reference_params))
      if shared_count is not None:  # divided by the count once, after accumulation
        return sum(weight * terms[term] for term, weight, _ in objective.loss), terms
      return objective.loss_of(terms, counts), terms

    grad_fn = jax.value_and_grad(loss_share, has_aux=True)
    if grad_accum_steps == 1:
      (loss, terms), grads = grad_fn(train_params, batch)
    else:
      def accumulate(carry, micro_batch):
        micro_loss_and_terms, micro_grads = grad_fn(train_params, micro_batch)
        return jax.tree.map(jnp.add, carry, (micro_grads, micro_loss_and_terms)), None
      zero_grads = jax.tree.map(jnp.zeros_like, train_params)
      zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_share, train_params, batch))
      (grads, (loss, terms)), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums),
                                               split_micro_batches(batch, grad_accum_steps))
    if shared_count is not None:
      denominator = jnp.maximum(counts[shared_count], 1.0)
      grads = jax.tree.map(lambda grad: grad / denominator, grads)
      loss = loss / denominator
    updates, opt_state = optimizer.update(grads, opt_state, train_params)
    params = optimizer_lib.merge_trainable(
        optax.apply_updates(train_params, updates), frozen_params, mask)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(objective.metrics(terms), loss=loss, grad_norm=grad_norm,
                   learning_rate=schedule(counter))
    return params, opt_state, metrics

  def old_logps(params, batch: dict) -> jax.Array:
    """[batch, seq] log-probs of the targets under `params`, micro-batch by micro-batch."""
    logps_of = objective.rollouts.logps
    if grad_accum_steps == 1:
      return logps_of(model_logits(model, params, batch), batch['targets'])
    per_micro = jax.lax.map(lambda micro: logps_of(model_logits(model, params, micro),
                                                   micro['targets']),
                            split_micro_batches(batch, grad_accum_steps))
    return einops.rearrange(per_micro, 'micro rows seq -> (rows micro) seq')

  def train_step(state: TrainState, batch: dict, reference_params=None):
    params, opt_state = state.params, state.opt_state
    if num_updates > 1:
      batch = dict(batch, old_logps=jax.lax.stop_gradient(old_logps(params, batch)))
    history = []
    for index in range(num_updates):  # a few, unrolled
      params, opt_state, metrics = update(params, opt_state, batch,
                                          state.step * num_updates + index, reference_params)
      history.append(metrics)
    metrics = jax.tree.map(lambda *values: jnp.mean(jnp.stack(values)), *history)
    # The loop stops on a False here and saves nothing of this step.
    metrics['finite'] = jnp.all(jnp.stack([jnp.isfinite(m['loss']) & jnp.isfinite(m['grad_norm'])
                                           for m in history]))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, objective: Objective) -> Callable:
  """Returns eval_step(params, batch, reference_params=None) -> the objective's summed terms
  over the batch (`reference_params` as in `make_train_step`).

  `batch['example_mask']` marks real rows in a padded last batch; the objective counts only
  those.
  """

  def eval_step(params, batch: dict, reference_params=None) -> dict:
    return objective.terms(batch, logits_fn_of(model, params, reference_params=reference_params))

  return eval_step
