"""Flash attention in Pallas: forward and backward (FlashAttention-2), float32 online softmax.

Layout [batch, seq, heads, head_dim], the one `openvlm_jax/models/attention.py` uses. Masks:
causal; a bidirectional prefix, given per query as `prefix_end` (query i also sees every key
j < prefix_end[i], so the prefix of each packed example attends both ways within itself: the
PaliGemma kind), or per example as `prefix_len`; segment ids for packed sequences;
per-example kv lengths; none at all (a ViT). Grouped-query attention indexes kv head
`q_head // group` in the BlockSpec index map, so K/V are never repeated.

Each program owns one block of queries (forward, dq) or one block of keys (dk/dv) and loops over
the other side inside the kernel, so no state is carried across grid steps: the same kernels
lower for GPU (Triton) and TPU (Mosaic), and run with `interpret=True` on CPU. Sequences are
padded to a multiple of the block in the wrapper, and padded keys are masked.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Finite, so that rows with no allowed key give zeros rather than NaN.
_MASK_VALUE = -1e30
# Sentinel segment id of padded keys: never equal to a real query's segment.
_PAD_SEGMENT = -(2**31)

# (block_q, block_k) by backend and head_dim bound; `None` bound = any larger head_dim.
_BLOCK_TABLE = {
    'gpu': ((64, (128, 64)), (128, (128, 64)), (None, (64, 32))),
    'tpu': ((128, (128, 128)), (None, (128, 128))),
    'cpu': ((None, (128, 128)),),
}


_MIN_BLOCK = {'tpu': 128}


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _next_power_of_2(value: int) -> int:
  return 1 << max(value - 1, 0).bit_length()


def default_block_sizes(q_len: int, kv_len: int, head_dim: int,
                        backend: str | None = None) -> tuple[int, int]:
  """(block_q, block_k) from the per-backend table, shrunk for short sequences.

  A block never exceeds the sequence rounded up to a power of two, and never goes below the
  backend's floor (16; 128 on TPU, where key blocks are rows of 128 lanes), so tiny inputs
  are not padded to full size.
  """
  backend = backend or jax.default_backend()
  rows = _BLOCK_TABLE.get(backend, _BLOCK_TABLE['cpu'])
  block_q, block_k = next(blocks for bound, blocks in rows if bound is None or head_dim <= bound)
  floor = _MIN_BLOCK.get(backend, 16)
  block_q = min(block_q, max(floor, _next_power_of_2(q_len)))
  block_k = min(block_k, max(floor, _next_power_of_2(kv_len)))
  return block_q, block_k


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on (hashable, for custom_vjp's nondiff argument)."""
  scale: float
  causal: bool
  use_segments: bool
  use_prefix: bool
  kv_len: int  # true kv length; keys at or beyond it are padding
  kv_padded: int  # kv length after padding to a multiple of block_k
  block_q: int
  block_k: int
  interpret: bool
  backend: str  # 'cpu' | 'gpu' | 'tpu': the platform the kernels are built for

  @property
  def heads_major(self) -> bool:
    """q/k/v laid out [b, h, s, d] (TPU) rather than [b, s, h, d]."""
    return self.backend == 'tpu'


def _compiler_params(static):
  """Triton on GPU (jax's default there is Mosaic GPU), Mosaic on TPU; none when interpreted."""
  if static.interpret:
    return None
  if static.backend == 'gpu':
    return pltriton.CompilerParams(num_warps=4 if static.block_k <= 64 else 8, num_stages=2)
  if static.backend == 'tpu':
    return pltpu.CompilerParams(dimension_semantics=('parallel',) * 3)  # (b, heads, blocks)
  return None


def _block_mask(static, q_start, kv_start, q_seg, kv_seg, q_prefix):
  """[block_q, block_k] bool of allowed (query, key) pairs, or None when all are allowed.

  q_seg and q_prefix (each query's prefix end) are columns [block_q, 1], kv_seg a row
  [1, block_k]: 2-D throughout, which is what Mosaic lays out well, and no array longer than
  a block (Triton wants power-of-two sizes).
  """
  shape = (static.block_q, static.block_k)
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  mask = None
  if static.causal:
    mask = kv_pos <= q_pos
    if static.use_prefix:
      mask = mask | (kv_pos < q_prefix)
  if static.use_segments:
    same = q_seg == kv_seg
    mask = same if mask is None else mask & same
  elif static.kv_padded > static.kv_len:
    real = kv_pos < static.kv_len
    mask = real if mask is None else mask & real
  return mask


def _dot_nt(a, b):
  """a [m, d] . b [n, d]^T -> [m, n] float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a [m, n]^T . b [m, d] -> [n, d] float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _split_mask_refs(static, refs, key_blocks: bool = False):
  """Splits the optional (q_seg, kv_seg, prefix_end) refs off the front of refs; with
  `key_blocks` (the dk/dv kernel) also the key block's first prefix query, else None."""
  q_seg = kv_seg = prefix = first = None
  if static.use_segments:
    q_seg, kv_seg, *refs = refs
  if static.use_prefix:
    prefix, *refs = refs
    if key_blocks:
      first, *refs = refs
  return (q_seg, kv_seg, prefix, first), refs


def _kv_block_range(static, q_start, q_prefix, num_kv_blocks):
  """[lo, hi) of the key blocks a query block (prefix ends q_prefix [block_q, 1]) can see."""
  if not static.causal:
    return 0, num_kv_blocks
  # lax.div, not //: the values are non-negative, and floor division of signed integers
  # needs chip information in Mosaic's lowering.
  hi = jnp.minimum(lax.div(q_start + static.block_q - 1, static.block_k) + 1, num_kv_blocks)
  if static.use_prefix:
    prefix_end = lax.div(jnp.max(q_prefix) + static.block_k - 1, static.block_k)
    hi = jnp.maximum(hi, prefix_end)
  return 0, hi


def _q_block_range(static, kv_block, first_prefix_queries, num_q_blocks):
  """[lo, hi) of the query blocks that can see key block `kv_block`.

  `first_prefix_queries` [1, nk_padded] holds, per key block, the first query whose prefix
  end lies past the block's start (`_first_prefix_queries`); this block's entry is picked
  with a masked min rather than a dynamic lane index.
  """
  if not static.causal:
    return 0, num_q_blocks
  lo = lax.div(kv_block * static.block_k, static.block_q)
  if static.use_prefix:
    lanes = lax.broadcasted_iota(jnp.int32, first_prefix_queries.shape, 1)
    first = jnp.min(jnp.where(lanes == kv_block, first_prefix_queries, jnp.iinfo(jnp.int32).max))
    lo = jnp.minimum(lo, lax.div(first, static.block_q))
  return lo, num_q_blocks


def _rows(ref, start, size):
  """Rows [start, start + size) of a column ref [len, 1], or None."""
  return None if ref is None else ref[pl.ds(start, size), :]


def _cols(ref, start, size):
  """Columns [start, start + size) of a row ref [1, len], or None."""
  return None if ref is None else ref[:, pl.ds(start, size)]


def _forward_kernel(q_ref, k_ref, v_ref, *refs, static):
  """One query block against all key blocks: out [block_q, d], lse [block_q, 1]."""
  (q_seg_ref, kv_seg_ref, prefix_ref, _), (out_ref, lse_ref) = _split_mask_refs(static, refs)
  block_q, block_k = static.block_q, static.block_k
  q_start = pl.program_id(2) * block_q
  q = q_ref[...]  # [block_q, d]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]  # [block_q, 1]
  q_prefix = None if prefix_ref is None else prefix_ref[...]  # [block_q, 1]

  def body(j, carry):
    acc, row_max, row_sum = carry  # [block_q, d], [block_q, 1], [block_q, 1]
    kv_start = j * block_k
    k = k_ref[pl.ds(kv_start, block_k), :]
    v = v_ref[pl.ds(kv_start, block_k), :]
    logits = _dot_nt(q, k) * static.scale  # [block_q, block_k]
    mask = _block_mask(static, q_start, kv_start, q_seg, _cols(kv_seg_ref, kv_start, block_k),
                       q_prefix)
    if mask is not None:
      logits = jnp.where(mask, logits, _MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
    probs = jnp.exp(logits - new_max)
    if mask is not None:
      probs = jnp.where(mask, probs, 0.0)
    correction = jnp.exp(row_max - new_max)
    row_sum = row_sum * correction + jnp.sum(probs, axis=1, keepdims=True)
    acc = acc * correction + _dot(probs.astype(v.dtype), v)
    return acc, new_max, row_sum

  num_kv_blocks = k_ref.shape[0] // block_k
  lo, hi = _kv_block_range(static, q_start, q_prefix, num_kv_blocks)
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q, 1), _MASK_VALUE, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32))
  acc, row_max, row_sum = lax.fori_loop(lo, hi, body, init)
  has_keys = row_sum > 0
  safe_sum = jnp.where(has_keys, row_sum, 1.0)
  out_ref[...] = (acc / safe_sum).astype(out_ref.dtype)
  # A row with no allowed key gets a huge lse, so exp(logit - lse) is 0 in the backward pass.
  lse_ref[...] = jnp.where(has_keys, row_max + jnp.log(safe_sum), -_MASK_VALUE)


def _probs_and_dlogits(static, q, k, v, do, lse, delta, mask):
  """Recomputes probs [bq, bk] from lse [bq, 1] and returns (probs, dlogits) (before the scale)."""
  logits = _dot_nt(q, k) * static.scale
  probs = jnp.exp(logits - lse)
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)
  dprobs = _dot_nt(do, v)  # [block_q, block_k]
  return probs, probs * (dprobs - delta)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, static):
  """dq of one query block: loops over the key blocks it sees."""
  (q_seg_ref, kv_seg_ref, prefix_ref, _), (dq_ref,) = _split_mask_refs(static, refs)
  block_q, block_k = static.block_q, static.block_k
  q_start = pl.program_id(2) * block_q
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]  # [block_q, 1]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  q_prefix = None if prefix_ref is None else prefix_ref[...]

  def body(j, dq):
    kv_start = j * block_k
    k = k_ref[pl.ds(kv_start, block_k), :]
    v = v_ref[pl.ds(kv_start, block_k), :]
    mask = _block_mask(static, q_start, kv_start, q_seg, _cols(kv_seg_ref, kv_start, block_k),
                       q_prefix)
    _, dlogits = _probs_and_dlogits(static, q, k, v, do, lse, delta, mask)
    return dq + _dot(dlogits.astype(k.dtype), k)

  num_kv_blocks = k_ref.shape[0] // block_k
  lo, hi = _kv_block_range(static, q_start, q_prefix, num_kv_blocks)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _group_rows(static, ref, head, start, size):
  """Rows [start, start + size) of query head `head` of a group block, as [size, d]."""
  if static.heads_major:  # ref [group, q_len, d]
    return ref[head, pl.ds(start, size), :]
  return ref[pl.ds(start, size), head, :]  # ref [q_len, group, d]


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, static):
  """dk, dv of one key block of one kv head: loops over the group's query heads and blocks."""
  (q_seg_ref, kv_seg_ref, prefix_ref, first_ref), (dk_ref, dv_ref) = _split_mask_refs(
      static, refs, key_blocks=True)
  block_q, block_k = static.block_q, static.block_k
  group = lse_ref.shape[0]  # lse_ref [group, q_len, 1]
  q_len = lse_ref.shape[1]
  kv_start = pl.program_id(2) * block_k
  k, v = k_ref[...], v_ref[...]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]  # [1, block_k]
  first_prefix_queries = None if first_ref is None else first_ref[...]  # [1, nk_padded]
  num_q_blocks = q_len // block_q
  lo, hi = _q_block_range(static, pl.program_id(2), first_prefix_queries, num_q_blocks)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for head in range(group):

    def body(i, carry, head=head):
      dk, dv = carry
      q_start = i * block_q
      q = _group_rows(static, q_ref, head, q_start, block_q)
      do = _group_rows(static, do_ref, head, q_start, block_q)
      lse = lse_ref[head, pl.ds(q_start, block_q), :]  # [block_q, 1]
      delta = delta_ref[head, pl.ds(q_start, block_q), :]
      mask = _block_mask(static, q_start, kv_start, _rows(q_seg_ref, q_start, block_q), kv_seg,
                         _rows(prefix_ref, q_start, block_q))
      probs, dlogits = _probs_and_dlogits(static, q, k, v, do, lse, delta, mask)
      dv = dv + _dot_tn(probs.astype(do.dtype), do)
      dk = dk + _dot_tn(dlogits.astype(q.dtype), q)
      return dk, dv

    dk, dv = lax.fori_loop(lo, hi, body, (dk, dv))
  dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(static, q_len, kv_len, head_dim, group):
  """BlockSpecs of every operand, for the query-block grid and the key-block grid.

  Query-block grid (forward, dq): (b, h, i) over query blocks i. Key-block grid (dk/dv):
  (b, kv head, j) over key blocks j. Per-row statistics are [b, h, s, 1]; query-side mask
  arrays [b, s, 1] (columns), key-side ones [b, 1, s] (rows).
  """
  block_q, block_k = static.block_q, static.block_k
  if static.heads_major:  # [b, h, s, d]
    q_block = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_full = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, lax.div(h, group), 0, 0))
    q_group = pl.BlockSpec((None, group, q_len, head_dim), lambda b, h, j: (b, h, 0, 0))
    kv_block = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j: (b, h, j, 0))
  else:  # [b, s, h, d]
    q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h, i: (b, 0, lax.div(h, group), 0))
    q_group = pl.BlockSpec((None, q_len, group, head_dim), lambda b, h, j: (b, 0, h, 0))
    kv_block = pl.BlockSpec((None, block_k, None, head_dim), lambda b, h, j: (b, j, h, 0))
  return dict(
      q_block=q_block, kv_full=kv_full, q_group=q_group, kv_block=kv_block,
      rows_block=pl.BlockSpec((None, None, block_q, 1), lambda b, h, i: (b, h, i, 0)),
      rows_group=pl.BlockSpec((None, group, q_len, 1), lambda b, h, j: (b, h, 0, 0)),
      q_mask_block=pl.BlockSpec((None, block_q, 1), lambda b, h, i: (b, i, 0)),
      kv_mask_full=pl.BlockSpec((None, 1, kv_len), lambda b, h, i: (b, 0, 0)),
      q_mask_full=pl.BlockSpec((None, q_len, 1), lambda b, h, j: (b, 0, 0)),
      kv_mask_block=pl.BlockSpec((None, 1, block_k), lambda b, h, j: (b, 0, j)),
  )


def _mask_operands(static, mask_arrays, q_spec, kv_spec, key_blocks: bool = False):
  """Inputs and BlockSpecs of the optional segment ids and prefix ends for one kernel; with
  `key_blocks` (the dk/dv grid) also each key block's first prefix query [b, 1, nk_padded],
  whole (a power-of-two row for Triton, the full dims for Mosaic)."""
  q_seg, kv_seg, q_prefix, first_prefix_query = mask_arrays
  inputs, specs = [], []
  if static.use_segments:
    inputs += [q_seg, kv_seg]
    specs += [q_spec, kv_spec]
  if static.use_prefix:  # [b, sq, 1], a query-side column like q_seg
    inputs.append(q_prefix)
    specs.append(q_spec)
    if key_blocks:
      inputs.append(first_prefix_query)
      specs.append(pl.BlockSpec((None, 1, first_prefix_query.shape[2]),
                                lambda b, h, j: (b, 0, 0)))
  return inputs, specs


def _first_prefix_queries(prefix_end: jax.Array, num_kv_blocks: int, block_k: int) -> jax.Array:
  """For each key block, the first query that sees into it through a prefix (prefix_end past
  the block's start), or the query length when none does: int32 [b, 1, nk_padded], padded
  with the query length to a power of two.

  prefix_end: [b, q_padded, 1]. Computed here so that the dk/dv kernel skips the query
  blocks no prefix reaches back from, instead of reading the whole column (Triton loads
  power-of-two sizes only).
  """
  q_len = prefix_end.shape[1]
  block_starts = jnp.arange(num_kv_blocks, dtype=jnp.int32) * block_k  # [nk]
  sees = prefix_end[:, None, :, 0] > block_starts[None, :, None]  # [b, nk, q]
  first = jnp.where(jnp.any(sees, axis=-1), jnp.argmax(sees, axis=-1), q_len)
  first = _pad_axis(first.astype(jnp.int32), 1, _next_power_of_2(num_kv_blocks), q_len)
  return first[:, None, :]


def _layout(static, x):
  """(batch, seq, heads, head_dim) of a q/k/v operand in either layout."""
  if static.heads_major:
    batch, heads, seq, head_dim = x.shape
  else:
    batch, seq, heads, head_dim = x.shape
  return batch, seq, heads, head_dim


def _forward(static, q, k, v, mask_arrays):
  """Padded inputs -> (out in q's layout, lse [b, h, sq, 1] float32)."""
  batch, q_len, num_heads, head_dim = _layout(static, q)
  _, kv_len, num_kv_heads, _ = _layout(static, k)
  specs = _specs(static, q_len, kv_len, head_dim, num_heads // num_kv_heads)
  mask_inputs, mask_specs = _mask_operands(static, mask_arrays, specs['q_mask_block'],
                                           specs['kv_mask_full'])
  return pl.pallas_call(
      functools.partial(_forward_kernel, static=static),
      grid=(batch, num_heads, q_len // static.block_q),
      in_specs=[specs['q_block'], specs['kv_full'], specs['kv_full'], *mask_specs],
      out_specs=[specs['q_block'], specs['rows_block']],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len, 1), jnp.float32)],
      interpret=static.interpret,
      compiler_params=_compiler_params(static),
      name='flash_attention_forward',
  )(q, k, v, *mask_inputs)


def _backward(static, q, k, v, out, lse, d_out, mask_arrays):
  """Padded inputs -> (dq, dk, dv): one kernel for dq, one for dk and dv."""
  batch, q_len, num_heads, head_dim = _layout(static, q)
  _, kv_len, num_kv_heads, _ = _layout(static, k)
  group = num_heads // num_kv_heads
  specs = _specs(static, q_len, kv_len, head_dim, group)
  product = 'bhsd,bhsd->bhs' if static.heads_major else 'bshd,bshd->bhs'
  delta = jnp.einsum(product, out.astype(jnp.float32),
                     d_out.astype(jnp.float32))[..., None]  # [b, h, sq, 1]

  mask_inputs, mask_specs = _mask_operands(static, mask_arrays, specs['q_mask_block'],
                                           specs['kv_mask_full'])
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, static=static),
      grid=(batch, num_heads, q_len // static.block_q),
      in_specs=[specs['q_block'], specs['kv_full'], specs['kv_full'], specs['q_block'],
                specs['rows_block'], specs['rows_block'], *mask_specs],
      out_specs=specs['q_block'],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=static.interpret,
      compiler_params=_compiler_params(static),
      name='flash_attention_dq',
  )(q, k, v, d_out, lse, delta, *mask_inputs)

  mask_inputs, mask_specs = _mask_operands(static, mask_arrays, specs['q_mask_full'],
                                           specs['kv_mask_block'], key_blocks=True)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, static=static),
      grid=(batch, num_kv_heads, kv_len // static.block_k),
      in_specs=[specs['q_group'], specs['kv_block'], specs['kv_block'], specs['q_group'],
                specs['rows_group'], specs['rows_group'], *mask_specs],
      out_specs=[specs['kv_block'], specs['kv_block']],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=static.interpret,
      compiler_params=_compiler_params(static),
      name='flash_attention_dkdv',
  )(q, k, v, d_out, lse, delta, *mask_inputs)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_core(static, q, k, v, mask_arrays):
  return _forward(static, q, k, v, mask_arrays)[0]


def _flash_core_fwd(static, q, k, v, mask_arrays):
  out, lse = _forward(static, q, k, v, mask_arrays)
  return out, (q, k, v, out, lse, mask_arrays)


def _flash_core_bwd(static, residuals, d_out):
  q, k, v, out, lse, mask_arrays = residuals
  dq, dk, dv = _backward(static, q, k, v, out, lse, d_out, mask_arrays)
  return dq, dk, dv, jax.tree.map(lambda _: None, mask_arrays)


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def prefix_end_from_len(prefix_len: jax.Array, seq_len: int) -> jax.Array:
  """Per-query prefix ends [batch, seq_len] of one prefix per example (prefix_len [batch]):
  prefix_len[b] for the queries inside the prefix, 0 (causal only) for the others."""
  bound = prefix_len.astype(jnp.int32)[:, None]  # [batch, 1]
  return jnp.where(jnp.arange(seq_len)[None, :] < bound, bound, 0)


def _pad_axis(x, axis, size, value=0):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def flash_attention(
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
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
) -> jax.Array:
  """Memory-efficient attention, differentiable in query, key and value.

  Args:
    query: [batch, q_len, heads, head_dim], float32 or bfloat16.
    key: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads, query head h reads kv
      head h // (heads // kv_heads).
    value: [batch, kv_len, kv_heads, head_dim].
    causal: query i sees keys j <= i (positions counted from 0 on both sides).
    segment_ids: [batch, q_len] int; a query sees only keys with the same id (packing).
    kv_segment_ids: [batch, kv_len] int; defaults to `segment_ids` (self-attention).
    kv_lengths: [batch] int; keys at positions >= kv_lengths[b] are padding.
    prefix_len: [batch] int, with `causal` and q_len == kv_len: positions < prefix_len[b]
      also see each other bidirectionally.
    prefix_end: [batch, q_len] int, with `causal` and q_len == kv_len, instead of
      `prefix_len`: query i also sees keys j < prefix_end[b, i] (0: causal only). A packed
      row gives each prefix token its own example's prefix end; segments still apply.
    scale: logit scale; head_dim ** -0.5 by default.
    block_q, block_k: block sizes; `default_block_sizes` by default.
    interpret: run the kernels in the Pallas interpreter; default: on CPU.
    backend: the platform to build for, 'cpu' | 'gpu' | 'tpu' (default: JAX's default
      backend). It picks block sizes, the compiler (Triton on GPU, Mosaic on TPU) and the
      layout: on TPU the kernels see [batch, heads, seq, head_dim] (a transpose here), so
      that every block's last two dims are whole rows and tiles. Interpreted kernels run
      any backend's variant on CPU.

  Returns:
    [batch, q_len, heads, head_dim] in the query's dtype. A query that sees no key gets 0.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f'kv heads ({num_kv_heads}) must divide query heads ({num_heads})')
  if prefix_len is not None and prefix_end is not None:
    raise ValueError('give prefix_len or prefix_end, not both')
  if (prefix_len is not None or prefix_end is not None) and (not causal or q_len != kv_len):
    raise ValueError('prefix_len and prefix_end need causal=True and q_len == kv_len')
  backend = backend or jax.default_backend()
  if interpret is None:
    interpret = backend == 'cpu'
  default_q, default_k = default_block_sizes(q_len, kv_len, head_dim, backend)
  block_q, block_k = block_q or default_q, block_k or default_k
  if scale is None:
    scale = head_dim**-0.5
  q_padded, kv_padded = _round_up(q_len, block_q), _round_up(kv_len, block_k)
  if causal:  # causal masks compare positions across the two sides: give them one length
    q_padded = kv_padded = _round_up(max(q_len, kv_len), math.lcm(block_q, block_k))
  # Triton wants power-of-two tiles: pad head_dim there (zeros change neither logits nor out).
  dim_padded = _next_power_of_2(head_dim) if backend == 'gpu' and not interpret else head_dim

  use_segments = segment_ids is not None or kv_segment_ids is not None or kv_lengths is not None
  q_seg = kv_seg = prefix = first_prefix_query = None
  if use_segments:
    if segment_ids is None:
      segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    if kv_segment_ids is None:
      kv_segment_ids = (segment_ids if kv_len == q_len
                        else jnp.zeros((batch, kv_len), jnp.int32))
    kv_seg = kv_segment_ids.astype(jnp.int32)
    if kv_lengths is not None:
      kv_seg = jnp.where(jnp.arange(kv_len)[None, :] < kv_lengths[:, None], kv_seg, _PAD_SEGMENT)
    q_seg = _pad_axis(segment_ids.astype(jnp.int32), 1, q_padded)[:, :, None]  # [b, sq, 1]
    kv_seg = _pad_axis(kv_seg, 1, kv_padded, _PAD_SEGMENT)[:, None, :]  # [b, 1, skv]
  if prefix_len is not None:
    prefix_end = prefix_end_from_len(prefix_len, q_len)
  if prefix_end is not None:
    prefix = _pad_axis(prefix_end.astype(jnp.int32), 1, q_padded)[:, :, None]  # [b, sq, 1]
    first_prefix_query = _first_prefix_queries(prefix, kv_padded // block_k, block_k)

  static = _Static(scale=float(scale), causal=causal, use_segments=use_segments,
                   use_prefix=prefix_end is not None, kv_len=kv_len, kv_padded=kv_padded,
                   block_q=block_q, block_k=block_k, interpret=bool(interpret), backend=backend)

  def prepare(x, padded_len):  # [b, s, h, d] -> padded, in the kernels' layout
    x = _pad_axis(_pad_axis(x, 1, padded_len), 3, dim_padded)
    return x.transpose(0, 2, 1, 3) if static.heads_major else x

  out = _flash_core(static, prepare(query, q_padded), prepare(key, kv_padded),
                    prepare(value, kv_padded), (q_seg, kv_seg, prefix, first_prefix_query))
  if static.heads_major:
    out = out.transpose(0, 2, 1, 3)
  return out[:, :q_len, :, :head_dim]
