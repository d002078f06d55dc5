"""Scaled dot-product attention shared by the decoder and the vision tower.

One entry point, `dot_product_attention`, with a choice of implementation:
- 'xla': plain jnp, grouped-query attention without repeating the key/value heads,
  softmax in float32; runs everywhere.
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs).
- 'pallas': `pallas_kernels.flash_attention`, which builds the mask blockwise from per-token
  information instead of reading a dense one: the decoder passes a `CausalPaddingMask`, the
  vision tower none. A dense mask (cached decoding) falls back to 'xla'.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention as pallas_flash

_MASKED_LOGIT = float(jnp.finfo(jnp.float32).min)


def make_causal_mask(attention_mask: jax.Array) -> jax.Array:
  """Builds the boolean causal-and-padding mask of a decoder.

  Args:
    attention_mask: [batch, seq], 1 (or True) at real tokens, 0 at padding.

  Returns:
    [batch, 1, seq, seq] boolean: query i may attend to key j when j <= i and key j is real.
  """
  seq_len = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))  # [q, kv]
  key_is_real = attention_mask.astype(jnp.bool_)[:, None, None, :]  # [batch, 1, 1, kv]
  return causal[None, None] & key_is_real


class CausalPaddingMask(NamedTuple):
  """A causal mask with key padding, kept as the [batch, seq] mask it is built from."""

  attention_mask: jax.Array  # [batch, seq], 1 at real tokens, 0 at padding


def decoder_mask(attention_mask: jax.Array, impl: str) -> jax.Array | CausalPaddingMask:
  """The decoder's mask in the form `impl` wants: dense [batch, 1, seq, seq] or compact."""
  if impl == 'pallas':
    return CausalPaddingMask(attention_mask)
  return make_causal_mask(attention_mask)


def _pallas_attention(query, key, value, mask, scale):
  """Flash attention kernels; see `dot_product_attention`."""
  if mask is None:
    return pallas_flash.flash_attention(query, key, value, scale=scale)
  if not isinstance(mask, CausalPaddingMask):  # a dense mask (cached decoding): no kernel
    return _xla_attention(query, key, value, mask, scale)
  key_segments = mask.attention_mask.astype(jnp.int32)  # [batch, kv_len]: 0 marks padding
  query_segments = jnp.ones(query.shape[:2], jnp.int32)  # every query sees the real keys
  return pallas_flash.flash_attention(
      query, key, value, causal=True, segment_ids=query_segments, kv_segment_ids=key_segments,
      scale=scale)


def _xla_attention(query, key, value, mask, scale):
  """Grouped-query attention in jnp; see `dot_product_attention`."""
  batch, q_len, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  group = num_heads // num_kv_heads
  # Heads are laid out kv-head major, as in Hugging Face's repeat_kv.
  grouped_query = query.reshape(batch, q_len, num_kv_heads, group, head_dim)
  logits = jnp.einsum(
      'bqkgd,bskd->bkgqs', grouped_query, key, preferred_element_type=jnp.float32
  )  # [batch, kv_heads, group, q_len, kv_len]
  logits = logits * jnp.float32(scale)
  if mask is not None:
    if mask.shape[1] == 1:
      grouped_mask = mask[:, :, None]  # [batch, 1, 1, q_len, kv_len]
    else:
      grouped_mask = mask.reshape(batch, num_kv_heads, group, *mask.shape[2:])
    logits = jnp.where(grouped_mask, logits, _MASKED_LOGIT)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum('bkgqs,bskd->bqkgd', probs, value, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(query.dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | CausalPaddingMask | None = None,
    scale: float | None = None,
    impl: str = 'xla',
) -> jax.Array:
  """Multi-head attention with grouped key/value heads.

  Args:
    query: [batch, q_len, heads, head_dim].
    key: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads.
    value: [batch, kv_len, kv_heads, head_dim].
    mask: optional boolean [batch, 1 or heads, q_len, kv_len]; True where attention is
      allowed (causal and padding combined); or a `CausalPaddingMask`. None attends
      everywhere (a ViT).
    scale: logit scale; defaults to head_dim ** -0.5.
    impl: 'xla' | 'cudnn' | 'pallas'.

  Returns:
    [batch, q_len, heads, head_dim] in the query's dtype.
  """
  num_heads, num_kv_heads = query.shape[2], key.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f'kv heads ({num_kv_heads}) must divide query heads ({num_heads})')
  if scale is None:
    scale = query.shape[-1] ** -0.5
  if impl == 'pallas':
    return _pallas_attention(query, key, value, mask, scale)
  if isinstance(mask, CausalPaddingMask):
    mask = make_causal_mask(mask.attention_mask)
  if impl == 'xla':
    return _xla_attention(query, key, value, mask, scale)
  if impl == 'cudnn':
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, implementation='cudnn'
    )
  raise ValueError(f"unknown attention impl {impl!r}; expected 'xla', 'cudnn' or 'pallas'")
