"""optax AdamW with linear warmup, cosine decay and global-norm clipping; trainable masks.

`config.trainable` rules pick the parameters that train; the others get no optimizer state
(`optax.masked`) and no gradient (the step differentiates the trainable subtree only).
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from openvlm_jax.models import lora as lora_lib


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `config.lr`, then cosine decay to `lr * min_lr_ratio`."""
  warmup_steps = min(config.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.lr,
      warmup_steps=warmup_steps,
      decay_steps=max(num_steps, warmup_steps + 1),
      end_value=config.lr * config.min_lr_ratio,
  )


def decay_mask(params):
  """Weight decay on weight matrices and embeddings only, not on norms or biases."""

  def is_decayed(path, _):
    names = {str(getattr(key, 'key', getattr(key, 'name', ''))) for key in path}
    return bool(names & {'kernel', 'embedding'})

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int,
                   trainable: Callable | None = None):
  """Returns (optimizer, schedule) for `config.optimizer`.

  With `trainable` (params -> tree of bools, see `trainable_fn`), the optimizer keeps state
  for trainable parameters only and takes gradients shaped like `split_trainable(...)[0]`.
  """
  schedule = learning_rate_schedule(config, num_steps)
  optimizer = optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )
  if trainable is not None:
    optimizer = optax.masked(optimizer, trainable)
  return optimizer, schedule


def path_string(path) -> str:
  """'llm/layers/mlp/up_proj/kernel' from a pytree key path (box attributes skipped)."""
  return '/'.join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))


def trainable_fn(rules: Sequence[tuple[str, bool]], lora_on: bool = False) -> Callable:
  """params -> tree of bools: does each parameter train?

  The first `(regex, trains)` rule whose regex fully matches the path wins. Unmatched
  parameters train, except that with LoRA on only the adapters ('lora_a', 'lora_b') do.
  Quantized base weights (integer arrays, their scales) never train.
  """
  compiled = [(re.compile(pattern), bool(trains)) for pattern, trains in rules]

  def trains(path, leaf) -> bool:
    name = path_string(path)
    if name.rsplit('/', 1)[-1] in lora_lib.QUANTIZED_PARAMS:
      return False
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      return False
    for pattern, value in compiled:
      if pattern.fullmatch(name):
        return value
    return not lora_on or name.rsplit('/', 1)[-1] in lora_lib.LORA_PARAMS

  return lambda params: jax.tree_util.tree_map_with_path(trains, params)


def all_trainable(params):
  """The mask under which every parameter trains."""
  return jax.tree.map(lambda _: True, params)


def split_trainable(params, mask) -> tuple[Any, Any]:
  """(trainable, frozen): two trees shaped like `params`, `optax.MaskedNode()` where absent."""
  trainable = jax.tree.map(lambda m, p: p if m else optax.MaskedNode(), mask, params)
  frozen = jax.tree.map(lambda m, p: optax.MaskedNode() if m else p, mask, params)
  return trainable, frozen


def merge_trainable(trainable, frozen, mask):
  """Inverse of `split_trainable`."""
  return jax.tree.map(lambda m, t, f: t if m else f, mask, trainable, frozen)


def count_trainable(params, mask) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  sizes = jax.tree.map(lambda p, m: (p.size, p.size * bool(m)), params, mask)
  pairs = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
  return sum(pair[1] for pair in pairs), sum(pair[0] for pair in pairs)
