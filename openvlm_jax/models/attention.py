"""Scaled dot-product attention shared by the decoder and the vision tower.

One entry point, `dot_product_attention`, with a choice of implementation:
- 'xla': plain jnp, grouped-query attention without repeating the key/value heads,
  softmax in float32; runs everywhere.
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs).
- 'pallas': `pallas_kernels.flash_attention`, which builds the mask blockwise from per-token
  information instead of reading a dense one: the decoder passes a `DecoderMask`, the
  vision tower none. A dense mask (cached decoding) falls back to 'xla'. Under a mesh the
  kernels run once per device (shard_map over examples and kv-head groups), since XLA cannot
  partition a Pallas call.

The decoder's mask is described once, per token (`DecoderMask`): a segment id (0 at padding;
several examples packed into one row have ids 1, 2, ...; a token sees only its own segment),
causal order, and optionally a prefix end (a prefix LM, as in PaliGemma: a token of an
example's prefix also sees the rest of that prefix). An unpacked row is segment 1 with
padding 0, so the [batch, seq] 0/1 attention mask is already a segment-id array.
"""

from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from openvlm_jax import parallel
from pallas_kernels import flash_attention as pallas_flash

_MASKED_LOGIT = float(jnp.finfo(jnp.float32).min)


def prefix_causal_mask(
    query_positions: jax.Array, key_positions: jax.Array, prefix_len: jax.Array | None
) -> jax.Array:
  """Causal attention with an optional bidirectional prefix, before padding is applied.

  Args:
    query_positions: [q_len] int, the sequence index of each query.
    key_positions: [kv_len] int, the sequence index of each key.
    prefix_len: [batch] int or None; queries and keys at indices < prefix_len[b] also see
      each other in both directions.

  Returns:
    [batch or 1, 1, q_len, kv_len] boolean: query i may attend to key j when j <= i, or when
    both lie in the prefix.
  """
  query_positions = query_positions[:, None]  # [q_len, 1]
  key_positions = key_positions[None, :]  # [1, kv_len]
  allowed = (key_positions <= query_positions)[None]  # [1, q_len, kv_len]
  if prefix_len is not None:
    bound = prefix_len.astype(jnp.int32)[:, None, None]  # [batch, 1, 1]
    allowed = allowed | ((query_positions[None] < bound) & (key_positions[None] < bound))
  return allowed[:, None]


prefix_end_from_len = pallas_flash.prefix_end_from_len


def make_causal_mask(segment_ids: jax.Array, prefix_end: jax.Array | None = None) -> jax.Array:
  """Builds the dense boolean mask of a decoder from its per-token description.

  Args:
    segment_ids: [batch, seq] int, 0 at padding, the example's id at its tokens (a 0/1
      attention mask is one example per row).
    prefix_end: optional [batch, seq] int (prefix LM): query i also sees the keys j <
      prefix_end[b, i] of its segment; 0 for tokens outside a prefix.

  Returns:
    [batch, 1, seq, seq] boolean: query i may attend to key j when both have the same
    segment id and j <= i (or j lies before i's prefix end). Padding sees only padding.
  """
  positions = jnp.arange(segment_ids.shape[-1])  # [seq]
  allowed = positions[None, None, :] <= positions[None, :, None]  # [1, q, kv]
  if prefix_end is not None:
    allowed = allowed | (positions[None, None, :] < prefix_end.astype(jnp.int32)[:, :, None])
  segments = segment_ids.astype(jnp.int32)
  same_segment = segments[:, :, None] == segments[:, None, :]  # [batch, q, kv]
  return (allowed & same_segment)[:, None]


class DecoderMask(NamedTuple):
  """The decoder's mask, kept as the per-token arrays it is built from (see the module)."""

  segment_ids: jax.Array  # [batch, seq] int, 0 at padding
  prefix_end: jax.Array | None = None  # [batch, seq] int, or None (causal only)


def decoder_mask(
    segment_ids: jax.Array, impl: str, prefix_end: jax.Array | None = None
) -> jax.Array | DecoderMask:
  """The decoder's mask in the form `impl` wants: dense [batch, 1, seq, seq] or per token."""
  if impl == 'pallas':
    return DecoderMask(segment_ids, prefix_end)
  return make_causal_mask(segment_ids, prefix_end)


def _pallas_attention(query, key, value, mask, scale):
  """Flash attention kernels; see `dot_product_attention`."""
  if mask is None:
    return _per_device(lambda q, k, v: pallas_flash.flash_attention(q, k, v, scale=scale),
                       query, key, value, ())
  if not isinstance(mask, DecoderMask):  # a dense mask (cached decoding): no kernel
    return _xla_attention(query, key, value, mask, scale)
  per_example = (mask.segment_ids.astype(jnp.int32),)  # [batch, seq]: 0 marks padding
  if mask.prefix_end is not None:
    per_example += (mask.prefix_end.astype(jnp.int32),)  # [batch, seq]

  def kernel(query, key, value, segment_ids, prefix_end=None):
    return pallas_flash.flash_attention(query, key, value, causal=True,
                                        segment_ids=segment_ids, prefix_end=prefix_end,
                                        scale=scale)

  return _per_device(kernel, query, key, value, per_example)


def _per_device(kernel, query, key, value, per_example):
  """kernel(query, key, value, *per_example), once per device under a mesh (shard_map).

  Examples split over the mesh axes of 'batch', heads over those of 'kv_heads' (query heads
  go with their kv head, so each device holds whole GQA groups); a split that would be uneven
  is not made. Sequence and head_dim stay whole: the kernel needs every key of its queries.
  Outside a mesh the kernel is called directly.
  """
  batch_axes = parallel.kernel_mesh_axes('batch', query.shape[0])
  head_axes = parallel.kernel_mesh_axes('kv_heads', key.shape[2])
  if batch_axes is None and head_axes is None:
    return kernel(query, key, value, *per_example)
  heads_spec = PartitionSpec(batch_axes, None, head_axes, None)  # [batch, seq, heads, dim]
  example_specs = tuple(PartitionSpec(batch_axes, *(None,) * (array.ndim - 1))
                        for array in per_example)
  return jax.shard_map(kernel, in_specs=(heads_spec,) * 3 + example_specs,
                       out_specs=heads_spec, check_vma=False)(query, key, value, *per_example)


def _xla_attention(query, key, value, mask, scale):
  """Grouped-query attention in jnp; see `dot_product_attention`."""
  num_kv_heads = key.shape[2]
  # Heads are laid out kv-head major, as in Hugging Face's repeat_kv.
  grouped_query = einops.rearrange(query, 'b q (k g) d -> b q k g d', k=num_kv_heads)
  logits = jnp.einsum(
      'bqkgd,bskd->bkgqs', grouped_query, key, preferred_element_type=jnp.float32
  )  # [batch, kv_heads, group, q_len, kv_len]
  logits = logits * jnp.float32(scale)
  if mask is not None:
    if mask.shape[1] == 1:
      grouped_mask = mask[:, :, None]  # [batch, 1, 1, q_len, kv_len]
    else:
      grouped_mask = einops.rearrange(mask, 'b (k g) q s -> b k g q s', k=num_kv_heads)
    logits = jnp.where(grouped_mask, logits, _MASKED_LOGIT)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum('bkgqs,bskd->bqkgd', probs, value, preferred_element_type=jnp.float32)
  return einops.rearrange(out, 'b q k g d -> b q (k g) d').astype(query.dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | DecoderMask | None = None,
    scale: float | None = None,
    impl: str = 'xla',
) -> jax.Array:
  """Multi-head attention with grouped key/value heads.

  Args:
    query: [batch, q_len, heads, head_dim].
    key: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads.
    value: [batch, kv_len, kv_heads, head_dim].
    mask: optional boolean [batch, 1 or heads, q_len, kv_len]; True where attention is
      allowed (causal and padding combined); or a `DecoderMask` (segments, causal order,
      optional prefix ends). None attends everywhere (a ViT).
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
  if isinstance(mask, DecoderMask):
    mask = make_causal_mask(mask.segment_ids, mask.prefix_end)
  if impl == 'xla':
    return _xla_attention(query, key, value, mask, scale)
  if impl == 'cudnn':
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, implementation='cudnn'
    )
  raise ValueError(f"unknown attention impl {impl!r}; expected 'xla', 'cudnn' or 'pallas'")
