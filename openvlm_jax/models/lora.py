"""LoRA and QLoRA Dense layers: y = x W + dropout(x) A B * alpha / rank.

`layers.dense` builds a `LoraDense` when it is given a LoRA config (the modules pass theirs
down as a field, from `VLMConfig.layer_lora`). A `LoraDense` whose module path
(e.g. 'llm/layers/attention/q_proj') matches one of `LoraConfig.targets` gets 'lora_a'
[in..., rank] (logical axes of W's inputs + 'lora_rank') and 'lora_b' [rank, out...]
('lora_rank' + W's output axes), B starting at zero; its frozen base kernel is stored as
configured: 'kernel' (float32 or bfloat16), 'kernel_int8' + 'kernel_scale', or 'kernel_nf4'
+ 'kernel_absmax' (`quant.quantize_nf4`'s layout, [in_pad / 2, out...] and [in_pad / 64,
out...], sharded like the kernel's output axes), dequantized inside the layer. Other Dense
layers compute exactly what `nn.DenseGeneral` computes, with the same parameters.

With `LoraConfig.projection_impl == 'pallas'` (from `VLMConfig.projection_impl`), a target
runs x W + (x A) B * alpha / rank as one fused Pallas kernel (`pallas_kernels.lora_projection`;
interpret mode on CPU), whatever its base: float32, bf16, int8 or NF4, the quantized ones
dequantized tile by tile inside the kernel. It falls back to the XLA path while LoRA dropout
is active (the kernel takes one x for both terms; dropout applies to the adapter's input
only). A float base gets its gradient x^T dy from XLA in the backward pass, so a base kernel
that the trainable rules train still trains; when it is frozen, XLA drops that unused matmul.
"""

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as flax_dtypes
from jax.sharding import PartitionSpec as P

from openvlm_jax import parallel
from openvlm_jax.models import matmul, quant
from openvlm_jax.models.config import LoraConfig
from pallas_kernels import lora_projection as pallas_lora

LORA_PARAMS = ('lora_a', 'lora_b')
QUANTIZED_PARAMS = ('kernel_int8', 'kernel_scale', 'kernel_nf4', 'kernel_absmax')
def is_target(config: LoraConfig | None, module_path: str) -> bool:
  """Whether the Dense at `module_path` ('llm/layers/mlp/up_proj') gets adapters."""
  if config is None or config.rank <= 0:
    return False
  module_path = config.path_prefix + module_path
  return any(re.fullmatch(pattern, module_path) for pattern in config.targets)


def lora_a_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Kaiming-uniform (a = sqrt(5)) over the input axes, as PEFT initialises lora_A.

  `shape` is [in..., rank]; the bound is 1 / sqrt(prod(in)).
  """
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)


class LoraDense(nn.Module):
  """`nn.DenseGeneral` over trailing input axes, with LoRA where its path is a target."""

  features: tuple[int, ...]
  axis: tuple[int, ...]
  kernel_names: tuple[str | None, ...]
  bias_names: tuple[str | None, ...] = ()
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)
  lora: LoraConfig | None = None

  def _float_kernel(self, kernel_shape: tuple[int, ...], num_in: int):
    """Creates the base kernel (flat init then reshape, as DenseGeneral does)."""
    def init(key, shape, dtype):
      flat = (math.prod(shape[:num_in]), math.prod(shape[num_in:]))
      return jnp.reshape(self.kernel_init(key, flat, dtype), shape)
    return init

  def _base_kernel(self, kernel_shape: tuple[int, ...], target: bool) -> dict[str, jax.Array]:
    """The stored base arrays by name: {'kernel'} in its stored float dtype, {'kernel_int8',
    'kernel_scale' [1..., out...]} or {'kernel_nf4', 'kernel_absmax'} (`quant`'s layouts)."""
    num_in = len(self.axis)
    float_init = self._float_kernel(kernel_shape, num_in)
    base_dtype = self.lora.base_dtype if target else 'float32'
    if base_dtype not in quant.BASE_DTYPES:
      raise ValueError(f'unknown lora base_dtype {base_dtype!r}; expected {quant.BASE_DTYPES}')
    if base_dtype in ('float32', 'bf16'):
      stored = self.param_dtype if base_dtype == 'float32' else jnp.bfloat16
      return {'kernel': self.param(
          'kernel', nn.with_logical_partitioning(float_init, self.kernel_names), kernel_shape,
          stored)}
    quantize = lambda kernel: quant.quantize_stacked(kernel, base_dtype, 0, tuple(range(num_in)))
    # One float kernel feeds both stored arrays; outside init, flax only checks their shapes.
    initial = None
    if self.is_initializing():
      initial = quantize(float_init(self.make_rng('params'), kernel_shape, jnp.float32))
    def stored(name, names):
      def init(_):
        values = initial if initial is not None else quantize(jnp.zeros(kernel_shape))
        return values[name]
      return self.param(name, nn.with_logical_partitioning(init, names))
    out_names = tuple(self.kernel_names[num_in:])
    if base_dtype == 'int8':
      return {'kernel_int8': stored('kernel_int8', self.kernel_names),
              'kernel_scale': stored('kernel_scale', (None,) * num_in + out_names)}
    # [in_pad / 2, out...] and [in_pad / 64, out...]: the row axis mixes input rows.
    return {'kernel_nf4': stored('kernel_nf4', (None,) + out_names),
            'kernel_absmax': stored('kernel_absmax', (None,) + out_names)}

  def _dense_kernel(self, base: dict[str, jax.Array], kernel_shape: tuple[int, ...]):
    """The base kernel [in..., out...] as a float array (quantized ones in param dtype)."""
    if 'kernel' in base:
      return base['kernel']
    if 'kernel_int8' in base:
      return quant.dequantize_int8(base['kernel_int8'], base['kernel_scale'], self.param_dtype)
    return quant.dequantize_nf4(base['kernel_nf4'], base['kernel_absmax'], kernel_shape,
                                self.param_dtype)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """inputs [..., in...] -> [..., features...]."""
    ndim = inputs.ndim
    axis = tuple(sorted(ax % ndim for ax in self.axis))
    num_in = len(axis)
    in_shape = tuple(inputs.shape[ax] for ax in axis)
    kernel_shape = in_shape + tuple(self.features)
    target = is_target(self.lora, '/'.join(self.path))
    base = self._base_kernel(kernel_shape, target)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.bias_names), tuple(self.features), self.param_dtype)
    if target:
      rank = self.lora.rank
      lora_a = self.param('lora_a', nn.with_logical_partitioning(
          lora_a_init, tuple(self.kernel_names[:num_in]) + ('lora_rank',)),
          in_shape + (rank,), self.param_dtype)
      lora_b = self.param('lora_b', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ('lora_rank',) + tuple(self.kernel_names[num_in:])),
          (rank,) + tuple(self.features), self.param_dtype)
      dropout_active = self.lora.dropout > 0 and self.has_rng('dropout')
      if self.lora.projection_impl == 'pallas' and not dropout_active:
        return self._fused(inputs, axis, base, bias, lora_a, lora_b)
    kernel = self._dense_kernel(base, kernel_shape)
    x, kernel, bias = flax_dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    contract = (axis, tuple(range(num_in)))
    out = matmul.dense_dot_general(x, kernel, (contract, ((), ())))
    if bias is not None:
      out += jnp.reshape(bias, (1,) * (ndim - num_in) + tuple(self.features))
    if not target:
      return out
    lora_input = inputs
    if self.lora.dropout > 0:
      lora_input = nn.Dropout(self.lora.dropout)(
          inputs, deterministic=not self.has_rng('dropout'))
    lora_input, lora_a, lora_b = flax_dtypes.promote_dtype(
        lora_input, lora_a, lora_b, dtype=self.dtype)
    hidden = jax.lax.dot_general(lora_input, lora_a, (contract, ((), ())))  # [..., rank]
    delta = jax.lax.dot_general(hidden, lora_b, (((hidden.ndim - 1,), (0,)), ((), ())))
    return out + delta * jnp.asarray(self.lora.alpha / rank, out.dtype)

  def _fused(self, inputs: jax.Array, axis: tuple[int, ...], base: dict[str, jax.Array],
             bias: jax.Array | None, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """The target's output through the fused Pallas kernel, on 2-D views of every operand."""
    num_in = len(axis)
    inputs = jnp.moveaxis(inputs, axis, tuple(range(inputs.ndim - num_in, inputs.ndim)))
    lead_shape = inputs.shape[:inputs.ndim - num_in]
    in_size = math.prod(lora_a.shape[:-1])
    out_size = math.prod(self.features)
    rank = lora_a.shape[-1]
    x, lora_a, lora_b, bias = flax_dtypes.promote_dtype(
        inputs.reshape(-1, in_size), lora_a, lora_b, bias, dtype=self.dtype)  # x [tokens, in]
    weight_scale = weight_absmax = None
    if 'kernel_nf4' in base:
      weight = base['kernel_nf4'].reshape(-1, out_size)  # [in_pad / 2, out] uint8
      weight_absmax = base['kernel_absmax'].reshape(-1, out_size).astype(jnp.float32)
    elif 'kernel_int8' in base:
      weight = base['kernel_int8'].reshape(in_size, out_size)  # [in, out] int8
      weight_scale = base['kernel_scale'].reshape(out_size).astype(jnp.float32)  # [out]
    else:
      weight = base['kernel'].reshape(in_size, out_size).astype(x.dtype)  # [in, out]
    out = _per_device_projection(
        self.lora.alpha / rank, x, weight, weight_scale, weight_absmax,
        lora_a.reshape(in_size, rank), lora_b.reshape(rank, out_size),
        out_name=self.kernel_names[num_in], out_lead_size=self.features[0])
    if bias is not None:
      out = out + bias.reshape(1, out_size)
    return out.reshape(*lead_shape, *self.features)  # [..., out...]


def _per_device_projection(scale: float, x: jax.Array, weight: jax.Array,
                           weight_scale: jax.Array | None, weight_absmax: jax.Array | None,
                           lora_a: jax.Array, lora_b: jax.Array, *, out_name: str | None,
                           out_lead_size: int) -> jax.Array:
  """`_fused_projection` once per device under a mesh (shard_map), else directly.

  Tokens split over the mesh axes of 'batch'; output columns over those of the layer's first
  output axis name (`out_name`, whose size is `out_lead_size`) when they differ from the token
  axes; input dimensions stay whole, so XLA gathers a sharded input axis of W first, as FSDP
  does. Every operand with an output dimension (W, its scale or absmax, lora_b) is split with
  it, so each device computes its own [tokens, out] block and nothing is summed.
  """
  out_size = lora_b.shape[1]
  token_axes = parallel.kernel_mesh_axes('batch', x.shape[0])
  out_axes = parallel.kernel_mesh_axes(out_name, out_size, out_lead_size) if out_name else None
  as_tuple = lambda axes: () if axes is None else (axes,) if isinstance(axes, str) else axes
  if set(as_tuple(out_axes)) & set(as_tuple(token_axes)):
    out_axes = None  # one mesh axis cannot split two dimensions of the output
  if token_axes is None and out_axes is None:
    return _fused_projection(scale, x, weight, weight_scale, weight_absmax, lora_a, lora_b)
  columns = P(None, out_axes)  # [rows, out] operands
  optional_spec = lambda operand, spec: None if operand is None else spec
  return jax.shard_map(
      functools.partial(_fused_projection, scale),
      in_specs=(P(token_axes, None), columns, optional_spec(weight_scale, P(out_axes)),
                optional_spec(weight_absmax, columns), P(None, None), columns),
      out_specs=P(token_axes, out_axes), check_vma=False,
  )(x, weight, weight_scale, weight_absmax, lora_a, lora_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_projection(scale: float, x: jax.Array, weight: jax.Array,
                      weight_scale: jax.Array | None, weight_absmax: jax.Array | None,
                      lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
  """x [tokens, in] -> [tokens, out] by the Pallas kernel, with a gradient for a float W."""
  return pallas_lora.lora_projection(x, weight, lora_a, lora_b, scale=scale,
                                     weight_scale=weight_scale, weight_absmax=weight_absmax)


def _fused_projection_fwd(scale, x, weight, weight_scale, weight_absmax, lora_a, lora_b):
  kernel = lambda x, lora_a, lora_b: pallas_lora.lora_projection(
      x, weight, lora_a, lora_b, scale=scale, weight_scale=weight_scale,
      weight_absmax=weight_absmax)
  out, kernel_vjp = jax.vjp(kernel, x, lora_a, lora_b)
  return out, (kernel_vjp, x, weight)


def _fused_projection_bwd(scale, residuals, out_grad):
  kernel_vjp, x, weight = residuals
  x_grad, lora_a_grad, lora_b_grad = kernel_vjp(out_grad)
  weight_grad = None  # a quantized base never trains
  if jnp.issubdtype(weight.dtype, jnp.floating):  # x^T dy; dropped by XLA when W is frozen
    weight_grad = jnp.dot(x.T, out_grad, preferred_element_type=jnp.float32).astype(weight.dtype)
  return x_grad, weight_grad, None, None, lora_a_grad, lora_b_grad


_fused_projection.defvjp(_fused_projection_fwd, _fused_projection_bwd)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)


def without_adapters(params: Any) -> Any:
  """`params` with every 'lora_b' set to zero: the adapters switched off, the base model as
  it computes under LoRA (quantized kernels stay as stored). Other leaves are unchanged."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.zeros_like(leaf) if _path_names(path)[-1:] == ('lora_b',) else leaf,
      params)


def merge_params(params: Any, lora: LoraConfig) -> Any:
  """Unboxed params with every adapted kernel replaced by W + A B * alpha / rank, float32.

  Quantized kernels are dequantized first; 'lora_a'/'lora_b' and the quantized arrays are
  dropped, so the result has the layout of the same model without LoRA. Works on scanned
  (stacked) and unrolled layers.
  """
  scale = lora.alpha / max(lora.rank, 1)

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    if 'lora_a' not in tree and not any(name in tree for name in QUANTIZED_PARAMS):
      return {key: walk(value) for key, value in tree.items()}
    merged = {k: v for k, v in tree.items() if k not in LORA_PARAMS + QUANTIZED_PARAMS}
    kernel = dequantized_kernel(tree)
    if 'lora_a' in tree:
      lora_a = np.asarray(tree['lora_a'], np.float32)  # [stack..., in..., rank]
      lora_b = np.asarray(tree['lora_b'], np.float32)  # [stack..., rank, out...]
      num_lead = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim
      lead = lora_a.shape[:num_lead]
      a_flat = lora_a.reshape(*lead, -1, lora_a.shape[-1])
      b_flat = lora_b.reshape(*lead, lora_b.shape[num_lead], -1)
      kernel = kernel + (np.matmul(a_flat, b_flat) * scale).reshape(kernel.shape)
    merged['kernel'] = kernel
    return merged

  return walk(jax.device_get(params))


def dequantized_kernel(layer_params: dict) -> np.ndarray:
  """The float32 base kernel of one Dense's params (stacked or not), whatever its storage.

  An NF4 kernel's shape is read off its adapters: [stack..., in..., out...]; its stacked
  axes are those where packed and absmax agree (their row axes differ: in_pad / 2 vs / 64).
  """
  if 'kernel' in layer_params:
    return np.asarray(layer_params['kernel'], np.float32)
  if 'kernel_int8' in layer_params:
    return np.asarray(quant.dequantize_int8(layer_params['kernel_int8'],
                                            layer_params['kernel_scale']))
  packed, absmax = layer_params['kernel_nf4'], layer_params['kernel_absmax']
  num_lead = next(i for i, (p, a) in enumerate(zip(packed.shape, absmax.shape)) if p != a)
  shape = (layer_params['lora_a'].shape[num_lead:-1]
           + layer_params['lora_b'].shape[num_lead + 1:])
  dequantize = lambda p, a: quant.dequantize_nf4(p, a, shape)
  for _ in range(num_lead):
    dequantize = jax.vmap(dequantize)
  return np.asarray(dequantize(jnp.asarray(packed), jnp.asarray(absmax)))


def adapt_params(float_params: Any, abstract_params: Any, lora: LoraConfig,
                 rng: jax.Array) -> Any:
  """Turns a float params tree (e.g. imported from Hugging Face) into the LoRA model's tree.

  Kernels of targets are quantized as `abstract_params` (the LoRA model's unboxed shapes)
  stores them; 'lora_a' is freshly initialised, 'lora_b' zero. Other leaves pass through.
  """
  counter = iter(range(1 << 30))

  def walk(floats, abstract, path):
    if not isinstance(abstract, dict):
      return floats
    if 'lora_a' not in abstract:
      return {key: walk(floats[key], value, path + (key,)) for key, value in abstract.items()}
    out = {k: floats[k] for k in abstract if k in floats}
    lead = 1 if 'layers' in path else 0
    shape_a = abstract['lora_a'].shape
    for name in QUANTIZED_PARAMS:
      if name in abstract and name not in out:
        kernel = floats['kernel']
        num_in = len(shape_a) - 1 - lead
        base = 'int8' if 'kernel_int8' in abstract else 'nf4'
        out.update(quant.quantize_stacked(kernel, base, lead, tuple(range(num_in))))
        break
    if 'kernel' in abstract:
      out['kernel'] = jnp.asarray(floats['kernel'], abstract['kernel'].dtype)
    key = jax.random.fold_in(rng, next(counter))
    init = lora_a_init
    for _ in range(lead):
      init = jax.vmap(init, in_axes=(0, None, None))
    keys = jax.random.split(key, shape_a[0]) if lead else key
    out['lora_a'] = init(keys, shape_a[lead:], abstract['lora_a'].dtype)
    out['lora_b'] = jnp.zeros(abstract['lora_b'].shape, abstract['lora_b'].dtype)
    return {k: out[k] for k in abstract}

  return walk(float_params, abstract_params, ())
