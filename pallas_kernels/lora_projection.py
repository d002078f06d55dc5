"""Fused (Q)LoRA projection in Pallas: y = x dequant(W) + scale (x A) B in one kernel.

W is frozen: bfloat16 / float32, int8 with a per-output-channel scale, or NF4 (4-bit
NormalFloat codes in blocks of 64 input rows, each block with its own absmax; layout below).
Each program owns a [block_m, block_n] tile of y and loops over the input dimension in
blocks, accumulating x W and x A in float32; the low-rank term is added to the tile before it
is written, so neither the dequantized W nor x A B ever reach memory. The backward pass (x, A,
B; W gets no gradient) uses XLA matmuls on the dequantized W.

NF4 layout (what `openvlm_jax.models.quant.quantize_nf4` stores, on a 2-D [in, out] view):
`in` is zero-padded to `in_pad`, a multiple of NF4_ROW_MULTIPLE (128); a block is 64
consecutive input rows of one output column (as bitsandbytes blocks torch's [out, in] weight);
absmax is float32 [in_pad / 64, out]; packed is uint8 [in_pad / 2, out], where byte row r holds
the code of row r in its low nibble and of row r + in_pad / 2 in its high nibble. So
x W = x[:, :in_pad/2] W_low + x[:, in_pad/2:] W_high with contiguous slices, and a
[rows, block_n] tile of packed codes needs the [rows / 64, block_n] tile of absmax: the kernel
reads it a row at a time through ref slices and decodes codes with a tree of selects, with no
reshape or gather in the kernel.

`backend` picks block sizes and compiler parameters: the Triton lowering on GPU
(`pallas.triton.CompilerParams`), Mosaic on TPU (`pallas.tpu.CompilerParams`, block shapes
whose last two dims are multiples of (8, 128) or whole), the interpreter on CPU. Tests export
the kernel and its gradient for CUDA and TPU from a CPU machine: that shows they lower to
Triton / Mosaic, not that they compile or run on the hardware.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

NF4_BLOCK = 64  # input rows that share one absmax
NF4_ROW_MULTIPLE = 128  # the input dimension is zero-padded to a multiple of this
# The NormalFloat4 code values of the QLoRA paper (as in bitsandbytes), code i -> NF4_CODE[i].
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
BACKENDS = ('cpu', 'gpu', 'tpu')

# (block_m, block_n, block_k) per backend, and the smallest each may shrink to for small
# operands (TPU: 128 lanes for the n and k tiles; Triton: dot dimensions of at least 16).
_BLOCK_TABLE = {'gpu': (64, 128, 64), 'tpu': (256, 256, 512), 'cpu': (128, 128, 256)}
_MIN_BLOCK = {'gpu': (16, 16, 16), 'tpu': (16, 128, 128), 'cpu': (16, 16, 16)}


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _next_power_of_2(value: int) -> int:
  return 1 << max(value - 1, 0).bit_length()


def default_block_sizes(rows: int, in_features: int, out_features: int,
                        backend: str | None = None) -> tuple[int, int, int]:
  """(block_m, block_n, block_k) from the per-backend table, shrunk for small operands.

  All three are powers of two. For an NF4 weight, `in_features` is the packed row count
  (in_pad / 2) and block_k is further halved until it divides it (`_nf4_block_k`).
  """
  backend = backend or jax.default_backend()
  block_m, block_n, block_k = _BLOCK_TABLE.get(backend, _BLOCK_TABLE['cpu'])
  min_m, min_n, min_k = _MIN_BLOCK.get(backend, _MIN_BLOCK['cpu'])
  return (min(block_m, max(min_m, _next_power_of_2(rows))),
          min(block_n, max(min_n, _next_power_of_2(out_features))),
          min(block_k, max(min_k, _next_power_of_2(in_features))))


def _nf4_block_k(half_rows: int, block_k: int) -> int:
  """The largest power of two <= max(block_k, 64) that divides `half_rows` (a multiple of 64)."""
  block_k = max(NF4_BLOCK, block_k)
  while half_rows % block_k:
    block_k //= 2
  return block_k


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  weight_kind: str  # 'float' | 'int8' | 'nf4'
  block_m: int
  block_n: int
  block_k: int
  interpret: bool
  backend: str


def _decode_nf4(codes: jax.Array) -> jax.Array:
  """int32 codes in 0..15 -> their NF4 values in float32, by a tree of 15 selects on the bits."""
  values = [np.float32(value) for value in NF4_CODE]
  for bit in range(4):
    is_set = (codes & (1 << bit)) != 0
    values = [jnp.where(is_set, high, low) for low, high in zip(values[0::2], values[1::2])]
  return values[0]


def _absmax_tile(absmax_ref, first_row, num_rows: int) -> jax.Array:
  """[num_rows, block_n]: row r gets absmax row `first_row + r // 64` (read as [1, n] slices)."""
  block_n = absmax_ref.shape[1]
  tile = jnp.broadcast_to(absmax_ref[pl.ds(first_row, 1), :], (num_rows, block_n))
  row = lax.broadcasted_iota(jnp.int32, (num_rows, block_n), 0)
  for sub_block in range(1, num_rows // NF4_BLOCK):
    tile = jnp.where(row >= sub_block * NF4_BLOCK,
                     absmax_ref[pl.ds(first_row + sub_block, 1), :], tile)
  return tile


def _kernel(x_ref, w_ref, aux_ref, a_ref, b_ref, y_ref, *, static):
  """One [block_m, block_n] tile of y.

  x_ref [block_m, k_pad], a_ref [k_pad, rank], b_ref [rank, block_n]; float / int8: w_ref
  [k_pad, block_n] and aux_ref the weight scale [1, block_n]; NF4: w_ref the packed codes
  [k_pad / 2, block_n] and aux_ref the absmax [k_pad / 64, block_n].
  """
  block_m, block_k = x_ref.shape[0], static.block_k
  rank = a_ref.shape[1]
  compute = x_ref.dtype
  nf4 = static.weight_kind == 'nf4'
  half_rows = w_ref.shape[0]  # NF4: the packed rows; x's high half starts here

  def base_and_low_rank(x, w, a):
    return (jnp.dot(x, w.astype(compute), preferred_element_type=jnp.float32),
            jnp.dot(x, a.astype(compute), preferred_element_type=jnp.float32))

  def body(step, carry):
    base, low = carry
    start = pl.multiple_of(step * block_k, block_k)
    if not nf4:
      x = x_ref[:, pl.ds(start, block_k)].astype(compute)  # [block_m, block_k]
      w = w_ref[pl.ds(start, block_k), :]  # [block_k, block_n]
      a = a_ref[pl.ds(start, block_k), :]  # [block_k, rank]
      base_step, low_step = base_and_low_rank(x, w, a)
      return base + base_step, low + low_step
    codes = w_ref[pl.ds(start, block_k), :].astype(jnp.int32)  # [block_k, block_n]
    first_row = step * (block_k // NF4_BLOCK)
    for offset, nibble in ((0, codes & 0xF), (half_rows, codes >> 4)):
      absmax = _absmax_tile(aux_ref, first_row + offset // NF4_BLOCK, block_k)
      w = _decode_nf4(nibble) * absmax  # [block_k, block_n] float32
      x = x_ref[:, pl.ds(offset + start, block_k)].astype(compute)
      a = a_ref[pl.ds(offset + start, block_k), :]
      base_step, low_step = base_and_low_rank(x, w, a)
      base, low = base + base_step, low + low_step
    return base, low

  num_steps = (half_rows if nf4 else x_ref.shape[1]) // block_k
  init = (jnp.zeros((block_m, y_ref.shape[1]), jnp.float32),
          jnp.zeros((block_m, rank), jnp.float32))
  base, low = lax.fori_loop(0, num_steps, body, init)
  if static.weight_kind == 'int8':
    base = base * aux_ref[...].astype(jnp.float32)  # [1, block_n]
  b = b_ref[...]
  low = low.astype(b.dtype).astype(compute)
  update = jnp.dot(low, b.astype(compute), preferred_element_type=jnp.float32)
  y_ref[...] = (base + static.scale * update).astype(y_ref.dtype)


def _pad2(x, rows, cols):
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _compiler_params(static: _Static):
  if static.interpret:
    return None
  if static.backend == 'gpu':
    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  if static.backend == 'tpu':
    return pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel'))
  return None


def _forward(static, x, weight, weight_aux, lora_a, lora_b):
  """x [m, in] -> y [m, out], padding every dimension to its block."""
  rows, in_features = x.shape
  out_features, rank = weight.shape[1], lora_a.shape[1]
  m_pad = _round_up(rows, static.block_m)
  n_pad = _round_up(out_features, static.block_n)
  if static.weight_kind == 'nf4':
    k_pad = 2 * weight.shape[0]
    w_p = _pad2(weight, weight.shape[0], n_pad)  # [k_pad / 2, n_pad] uint8
    aux_p = _pad2(weight_aux.astype(jnp.float32), weight_aux.shape[0], n_pad)  # absmax
  else:
    k_pad = _round_up(in_features, static.block_k)
    w_p = _pad2(weight, k_pad, n_pad)
    aux_p = _pad2(weight_aux.astype(jnp.float32).reshape(1, -1), 1, n_pad)  # [1, n_pad]
  rank_pad = rank if static.interpret else _round_up(rank, 16)
  x_p = _pad2(x, m_pad, k_pad)
  a_p = _pad2(lora_a, k_pad, rank_pad)
  b_p = _pad2(lora_b, rank_pad, n_pad)
  y = pl.pallas_call(
      functools.partial(_kernel, static=static),
      grid=(m_pad // static.block_m, n_pad // static.block_n),
      in_specs=[
          pl.BlockSpec((static.block_m, k_pad), lambda i, j: (i, 0)),
          pl.BlockSpec((w_p.shape[0], static.block_n), lambda i, j: (0, j)),
          pl.BlockSpec((aux_p.shape[0], static.block_n), lambda i, j: (0, j)),
          pl.BlockSpec((k_pad, rank_pad), lambda i, j: (0, 0)),
          pl.BlockSpec((rank_pad, static.block_n), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((static.block_m, static.block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
      compiler_params=_compiler_params(static),
      interpret=static.interpret,
      name='lora_projection',
  )(x_p, w_p, aux_p, a_p, b_p)
  return y[:rows, :out_features]


def dequantize_nf4(packed: jax.Array, absmax: jax.Array) -> jax.Array:
  """NF4 in the layout above -> float32 [in_pad, out], with the kernel's select-tree decode.

  packed uint8 [in_pad / 2, out], absmax [in_pad / 64, out].
  """
  codes = packed.astype(jnp.int32)
  nibbles = jnp.concatenate([codes & 0xF, codes >> 4], axis=0)  # [in_pad, out]
  return _decode_nf4(nibbles) * jnp.repeat(absmax.astype(jnp.float32), NF4_BLOCK, axis=0)


def _dense_weight(static, weight, weight_aux, in_features):
  """(W in float32 [in, out] without its int8 scale, the scale or None) for the backward."""
  if static.weight_kind == 'nf4':
    return dequantize_nf4(weight, weight_aux)[:in_features], None
  if static.weight_kind == 'int8':
    return weight.astype(jnp.float32), weight_aux.astype(jnp.float32)
  return weight, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_core(static, x, weight, weight_aux, lora_a, lora_b):
  return _forward(static, x, weight, weight_aux, lora_a, lora_b)


def _lora_core_fwd(static, x, weight, weight_aux, lora_a, lora_b):
  y = _forward(static, x, weight, weight_aux, lora_a, lora_b)
  return y, (x, weight, weight_aux, lora_a, lora_b)


def _lora_core_bwd(static, residuals, d_y):
  x, weight, weight_aux, lora_a, lora_b = residuals
  # XLA:CPU lacks some bf16 x bf16 -> f32 dots (DotThunk); bf16 products are exact in float32.
  compute = jnp.float32 if static.interpret else x.dtype
  dense, weight_scale = _dense_weight(static, weight, weight_aux, x.shape[1])  # [in, out]
  if weight_scale is not None:  # (dy * s) W^T: the scale goes on dy, W is only cast
    d_base = d_y.astype(jnp.float32) * weight_scale[None, :]
  else:
    d_base = d_y
  # The forward multiplies x by W rounded to the compute dtype; so does the backward.
  dense = dense.astype(x.dtype).astype(compute)
  d_x = jnp.dot(d_base.astype(compute), dense.T, preferred_element_type=jnp.float32)
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
    weight_absmax: jax.Array | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
) -> jax.Array:
  """x dequant(W) + scale (x A) B, fused; differentiable in x, lora_a and lora_b.

  Args:
    x: [..., in_features], float32 or bfloat16 (the compute dtype).
    weight: the frozen base weight: float [in_features, out_features]; int8 [in_features,
      out_features] with `weight_scale`; or NF4 codes, uint8 [in_pad / 2, out_features] with
      `weight_absmax` (the layout in this module's docstring; in_pad >= in_features).
    lora_a: [in_features, rank].
    lora_b: [rank, out_features].
    scale: the LoRA scale (alpha / rank).
    weight_scale: [out_features] per-channel scale of an int8 weight.
    weight_absmax: [in_pad / 64, out_features] block absmax of an NF4 weight.
    block_m, block_n, block_k: tile sizes; `default_block_sizes` by default. For NF4, block_k
      counts packed rows per step, a multiple of 64 that divides in_pad / 2.
    interpret: run in the Pallas interpreter; default: when `backend` is 'cpu'.
    backend: 'cpu' | 'gpu' | 'tpu', the platform to lower for (block sizes, compiler
      parameters); default `jax.default_backend()`.

  Returns:
    [..., out_features] in x's dtype. The weight gets no gradient (it is frozen).
  """
  in_features, out_features = x.shape[-1], weight.shape[1]
  if weight_scale is not None and weight_absmax is not None:
    raise ValueError('give weight_scale (int8) or weight_absmax (NF4), not both')
  if (weight_scale is not None) != (weight.dtype == jnp.int8):
    raise ValueError('give weight_scale exactly when the weight is int8')
  if (weight_absmax is not None) != (weight.dtype == jnp.uint8):
    raise ValueError('give weight_absmax exactly when the weight is uint8 NF4 codes')
  backend = backend or jax.default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS}')
  if interpret is None:
    interpret = backend == 'cpu'
  if weight_absmax is not None:
    weight_kind = 'nf4'
    half_rows = weight.shape[0]
    if (half_rows % NF4_BLOCK or 2 * half_rows < in_features
        or weight_absmax.shape != (2 * half_rows // NF4_BLOCK, out_features)):
      raise ValueError(
          f'NF4 weight {weight.shape} / absmax {weight_absmax.shape} do not hold an '
          f'[{in_features}, {out_features}] kernel in the packed layout')
    contracted = half_rows
  else:
    weight_kind = 'float' if weight_scale is None else 'int8'
    if weight.shape[0] != in_features:
      raise ValueError(f'weight {weight.shape} does not take {in_features} input features')
    contracted = in_features
  leading = x.shape[:-1]
  flat_x = x.reshape(-1, in_features)
  default_m, default_n, default_k = default_block_sizes(
      flat_x.shape[0], contracted, out_features, backend)
  if weight_kind == 'nf4':
    if block_k is None:
      block_k = _nf4_block_k(contracted, default_k)
    elif block_k % NF4_BLOCK or contracted % block_k:
      raise ValueError(f'NF4 block_k={block_k} must be a multiple of {NF4_BLOCK} that divides '
                       f'the {contracted} packed rows')
  block_k = block_k or default_k
  static = _Static(scale=float(scale), weight_kind=weight_kind, block_m=block_m or default_m,
                   block_n=block_n or default_n, block_k=block_k, interpret=bool(interpret),
                   backend=backend)
  if weight_kind == 'float':
    weight_aux = jnp.ones((out_features,), jnp.float32)
  else:
    weight_aux = weight_scale if weight_kind == 'int8' else weight_absmax
  y = _lora_core(static, flat_x, weight, weight_aux, lora_a, lora_b)
  return y.reshape(*leading, out_features)
