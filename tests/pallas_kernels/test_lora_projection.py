"""Fused (Q)LoRA projection (interpret mode) against the jnp reference: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lora_projection, reference


def _relative_error(ours, expected):
  ours, expected = np.asarray(ours, np.float32), np.asarray(expected, np.float32)
  return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize('weight_kind,dtype,tolerance', [
    ('float', jnp.float32, 1e-5),
    ('int8', jnp.float32, 1e-5),
    ('float', jnp.bfloat16, 2e-2),
])
def test_matches_reference(weight_kind, dtype, tolerance):
  rng = np.random.default_rng(0)
  in_features, out_features, rank = 40, 24, 4  # ragged against the 16-wide blocks
  x = jnp.asarray(rng.normal(size=(2, 9, in_features)), dtype)
  if weight_kind == 'int8':
    weight = jnp.asarray(rng.integers(-127, 128, size=(in_features, out_features)), jnp.int8)
    weight_scale = jnp.asarray(rng.uniform(0.01, 0.02, size=out_features), jnp.float32)
  else:
    weight = jnp.asarray(rng.normal(size=(in_features, out_features)), dtype)
    weight_scale = None
  lora_a = jnp.asarray(rng.normal(size=(in_features, rank)), dtype)
  lora_b = jnp.asarray(rng.normal(size=(rank, out_features)), dtype)
  cotangent = jnp.asarray(rng.normal(size=(2, 9, out_features)), dtype)

  def run(projection, **kwargs):
    fn = lambda x, a, b: projection(x, weight, a, b, scale=0.5, weight_scale=weight_scale,
                                    **kwargs)
    out, pullback = jax.vjp(fn, x, lora_a, lora_b)
    return (out, *pullback(cotangent))

  got = jax.jit(lambda: run(lora_projection.lora_projection, block_m=8, block_n=16,
                            block_k=16, interpret=True))()
  want = jax.jit(lambda: run(reference.lora_projection))()
  for name, ours, expected in zip(('y', 'dx', 'dA', 'dB'), got, want):
    assert ours.shape == expected.shape and ours.dtype == expected.dtype, name
    error = _relative_error(ours, expected)
    print(f'{weight_kind} {dtype.__name__} {name}: relative error {error:.1e}')
    assert error <= tolerance, (name, error)


def test_weight_scale_must_come_with_int8():
  x = jnp.zeros((2, 8))
  with pytest.raises(ValueError, match='int8'):
    lora_projection.lora_projection(x, jnp.zeros((8, 4)), jnp.zeros((8, 2)), jnp.zeros((2, 4)),
                                    scale=1.0, weight_scale=jnp.ones(4))
