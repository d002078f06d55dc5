"""Fused (Q)LoRA projection in Pallas: y = x dequant(W) + scale (x A) B in one kernel.

W is frozen: bfloat16 / float32, or int8 with a per-output-channel scale. Each program owns a
[block_m, block_n] tile of y and loops over the input dimension in blocks, accumulating x W
and x A in float32; the low-rank term is added to the tile before it is written, so neither
the dequantized W nor x A B ever reach memory. The backward pass (x, A, B; W gets no
gradient) uses XLA matmuls.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# (block_m, block_n, block_k) per backend.
_BLOCK_TABLE = {'gpu': (64, 128, 64), 'tpu': (256, 256, 512), 'cpu': (128, 128, 256)}


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _next_power_of_2(value: int) -> int:
  return 1 << max(value - 1, 0).bit_length()


def default_block_sizes(rows: int, in_features: int, out_features: int,
                        backend: str | None = None) -> tuple[int, int, int]:
  """(block_m, block_n, block_k) from the per-backend table, shrunk for small operands."""
  block_m, block_n, block_k = _BLOCK_TABLE.get(backend or jax.default_backend(),
                                               _BLOCK_TABLE['cpu'])
  return (min(block_m, max(16, _next_power_of_2(rows))),
          min(block_n, max(16, _next_power_of_2(out_features))),
          min(block_k, max(16, _next_power_of_2(in_features))))


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  quantized: bool
  block_m: int
  block_n: int
  block_k: int
  interpret: bool


def _kernel(x_ref, w_ref, w_scale_ref, a_ref, b_ref, y_ref, *, static):
  """One [block_m, block_n] tile of y."""
  block_m, block_k = x_ref.shape[0], static.block_k
  rank = a_ref.shape[1]
  compute = x_ref.dtype

  def body(step, carry):
    base, low = carry
    start = step * block_k
    x = x_ref[:, pl.ds(start, block_k)].astype(compute)  # [block_m, block_k]
    w = w_ref[pl.ds(start, block_k), :].astype(compute)  # [block_k, block_n]
    a = a_ref[pl.ds(start, block_k), :].astype(compute)  # [block_k, rank]
    base = base + jnp.dot(x, w, preferred_element_type=jnp.float32)
    low = low + jnp.dot(x, a, preferred_element_type=jnp.float32)
    return base, low

  num_steps = x_ref.shape[1] // block_k
  init = (jnp.zeros((block_m, y_ref.shape[1]), jnp.float32),
          jnp.zeros((block_m, rank), jnp.float32))
  base, low = lax.fori_loop(0, num_steps, body, init)
  if static.quantized:
    base = base * w_scale_ref[...].astype(jnp.float32)  # [1, block_n]
  b = b_ref[...]
  low = low.astype(b.dtype).astype(compute)
  update = jnp.dot(low, b.astype(compute), preferred_element_type=jnp.float32)
  y_ref[...] = (base + static.scale * update).astype(y_ref.dtype)


def _pad2(x, rows, cols):
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _forward(static, x, weight, weight_scale, lora_a, lora_b):
  """x [m, k] -> y [m, n], padding every dimension to its block."""
  rows, in_features = x.shape
  out_features, rank = weight.shape[1], lora_a.shape[1]
  m_pad = _round_up(rows, static.block_m)
  n_pad = _round_up(out_features, static.block_n)
  k_pad = _round_up(in_features, static.block_k)
  rank_pad = rank if static.interpret else _round_up(rank, 16)
  x_p = _pad2(x, m_pad, k_pad)
  w_p = _pad2(weight, k_pad, n_pad)
  scale_p = _pad2(weight_scale.reshape(1, -1), 1, n_pad)
  a_p = _pad2(lora_a, k_pad, rank_pad)
  b_p = _pad2(lora_b, rank_pad, n_pad)
  y = pl.pallas_call(
      functools.partial(_kernel, static=static),
      grid=(m_pad // static.block_m, n_pad // static.block_n),
      in_specs=[
          pl.BlockSpec((static.block_m, k_pad), lambda i, j: (i, 0)),
          pl.BlockSpec((k_pad, static.block_n), lambda i, j: (0, j)),
          pl.BlockSpec((1, static.block_n), lambda i, j: (0, j)),
          pl.BlockSpec((k_pad, rank_pad), lambda i, j: (0, 0)),
          pl.BlockSpec((rank_pad, static.block_n), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((static.block_m, static.block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
      interpret=static.interpret,
      name='lora_projection',
  )(x_p, w_p, scale_p, a_p, b_p)
  return y[:rows, :out_features]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_core(static, x, weight, weight_scale, lora_a, lora_b):
  return _forward(static, x, weight, weight_scale, lora_a, lora_b)


def _lora_core_fwd(static, x, weight, weight_scale, lora_a, lora_b):
  y = _forward(static, x, weight, weight_scale, lora_a, lora_b)
  return y, (x, weight, weight_scale, lora_a, lora_b)


def _lora_core_bwd(static, residuals, d_y):
  x, weight, weight_scale, lora_a, lora_b = residuals
  # XLA:CPU lacks some bf16 x bf16 -> f32 dots (DotThunk); bf16 products are exact in float32.
  compute = jnp.float32 if static.interpret else x.dtype
  d_y32 = d_y.astype(jnp.float32)
  if static.quantized:  # (dy * s) W^T: the scale goes on dy, W is only cast
    d_base = (d_y32 * weight_scale.astype(jnp.float32)[None, :]).astype(compute)
  else:
    d_base = d_y
  d_x = jnp.dot(d_base.astype(compute), weight.astype(compute).T,
                preferred_element_type=jnp.float32)
  d_low = jnp.dot(d_y.astype(compute), lora_b.astype(compute).T,
                  preferred_element_type=jnp.float32) * static.scale  # [m, rank]
  d_x = d_x + jnp.dot(d_low.astype(compute), lora_a.astype(compute).T,
                      preferred_element_type=jnp.float32)
  d_a = jnp.dot(x.astype(compute).T, d_low.astype(compute), preferred_element_type=jnp.float32)
  low = jnp.dot(x.astype(compute), lora_a.astype(compute),
                preferred_element_type=jnp.float32)  # [m, rank]
  d_b = jnp.dot(low.T.astype(compute), d_y.astype(compute),
                preferred_element_type=jnp.float32) * static.scale
  return (d_x.astype(x.dtype), None, None, d_a.astype(lora_a.dtype), d_b.astype(lora_b.dtype))


_lora_core.defvjp(_lora_core_fwd, _lora_core_bwd)


def lora_projection(
    x: jax.Array,
    weight: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    *,
    scale: float,
    weight_scale: jax.Array | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """x dequant(W) + scale (x A) B, fused; differentiable in x, lora_a and lora_b.

  Args:
    x: [..., in_features], float32 or bfloat16 (the compute dtype).
    weight: [in_features, out_features] frozen: float, or int8 with `weight_scale`.
    lora_a: [in_features, rank].
    lora_b: [rank, out_features].
    scale: the LoRA scale (alpha / rank).
    weight_scale: [out_features] per-channel scale of an int8 weight; None for a float weight.
    block_m, block_n, block_k: tile sizes; `default_block_sizes` by default.
    interpret: run in the Pallas interpreter; default: on CPU.

  Returns:
    [..., out_features] in x's dtype. The weight gets no gradient (it is frozen).
  """
  in_features, out_features = weight.shape
  quantized = weight_scale is not None
  if quantized != (weight.dtype == jnp.int8):
    raise ValueError('give weight_scale exactly when the weight is int8')
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == 'cpu'
  leading = x.shape[:-1]
  flat_x = x.reshape(-1, in_features)
  default_m, default_n, default_k = default_block_sizes(
      flat_x.shape[0], in_features, out_features, backend)
  static = _Static(scale=float(scale), quantized=quantized, block_m=block_m or default_m,
                   block_n=block_n or default_n, block_k=block_k or default_k,
                   interpret=bool(interpret))
  if weight_scale is None:
    weight_scale = jnp.ones((out_features,), jnp.float32)
  y = _lora_core(static, flat_x, weight, weight_scale, lora_a, lora_b)
  return y.reshape(*leading, out_features)
