"""Flash attention kernels (interpret mode) against the jnp reference: outputs and gradients.

The grid is small on purpose (each case compiles a forward and two backward kernels): every
mask kind, GQA ratios 1/2/4/8, ragged lengths, segment boundaries inside a block, float32 and
bfloat16, a row that sees no key; each in the sequence-major layout (CPU, GPU) and the
heads-major one the TPU variant uses. Lowering for GPU (Triton) and TPU (Mosaic) is checked by
exporting for those platforms from CPU: that proves the kernels lower, not that they compile
or run on the hardware.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, reference

F32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2


def _inputs(rng, batch, seq, heads, kv_heads, head_dim, dtype):
  shapes = [(batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim),
            (batch, seq, kv_heads, head_dim)]
  return [jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes]


def _relative_error(ours, expected):
  ours, expected = np.asarray(ours, np.float32), np.asarray(expected, np.float32)
  return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


def _value_and_grads(attention_fn, query, key, value, cotangent):
  out, pullback = jax.vjp(attention_fn, query, key, value)
  return (out, *pullback(cotangent))


# (name, seq, heads, kv_heads, head_dim, block_q, block_k, dtype, mask kwargs)
CASES = [
    ('vit_ragged', 20, 2, 2, 32, 8, 16, jnp.float32, {}),
    ('causal_gqa2_bf16', 24, 4, 2, 64, 16, 8, jnp.bfloat16, {'causal': True}),
    ('causal_segments_gqa4', 29, 4, 1, 16, 8, 16, jnp.float32,
     {'causal': True, 'segment_ids': np.array([[0] * 11 + [1] * 13 + [2] * 5,
                                              [0] * 3 + [1] * 26])}),
    ('prefix_gqa8', 21, 8, 1, 16, 16, 8, jnp.float32,
     {'causal': True, 'prefix_len': np.array([9, 0])}),
    # Two packed examples per row, each with its own bidirectional prefix, then padding.
    ('packed_prefixes', 24, 4, 2, 16, 8, 8, jnp.float32,
     {'causal': True,
      'segment_ids': np.array([[1] * 9 + [2] * 12 + [0] * 3, [1] * 20 + [2] * 4]),
      'prefix_end': np.array([[4] * 4 + [0] * 5 + [14] * 5 + [0] * 10,
                              [0] * 20 + [23] * 3 + [0]])}),
    ('kv_lengths_padding_segments', 18, 2, 1, 16, 8, 8, jnp.float32,
     {'kv_lengths': np.array([11, 18]),
      'kv_segment_ids': np.array([[0] * 4 + [1] * 14, [1] * 18]),
      'segment_ids': np.ones((2, 18), np.int32)}),
]


@pytest.mark.parametrize('backend', ['cpu', 'tpu'])
@pytest.mark.parametrize('case', CASES, ids=[case[0] for case in CASES])
def test_matches_reference(case, backend):
  _, seq, heads, kv_heads, head_dim, block_q, block_k, dtype, mask_kwargs = case
  rng = np.random.default_rng(seq)
  query, key, value = _inputs(rng, 2, seq, heads, kv_heads, head_dim, dtype)
  cotangent = jnp.asarray(rng.normal(size=query.shape), dtype)
  mask_kwargs = {name: (jnp.asarray(arg) if isinstance(arg, np.ndarray) else arg)
                 for name, arg in mask_kwargs.items()}

  def ours(q, k, v):
    return flash_attention.flash_attention(q, k, v, block_q=block_q, block_k=block_k,
                                           interpret=True, backend=backend, **mask_kwargs)

  def expected(q, k, v):
    return reference.attention(q, k, v, **mask_kwargs)

  tolerance = F32_TOLERANCE if dtype == jnp.float32 else BF16_TOLERANCE
  got = jax.jit(lambda *args: _value_and_grads(ours, *args))(query, key, value, cotangent)
  want = jax.jit(lambda *args: _value_and_grads(expected, *args))(query, key, value, cotangent)
  for name, ours_value, want_value in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert ours_value.dtype == want_value.dtype, name
    error = _relative_error(ours_value, want_value)
    print(f'{case[0]} {backend} {name}: relative error {error:.1e}')
    assert error <= tolerance, (name, error)


def test_query_that_sees_no_key_gets_zero_and_finite_grads():
  rng = np.random.default_rng(0)
  query, key, value = _inputs(rng, 1, 16, 2, 2, 16, jnp.float32)
  # Left padding: the first 5 keys are padding, so causal queries 0..4 see nothing.
  kv_segments = jnp.asarray([[0] * 5 + [1] * 11])
  kwargs = {'causal': True, 'segment_ids': jnp.ones((1, 16), jnp.int32),
            'kv_segment_ids': kv_segments, 'block_q': 8, 'block_k': 8, 'interpret': True}

  out, *grads = _value_and_grads(
      lambda q, k, v: flash_attention.flash_attention(q, k, v, **kwargs), query, key, value,
      jnp.ones(query.shape))
  assert np.all(np.asarray(out[:, :5]) == 0)
  assert np.abs(np.asarray(out[:, 5:])).min() > 0
  assert all(np.all(np.isfinite(np.asarray(grad))) for grad in grads)
  assert np.all(np.asarray(grads[1][:, :5]) == 0)  # padding keys get no gradient


def test_default_block_sizes_follow_the_table_and_shrink():
  assert flash_attention.default_block_sizes(4096, 4096, 128, 'gpu') == (128, 64)
  assert flash_attention.default_block_sizes(4096, 4096, 64, 'tpu') == (128, 128)
  assert flash_attention.default_block_sizes(20, 40, 64, 'cpu') == (32, 64)
  assert flash_attention.default_block_sizes(5, 5, 64, 'cpu') == (16, 16)
  assert flash_attention.default_block_sizes(20, 40, 64, 'tpu') == (128, 128)  # lane floor


def test_rejects_bad_arguments():
  query = jnp.zeros((1, 8, 3, 16))
  key = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match='must divide'):
    flash_attention.flash_attention(query, key, key)
  with pytest.raises(ValueError, match='prefix_len'):
    flash_attention.flash_attention(query, query, query, prefix_len=jnp.array([2]))


# (seq, heads, kv_heads, head_dim, dtype, causal): a 7B-like GQA layer, a CLIP-336 tower
# (577 tokens, head_dim 80, no mask), a SigLIP-like head_dim 72, a short ragged decoder.
LOWERING_SHAPES = [
    (4096, 32, 8, 128, jnp.bfloat16, True),
    (577, 16, 16, 80, jnp.float32, False),
    (300, 4, 4, 72, jnp.bfloat16, False),
    (1000, 8, 1, 64, jnp.bfloat16, True),
    (300, 4, 2, 64, jnp.bfloat16, True),  # causal, padded to a length that is no power of two
]
# The Triton custom call carries no export compatibility guarantee; export needs it allowed.
_ALLOW_TRITON = jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_lowers_for_gpu_and_tpu(platform):
  backend, kernel_call = {'cuda': ('gpu', '__gpu$xla.gpu.triton'),
                          'tpu': ('tpu', 'tpu_custom_call')}[platform]
  batch = 2
  for seq, heads, kv_heads, head_dim, dtype, causal in LOWERING_SHAPES:
    query = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype)
    key = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), dtype)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    mask_sets = [{}] if not causal else [
        {}, {'segment_ids': ids, 'kv_lengths': lengths}, {'prefix_len': lengths},
        {'segment_ids': ids, 'prefix_end': ids}]
    for mask_names in mask_sets:

      def loss_and_grads(q, k, v, segment_ids, lengths, mask_names=mask_names):
        masks = {'segment_ids': segment_ids, 'kv_lengths': lengths, 'prefix_len': lengths,
                 'prefix_end': segment_ids}
        attend = lambda q, k, v: flash_attention.flash_attention(
            q, k, v, causal=causal, interpret=False, backend=backend,
            **{name: masks[name] for name in mask_names})
        return jax.value_and_grad(lambda *qkv: attend(*qkv).astype(jnp.float32).sum(),
                                  argnums=(0, 1, 2))(q, k, v)

      exported = jax.export.export(jax.jit(loss_and_grads), platforms=[platform],
                                   disabled_checks=[_ALLOW_TRITON])(
                                       query, key, key, ids, lengths)
      # Forward, dq and dk/dv: three kernels, all lowered by the platform's Pallas compiler.
      module = exported.mlir_module()
      assert module.count(kernel_call) == 3, (seq, head_dim, sorted(mask_names))
      assert exported.out_avals[1].shape == query.shape
