"""Weight quantization for QLoRA's frozen base kernels: int8 per output channel and NF4 blocks.

int8: q = round(w / s), s = max|w| / 127 over the input axes of each output channel; the
  error is at most s / 2 per weight.
NF4 (Dettmers et al., "QLoRA", 2023): the flattened kernel is cut into blocks of 64, each
  block divided by its absmax and rounded to the nearest of 16 NormalFloat code values; two
  4-bit codes are packed per byte. The error is at most absmax * NF4_MAX_HALF_GAP per weight.
Pure jnp; leading (stacked-layer) axes are handled by `jax.vmap` where noted.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

NF4_BLOCK = 64
# The NormalFloat4 code values of the QLoRA paper (as in bitsandbytes).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
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


def nf4_num_blocks(shape: tuple[int, ...]) -> int:
  """Blocks of 64 that hold a kernel of `shape` (the last one zero-padded)."""
  return -(-math.prod(shape) // NF4_BLOCK)


def quantize_nf4(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Block-wise NF4 of one kernel (any shape).

  Returns:
    (packed, absmax): packed uint8 [num_blocks, 32], two codes per byte (low nibble first);
    absmax float32 [num_blocks].
  """
  flat = kernel.astype(jnp.float32).reshape(-1)
  num_blocks = nf4_num_blocks(kernel.shape)
  flat = jnp.pad(flat, (0, num_blocks * NF4_BLOCK - flat.size))
  blocks = flat.reshape(num_blocks, NF4_BLOCK)
  absmax = jnp.max(jnp.abs(blocks), axis=1)  # [num_blocks]
  normalized = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  midpoints = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
  codes = jnp.searchsorted(midpoints, normalized).astype(jnp.uint8)  # [num_blocks, 64] in 0..15
  packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
  return packed.astype(jnp.uint8), absmax


def dequantize_nf4(packed: jax.Array, absmax: jax.Array, shape: tuple[int, ...],
                   dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_nf4`: packed [num_blocks, 32], absmax [num_blocks] -> `shape`."""
  low = packed & 0x0F
  high = packed >> 4
  codes = jnp.stack([low, high], axis=-1).reshape(packed.shape[0], NF4_BLOCK)
  values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)] * absmax[:, None]
  return values.reshape(-1)[:math.prod(shape)].reshape(shape).astype(dtype)


def quantize_stacked(kernel: jax.Array, base_dtype: str, num_leading: int,
                     in_axes: tuple[int, ...]) -> dict:
  """Quantizes a kernel that may carry `num_leading` stacked-layer axes.

  `in_axes` index the per-layer kernel. Returns the stored arrays by parameter name:
  {'kernel_int8', 'kernel_scale'} or {'kernel_nf4', 'kernel_absmax'}.
  """
  if base_dtype == 'int8':
    fn = lambda w: dict(zip(('kernel_int8', 'kernel_scale'), quantize_int8(w, in_axes)))
  elif base_dtype == 'nf4':
    fn = lambda w: dict(zip(('kernel_nf4', 'kernel_absmax'), quantize_nf4(w)))
  else:
    raise ValueError(f'not a quantized base dtype: {base_dtype!r}')
  for _ in range(num_leading):
    fn = jax.vmap(fn)
  return fn(jnp.asarray(kernel))
