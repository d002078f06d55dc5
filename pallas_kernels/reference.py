"""Plain jnp versions of every kernel in this package, for tests and as a fallback.

They materialise what the kernels avoid (the [q, kv] mask and logits, the dequantized weight)
and compute in float32 at the highest matmul precision.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.lora_projection import NF4_BLOCK, NF4_CODE

_HIGHEST = jax.lax.Precision.HIGHEST


def attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    prefix_len: jax.Array | None = None,
    prefix_end: jax.Array | None = None,
) -> jax.Array:
  """The dense [batch, q_len, kv_len] boolean mask `flash_attention` applies blockwise."""
  q_pos = jnp.arange(q_len)[:, None]
  kv_pos = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((batch, q_len, kv_len), jnp.bool_)
  if causal:
    allowed = jnp.broadcast_to(kv_pos <= q_pos, (batch, q_len, kv_len))
    if prefix_len is not None:
      in_prefix_q = q_pos[None] < prefix_len[:, None, None]  # [batch, q, 1]
      in_prefix_kv = kv_pos[None] < prefix_len[:, None, None]  # [batch, 1, kv]
      allowed = allowed | (in_prefix_q & in_prefix_kv)
    if prefix_end is not None:  # query i also sees keys j < prefix_end[b, i]
      allowed = allowed | (kv_pos[None] < prefix_end[:, :, None])
    mask = mask & allowed
  if segment_ids is not None or kv_segment_ids is not None:
    if segment_ids is None:
      segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    if kv_segment_ids is None:
      kv_segment_ids = segment_ids if kv_len == q_len else jnp.zeros((batch, kv_len), jnp.int32)
    mask = mask & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  if kv_lengths is not None:
    mask = mask & (kv_pos[None] < kv_lengths[:, None, None])
  return mask


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    prefix_len: jax.Array | None = None,
    prefix_end: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Reference of `flash_attention.flash_attention` (same arguments, same layout).

  query [batch, q_len, heads, d], key/value [batch, kv_len, kv_heads, d] -> [batch, q_len,
  heads, d] in the query's dtype; a query that sees no key gets 0.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  group = num_heads // num_kv_heads
  if scale is None:
    scale = head_dim**-0.5
  mask = attention_mask(batch, q_len, kv_len, causal=causal, segment_ids=segment_ids,
                        kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths,
                        prefix_len=prefix_len, prefix_end=prefix_end)[:, None]  # [b, 1, q, kv]
  key = jnp.repeat(key.astype(jnp.float32), group, axis=2)
  value = jnp.repeat(value.astype(jnp.float32), group, axis=2)
  logits = jnp.einsum('bqhd,bkhd->bhqk', query.astype(jnp.float32), key,
                      precision=_HIGHEST) * scale
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
  row_sum = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(row_sum > 0, row_sum, 1.0)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs, value, precision=_HIGHEST)
  return out.astype(query.dtype)


def dequantize_int8(weight: jax.Array, weight_scale: jax.Array) -> jax.Array:
  """int8 [in, out] with a per-output-channel scale [out] -> float32 [in, out]."""
  return weight.astype(jnp.float32) * weight_scale.astype(jnp.float32)[None, :]


def dequantize_nf4(packed: jax.Array, absmax: jax.Array) -> jax.Array:
  """NF4 codes in `lora_projection`'s layout -> float32 [in_pad, out], by table lookup.

  packed uint8 [in_pad / 2, out]: byte row r holds row r (low nibble) and row r + in_pad / 2
  (high nibble); absmax [in_pad / 64, out] scales 64 consecutive rows of each column.
  """
  half_rows, out_features = packed.shape
  low_codes = jnp.bitwise_and(packed, 15).astype(jnp.int32)
  high_codes = jnp.right_shift(packed, 4).astype(jnp.int32)
  codes = jnp.zeros((2 * half_rows, out_features), jnp.int32)
  codes = codes.at[:half_rows].set(low_codes).at[half_rows:].set(high_codes)  # [in_pad, out]
  values = jnp.asarray(NF4_CODE)[codes]
  blocks = values.reshape(absmax.shape[0], NF4_BLOCK, out_features)
  return (blocks * absmax.astype(jnp.float32)[:, None, :]).reshape(2 * half_rows, out_features)


def lora_projection(
    x: jax.Array,
    weight: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    *,
    scale: float,
    weight_scale: jax.Array | None = None,
    weight_absmax: jax.Array | None = None,
) -> jax.Array:
  """Reference of `lora_projection.lora_projection`: x dequant(W) + scale (x A) B.

  x [..., in], weight [in, out] (float, or int8 with `weight_scale` [out]) or NF4 codes
  [in_pad / 2, out] with `weight_absmax` [in_pad / 64, out], lora_a [in, rank], lora_b
  [rank, out] -> [..., out] in x's dtype.
  """
  x32 = x.astype(jnp.float32)
  if weight_scale is not None:
    dense = dequantize_int8(weight, weight_scale)
  elif weight_absmax is not None:
    dense = dequantize_nf4(weight, weight_absmax)[:x.shape[-1]]
  else:
    dense = weight.astype(jnp.float32)
  base = jnp.matmul(x32, dense, precision=_HIGHEST)
  low_rank = jnp.matmul(jnp.matmul(x32, lora_a.astype(jnp.float32), precision=_HIGHEST),
                        lora_b.astype(jnp.float32), precision=_HIGHEST)
  return (base + scale * low_rank).astype(x.dtype)
