"""Building blocks shared by the decoder and the vision tower.

Dense layers and norms carry logical axis names (MaxText style); `make_layer_stack` builds a
stack of identical layers either scanned (`nn.scan`, one parameter tree with a leading
'layers' axis) or unrolled (`layers_0`, `layers_1`, ...), with an optional remat policy.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvlm_jax.models import lora as lora_lib
from openvlm_jax.models import matmul
from openvlm_jax.models.config import LoraConfig

Dtype = Any
LogicalNames = tuple[str | None, ...]

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

kernel_init = nn.initializers.normal(stddev=0.02)


def to_dtype(name_or_dtype: str | Dtype) -> Dtype:
  """Maps 'float32' | 'bfloat16' | 'float16' (or a dtype) to a jnp dtype."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in DTYPES:
      raise ValueError(f'unknown dtype {name_or_dtype!r}; expected one of {sorted(DTYPES)}')
    return DTYPES[name_or_dtype]
  return name_or_dtype


class _Reshaped(nn.LogicallyPartitioned):
  """A named kernel or bias that `nn.DenseGeneral` creates flat and then reshapes.

  DenseGeneral unboxes the flat array before the reshape; under a mesh, a plain box would
  then constrain it with more axis names than it has dimensions and fail. This box constrains
  only an array of the named rank.
  """

  def unbox(self, apply_constraint: bool = True) -> Any:
    return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _named_init(initializer, names: LogicalNames):
  """`initializer` boxed with logical `names`, safe for DenseGeneral's flat-then-reshape."""
  def init(key, shape, dtype=jnp.float32):
    return _Reshaped(initializer(key, shape, dtype), tuple(names))
  return init


def dense(
    features: int | Sequence[int],
    kernel_names: LogicalNames,
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = False,
    bias_names: LogicalNames = (),
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
    lora: LoraConfig | None = None,
) -> nn.Module:
  """A `nn.DenseGeneral` whose kernel and bias carry logical axis names.

  `kernel_names` names every kernel axis (contracted axes first, then features);
  `bias_names` names the feature axes. With a `lora` config (rank > 0), a `LoraDense` with
  the same parameters, plus adapters where its module path is one of the config's targets.
  """
  if lora is not None and lora.rank > 0:
    features = (features,) if isinstance(features, int) else tuple(features)
    return lora_lib.LoraDense(
        features=features, axis=(axis,) if isinstance(axis, int) else tuple(axis),
        kernel_names=tuple(kernel_names), bias_names=tuple(bias_names), use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, lora=lora,
        name=name)
  return nn.DenseGeneral(
      features=features,
      axis=axis,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=_named_init(kernel_init, kernel_names),
      bias_init=_named_init(nn.initializers.zeros_init(), bias_names),
      dot_general=matmul.dense_dot_general,
      name=name,
  )


def rms_norm(
    eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None
) -> nn.RMSNorm:
  """RMSNorm with a learned scale (Llama): x / sqrt(mean(x^2) + eps) * scale."""
  return nn.RMSNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
      name=name,
  )


def layer_norm(
    eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None
) -> nn.LayerNorm:
  """LayerNorm with scale and bias (ViT), variance computed the two-pass way."""
  return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)),
      name=name,
  )


def remat_policy(name: str):
  """Maps a config's remat name to a `jax.checkpoint` policy ('full' saves nothing)."""
  policies = {
      'full': None,
      'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  if name not in policies:
    raise ValueError(f"unknown remat {name!r}; expected 'none', 'full' or 'dots'")
  return policies[name]


def make_layer_stack(
    layer_cls: type[nn.Module],
    *,
    num_layers: int,
    scan: bool,
    remat: str,
    in_axes: tuple[Any, ...],
    **layer_kwargs,
) -> nn.Module | list[nn.Module]:
  """Builds `num_layers` copies of `layer_cls` (call it from a module's `setup`).

  The layer's `__call__(carry, *args)` returns `(carry, None)`. `in_axes` gives, per extra
  argument, `nn.broadcast` (same for every layer) or 0 (sliced along the layer axis).
  With `scan`, returns one scanned module whose parameters get a leading axis with logical
  name 'layers'; without, a list of modules (named `<attribute>_<i>` by linen).
  """
  if remat != 'none':
    layer_cls = nn.remat(layer_cls, policy=remat_policy(remat), prevent_cse=not scan)
  if not scan:
    return [layer_cls(**layer_kwargs) for _ in range(num_layers)]
  scanned_cls = nn.scan(
      layer_cls,
      variable_axes={'params': 0},
      split_rngs={'params': True, 'dropout': True},
      in_axes=in_axes,
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: 'layers'},
  )
  return scanned_cls(**layer_kwargs)


def apply_layer_stack(
    stack: nn.Module | list[nn.Module],
    carry: Any,
    args: tuple[Any, ...],
    in_axes: tuple[Any, ...],
) -> Any:
  """Runs a stack from `make_layer_stack` and returns the final carry."""
  if not isinstance(stack, (list, tuple)):
    carry, _ = stack(carry, *args)
    return carry
  for index, layer in enumerate(stack):
    layer_args = [arg[index] if axis == 0 else arg for arg, axis in zip(args, in_axes)]
    carry, _ = layer(carry, *layer_args)
  return carry
