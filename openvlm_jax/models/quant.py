"""Weight quantization for QLoRA's frozen base kernels: int8 per output channel and NF4 blocks.

int8: q = round(w / s), s = max|w| / 127 over the input axes of each output channel; the
  error is at most s / 2 per weight.
NF4 (Dettmers et al., "QLoRA", 2023): the kernel is viewed as [in, out...] (input axes
  flattened, output axes kept) and `in` zero-padded to in_pad, a multiple of 128. A block is 64
  consecutive input rows of one output (as bitsandbytes blocks torch's [out, in] weight); it is
  divided by its absmax and each weight rounded to the nearest of 16 NormalFloat code values.
  Stored: absmax float32 [in_pad / 64, out...] and packed uint8 [in_pad / 2, out...], byte row
  r holding row r in its low nibble and row r + in_pad / 2 in its high one, so that
  x W = x[:, :in_pad/2] W_low + x[:, in_pad/2:] W_high with contiguous slices: the layout
  `pallas_kernels.lora_projection` reads tile by tile. Both keep the output axes, which carry
  the kernel's logical axis names for sharding. The error is at most absmax *
  NF4_MAX_HALF_GAP per weight; storage is 4.5 bits per (padded) weight.
Pure jnp; leading (stacked-layer) axes are handled by `jax.vmap` where noted.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# The NF4 layout is the one the fused Pallas projection reads (pallas_kernels stands alone).
from pallas_kernels.lora_projection import NF4_BLOCK, NF4_CODE, NF4_ROW_MULTIPLE

# Half the widest gap between neighbouring code values: the worst rounding error / absmax.
NF4_MAX_HALF_GAP = float(np.max(np.diff(NF4_CODE)) / 2)
BASE_DTYPES = ('float32', 'bf16', 'int8', 'nf4')


def quantize_int8(kernel: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 with one scale per output channel.

  Args:
    kernel: float weights, e.g. [in, out] or [heads, head_dim, out].
    in_axes: the contracted (input) axes, reduced over for the absmax.

  Returns:
    (q, scale): q int8 of kernel's shape; scale float32 of kernel's shape with `in_axes` set
    to 1, so that q * scale broadcasts back.
  """
  kernel = kernel.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(kernel), axis=in_axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  q = jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """q * scale in `dtype`."""
  return (q.astype(jnp.float32) * scale).astype(dtype)


def nf4_padded_rows(in_size: int) -> int:
  """The input rows an NF4 kernel with `in_size` (flattened) inputs is stored with."""
  return -(-in_size // NF4_ROW_MULTIPLE) * NF4_ROW_MULTIPLE


def quantize_nf4(kernel: jax.Array, in_axes: tuple[int, ...] = (0,)
                 ) -> tuple[jax.Array, jax.Array]:
  """Block-wise NF4 of one kernel [in..., out...], in the fused kernel's layout.

  Args:
    kernel: float weights whose leading axes `in_axes` (0, 1, ...) are the contracted ones.
    in_axes: the input axes; they must lead.

  Returns:
    (packed, absmax): packed uint8 [in_pad / 2, out...], byte row r holding the code of input
    row r (low nibble) and of row r + in_pad / 2 (high nibble); absmax float32
    [in_pad / 64, out...], one per 64 consecutive input rows of each output.
  """
  num_in = len(in_axes)
  if tuple(in_axes) != tuple(range(num_in)):
    raise ValueError(f'NF4 needs the input axes first; got in_axes={in_axes}')
  out_shape = kernel.shape[num_in:]
  in_size = math.prod(kernel.shape[:num_in])
  padded = nf4_padded_rows(in_size)
  rows = kernel.astype(jnp.float32).reshape(in_size, *out_shape)
  rows = jnp.pad(rows, [(0, padded - in_size)] + [(0, 0)] * len(out_shape))  # [in_pad, out...]
  blocks = rows.reshape(padded // NF4_BLOCK, NF4_BLOCK, *out_shape)
  absmax = jnp.max(jnp.abs(blocks), axis=1)  # [in_pad / 64, out...]
  normalized = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  midpoints = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
  codes = jnp.searchsorted(midpoints, normalized).astype(jnp.uint8)  # 0..15
  codes = codes.reshape(padded, *out_shape)
  half = padded // 2
  packed = codes[:half] | (codes[half:] << 4)
  return packed.astype(jnp.uint8), absmax


def dequantize_nf4(packed: jax.Array, absmax: jax.Array, shape: tuple[int, ...],
                   dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_nf4`: packed [in_pad / 2, out...], absmax [in_pad / 64, out...] ->
  the kernel of `shape` [in..., out...]."""
  out_shape = packed.shape[1:]
  in_shape = tuple(shape[:len(shape) - len(out_shape)])
  codes = jnp.concatenate([packed & 0x0F, packed >> 4], axis=0)  # [in_pad, out...]
  values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
  blocks = values.reshape(absmax.shape[0], NF4_BLOCK, *out_shape) * absmax[:, None]
  rows = blocks.reshape(-1, *out_shape)[:math.prod(in_shape)]
  return rows.reshape(shape).astype(dtype)


def quantize_stacked(kernel: jax.Array, base_dtype: str, num_leading: int,
                     in_axes: tuple[int, ...]) -> dict:
  """Quantizes a kernel that may carry `num_leading` stacked-layer axes.

  `in_axes` index the per-layer kernel. Returns the stored arrays by parameter name:
  {'kernel_int8', 'kernel_scale'} or {'kernel_nf4', 'kernel_absmax'}.
  """
  if base_dtype == 'int8':
    fn = lambda w: dict(zip(('kernel_int8', 'kernel_scale'), quantize_int8(w, in_axes)))
  elif base_dtype == 'nf4':
    fn = lambda w: dict(zip(('kernel_nf4', 'kernel_absmax'), quantize_nf4(w, in_axes)))
  else:
    raise ValueError(f'not a quantized base dtype: {base_dtype!r}')
  for _ in range(num_leading):
    fn = jax.vmap(fn)
  return fn(jnp.asarray(kernel))
