"""int8 and NF4 quantization: round trips within their known error bounds, against numpy."""

import jax
import numpy as np

from openvlm_jax.models import quant


def test_int8_error_is_at_most_half_a_step_per_output_channel():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(48, 6, 8)).astype(np.float32)  # [in, heads, head_dim]
  q, scale = quant.quantize_int8(kernel, in_axes=(0,))
  assert q.dtype == np.int8 and scale.shape == (1, 6, 8)
  np.testing.assert_allclose(scale, np.abs(kernel).max(axis=0, keepdims=True) / 127, rtol=1e-6)
  error = np.abs(np.asarray(quant.dequantize_int8(q, scale)) - kernel)
  assert np.all(error <= np.asarray(scale) / 2 + 1e-7)
  # The largest weight of each channel is exact (it maps to +-127).
  assert np.all(np.abs(np.asarray(q)).max(axis=0) == 127)


def nf4_reference(kernel):
  """Independent numpy NF4: nearest code value per weight, per block of 64."""
  blocks = np.pad(kernel.reshape(-1), (0, -kernel.size % 64)).reshape(-1, 64)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  nearest = np.argmin(np.abs(blocks[..., None] / absmax[..., None] - quant.NF4_CODE), axis=-1)
  return (quant.NF4_CODE[nearest] * absmax).reshape(-1)[:kernel.size].reshape(kernel.shape)


def test_nf4_matches_nearest_code_and_error_bound():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(40, 24)).astype(np.float32)  # 960 = 15 blocks of 64
  kernel[3, :] *= 10.0  # an outlier row: only its own blocks lose precision
  packed, absmax = quant.quantize_nf4(kernel)
  assert packed.dtype == np.uint8 and packed.shape == (15, 32) and absmax.shape == (15,)
  restored = np.asarray(quant.dequantize_nf4(packed, absmax, kernel.shape))
  np.testing.assert_allclose(restored, nf4_reference(kernel), atol=1e-6)
  block_absmax = np.repeat(np.asarray(absmax), 64)[:kernel.size].reshape(kernel.shape)
  assert np.all(np.abs(restored - kernel) <= block_absmax * quant.NF4_MAX_HALF_GAP + 1e-6)
  # 4 bits per weight plus one float32 per 64 weights.
  assert packed.nbytes + absmax.nbytes == kernel.size // 2 + 4 * 15


def test_nf4_pads_a_ragged_last_block_and_vmaps_over_layers():
  kernel = np.random.default_rng(2).normal(size=(3, 10, 7)).astype(np.float32)  # 70 per layer
  stored = quant.quantize_stacked(kernel, 'nf4', 1, (0,))
  assert stored['kernel_nf4'].shape == (3, 2, 32)
  restored = jax.vmap(lambda p, a: quant.dequantize_nf4(p, a, (10, 7)))(
      stored['kernel_nf4'], stored['kernel_absmax'])
  for layer in range(3):
    np.testing.assert_allclose(restored[layer], nf4_reference(kernel[layer]), atol=1e-6)
