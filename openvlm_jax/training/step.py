"""The jitted training and evaluation steps: pure functions of (state, batch)."""

from typing import Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from openvlm_jax.objectives import Objective
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training.state import TrainState

# The batch fields every model call reads (and `model.init` needs); a prefix LM
# (`config.prefix_attention`) reads `prefix_len` [batch] as well.
MODEL_INPUTS = ('input_ids', 'images', 'positions', 'attention_mask')


def uses_prefix_attention(model: nn.Module) -> bool:
  """Whether `model` attends bidirectionally within each example's prefix."""
  return bool(getattr(getattr(model, 'config', None), 'prefix_attention', False))


def model_logits(model: nn.Module, params, batch: dict, rngs: dict | None = None) -> jax.Array:
  """Runs the VLM on a batch dict. Returns logits [batch, seq, vocab].

  With `config.prefix_attention` the model also gets `batch['prefix_len']` [batch]; without
  it the batch's `prefix_len`, if any, is not read. `rngs` ({'dropout': key}) turns on
  dropout (the LoRA adapters' input dropout).
  """
  prefix_len = batch['prefix_len'] if uses_prefix_attention(model) else None
  return model.apply({'params': params}, batch['input_ids'], batch['images'],
                     positions=batch['positions'], attention_mask=batch['attention_mask'],
                     prefix_len=prefix_len, rngs=rngs)


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
                    grad_accum_steps: int = 1, trainable: Callable | None = None) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics).

  Gradients of the objective's summed `loss_term` are accumulated over `grad_accum_steps`
  micro-batches and divided by its `normalizer` summed over the whole global batch. With
  `trainable` (params -> tree of bools, the optimizer's mask), only trainable parameters are
  differentiated and updated; frozen ones enter the loss as constants. The metrics are the
  objective's, plus `loss` (loss_term / normalizer), `grad_norm`, `learning_rate` and
  `finite` (False when the loss or the gradient norm is not finite).
  """
  trainable = trainable or optimizer_lib.all_trainable

  def train_step(state: TrainState, batch: dict):
    mask = trainable(state.params)  # Python bools: static under jit
    train_params, frozen_params = optimizer_lib.split_trainable(state.params, mask)

    lora = getattr(getattr(model, 'config', None), 'lora', None)
    rngs = None
    if lora is not None and lora.dropout > 0:
      rngs = {'dropout': jax.random.fold_in(jax.random.key(0), state.step)}

    def summed_loss(train_params, batch):
      params = optimizer_lib.merge_trainable(train_params, frozen_params, mask)
      terms = objective.terms(batch, lambda rows: model_logits(model, params, rows, rngs))
      return terms[objective.loss_term], terms

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
    if grad_accum_steps == 1:
      (_, terms), grads = grad_fn(train_params, batch)
    else:
      def accumulate(carry, micro_batch):
        (_, micro_terms), micro_grads = grad_fn(train_params, micro_batch)
        return jax.tree.map(jnp.add, carry, (micro_grads, micro_terms)), None
      zero_grads = jax.tree.map(jnp.zeros_like, train_params)
      zero_terms = jax.tree.map(jnp.zeros_like,
                                jax.eval_shape(summed_loss, train_params, batch)[1])
      (grads, terms), _ = jax.lax.scan(accumulate, (zero_grads, zero_terms),
                                       split_micro_batches(batch, grad_accum_steps))
    normalizer = jnp.maximum(terms[objective.normalizer], 1.0)
    grads = jax.tree.map(lambda grad: grad / normalizer, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, train_params)
    params = optimizer_lib.merge_trainable(
        optax.apply_updates(train_params, updates), frozen_params, mask)
    loss = terms[objective.loss_term] / normalizer
    grad_norm = optax.tree.norm(grads)
    metrics = dict(
        objective.metrics(terms), loss=loss, grad_norm=grad_norm,
        learning_rate=schedule(state.step),
        # The loop stops on a False here and saves nothing of this step.
        finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    )
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, objective: Objective) -> Callable:
  """Returns eval_step(params, batch) -> the objective's summed terms over the batch.

  `batch['example_mask']` marks real rows in a padded last batch; the objective counts only
  those.
  """

  def eval_step(params, batch: dict) -> dict:
    return objective.terms(batch, lambda rows: model_logits(model, params, rows))

  return eval_step
