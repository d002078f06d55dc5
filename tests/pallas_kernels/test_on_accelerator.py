"""The compiled kernels (Triton on GPU, Mosaic on TPU) against the jnp references.

Skipped on CPU, where the kernels only run interpreted (the other tests in this folder cover
that). `benchmarks/accelerator_check.sh` runs this file and the kernel benchmark on a GPU or
TPU machine in one go.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, reference

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
