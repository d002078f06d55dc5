"""optax AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import ml_collections
import optax


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


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int):
  """Returns (optimizer, schedule) for `config.optimizer`."""
  schedule = learning_rate_schedule(config, num_steps)
  optimizer = optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )
  return optimizer, schedule
