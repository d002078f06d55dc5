"""The compiled kernels (Triton on GPU, Mosaic on TPU) against the jnp references.

Skipped on CPU, where the kernels only run interpreted (the other tests in this folder cover
that). `benchmarks/accelerator_check.sh` runs this file and the kernel benchmark on a GPU or
TPU machine in one go.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, lora_projection, reference

BACKEND = jax.default_backend()
pytestmark = pytest.mark.skipif(BACKEND not in ('gpu', 'tpu'),
                                reason='compiled Pallas kernels need a GPU or TPU')

# The hardware's float32 matmuls may use TF32 / bf16 passes: bounds are looser than on CPU.
F32_TOLERANCE = 2e-3
BF16_TOLERANCE = 3e-2


def _relative_error(ours, expected):
  ours, expected = np.asarray(ours, np.float32), np.asarray(expected, np.float32)
  return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


# (name, batch, seq, heads, kv_heads, head_dim, dtype, mask kwargs builder)
ATTENTION_CASES = [
    ('causal_gqa4_d128_bf16', 2, 1024, 8, 2, 128, jnp.bfloat16, lambda b, s: {'causal': True}),
    ('causal_d64_f32_ragged', 2, 1000, 4, 4, 64, jnp.float32, lambda b, s: {'causal': True}),
    ('vit_d80_577', 2, 577, 4, 4, 80, jnp.bfloat16, lambda b, s: {}),
    ('vit_d72_ragged', 1, 300, 2, 2, 72, jnp.float32, lambda b, s: {}),
    ('prefix_gqa8', 2, 512, 8, 1, 64, jnp.bfloat16,
     lambda b, s: {'causal': True, 'prefix_len': jnp.array([300, 0])}),
    ('segments_and_padding', 2, 640, 4, 2, 128, jnp.bfloat16,
     lambda b, s: {'causal': True,
                   'segment_ids': jnp.asarray(np.repeat([[0, 1, 2, 3]], b, 0).repeat(s // 4, 1)),
                   'kv_lengths': jnp.array([s, s - 77])}),
]


@pytest.mark.parametrize('case', ATTENTION_CASES, ids=[case[0] for case in ATTENTION_CASES])
def test_compiled_flash_attention_matches_reference(case):
  _, batch, seq, heads, kv_heads, head_dim, dtype, mask_fn = case
  rng = np.random.default_rng(seq)
  query = jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), dtype)
  key = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, head_dim)), dtype)
  value = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, head_dim)), dtype)
  cotangent = jnp.asarray(rng.normal(size=query.shape), dtype)
  masks = mask_fn(batch, seq)

  def value_and_grads(attend):
    def run(q, k, v, d_out):
      out, pullback = jax.vjp(attend, q, k, v)
      return (out, *pullback(d_out))
    return jax.jit(run)(query, key, value, cotangent)

  got = value_and_grads(lambda q, k, v: flash_attention.flash_attention(
      q, k, v, interpret=False, **masks))
  want = value_and_grads(lambda q, k, v: reference.attention(q, k, v, **masks))
  tolerance = F32_TOLERANCE if dtype == jnp.float32 else BF16_TOLERANCE
  for name, ours, expected in zip(('out', 'dq', 'dk', 'dv'), got, want):
    error = _relative_error(ours, expected)
    print(f'{case[0]} {BACKEND} {name}: relative error {error:.1e}')
    assert error <= tolerance, (name, error)


def _projection_weight(rng, kind, in_features, out_features):
  """(weight, keyword arguments) of `kind` 'bf16' | 'int8' | 'nf4' (random packed codes)."""
  if kind == 'bf16':
    return jnp.asarray(rng.normal(size=(in_features, out_features)) * 0.02, jnp.bfloat16), {}
  if kind == 'int8':
    weight = jnp.asarray(rng.integers(-127, 128, size=(in_features, out_features)), jnp.int8)
    return weight, {'weight_scale': jnp.asarray(
        rng.uniform(1e-4, 2e-4, size=out_features), jnp.float32)}
  in_pad = -(-in_features // 128) * 128
  packed = jnp.asarray(rng.integers(0, 256, size=(in_pad // 2, out_features)), jnp.uint8)
  absmax = jnp.asarray(rng.uniform(0.01, 0.03, size=(in_pad // 64, out_features)), jnp.float32)
  return packed, {'weight_absmax': absmax}


@pytest.mark.parametrize('kind', ['bf16', 'int8', 'nf4'])
@pytest.mark.parametrize('tokens,in_features,out_features', [(512, 4096, 1024), (300, 1000, 520)])
def test_compiled_lora_projection_matches_reference(kind, tokens, in_features, out_features):
  rng = np.random.default_rng(in_features)
  rank = 16
  x = jnp.asarray(rng.normal(size=(tokens, in_features)), jnp.bfloat16)
  weight, weight_kwargs = _projection_weight(rng, kind, in_features, out_features)
  lora_a = jnp.asarray(rng.normal(size=(in_features, rank)) * 0.02, jnp.bfloat16)
  lora_b = jnp.asarray(rng.normal(size=(rank, out_features)) * 0.02, jnp.bfloat16)
  cotangent = jnp.asarray(rng.normal(size=(tokens, out_features)), jnp.bfloat16)

  def value_and_grads(projection, **kwargs):
    def run(x, a, b, d_out):
      fn = lambda x, a, b: projection(x, weight, a, b, scale=2.0, **weight_kwargs, **kwargs)
      out, pullback = jax.vjp(fn, x, a, b)
      return (out, *pullback(d_out))
    return jax.jit(run)(x, lora_a, lora_b, cotangent)

  got = value_and_grads(lora_projection.lora_projection, interpret=False)
  want = value_and_grads(reference.lora_projection)
  for name, ours, expected in zip(('y', 'dx', 'dA', 'dB'), got, want):
    error = _relative_error(ours, expected)
    print(f'{kind} {tokens}x{in_features}x{out_features} {BACKEND} {name}: {error:.1e}')
    assert error <= BF16_TOLERANCE, (name, error)
