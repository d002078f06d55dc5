"""The train state and its creation, sharded by the parameters' logical axes."""

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from openvlm_jax import parallel


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes: a plain pytree."""

  step: jax.Array
  params: Any
  opt_state: Any


def abstract_boxed_params(model: nn.Module, example_inputs: dict) -> Any:
  """Parameter shapes and logical axes (as `nn.Partitioned` boxes), computed without FLOPs."""
  return jax.eval_shape(
      lambda rng: model.init(rng, **example_inputs)['params'], jax.random.key(0))


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation,
                    example_inputs: dict, mesh: Mesh, rules) -> TrainState:
  """NamedShardings of every leaf of the train state, from the logical-axis rules."""
  boxed_params = abstract_boxed_params(model, example_inputs)
  boxed_opt_state = jax.eval_shape(optimizer.init, boxed_params)
  return TrainState(
      step=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      params=parallel.logical_shardings(boxed_params, mesh, rules),
      opt_state=_masked_aware_shardings(boxed_opt_state, mesh, rules),
  )


def _masked_aware_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """`parallel.logical_shardings`, keeping the empty `optax.MaskedNode`s of frozen params."""
  def is_masked(node):
    value = node.value if isinstance(node, nn.Partitioned) else node
    return isinstance(value, optax.MaskedNode)
  return jax.tree.map(
      lambda node: optax.MaskedNode() if is_masked(node)
      else parallel.logical_shardings(node, mesh, rules),
      boxed_tree, is_leaf=lambda node: is_masked(node) or isinstance(node, nn.Partitioned))


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation,
                       example_inputs: dict, shardings: TrainState, rng: jax.Array,
                       params: Optional[Any] = None,
                       param_init: Optional[Callable] = None) -> TrainState:
  """A fresh train state placed with `shardings`.

  `params` (already placed, e.g. imported from Hugging Face) are used as given; otherwise they
  are initialised from `rng` directly into their shards.
  """
  if params is None:
    init = param_init or (lambda key: nn.unbox(model.init(key, **example_inputs)['params']))
    params = jax.jit(init, out_shardings=shardings.params)(rng)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state)
