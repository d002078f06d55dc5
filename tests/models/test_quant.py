"""int8 and NF4 quantization: round trips within their known error bounds, against numpy."""

import jax
import numpy as np
import pytest

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


def nf4_reference(kernel, num_in=1):
  """Independent numpy NF4: nearest code value per weight, per 64 input rows of each output.

  Returns (dequantized kernel, absmax [in_pad / 64, out...], codes [in_pad, out...]).
  """
  out_shape = kernel.shape[num_in:]
  rows = kernel.reshape(-1, *out_shape)
  in_size = rows.shape[0]
  rows = np.pad(rows, [(0, -in_size % 128)] + [(0, 0)] * len(out_shape))
  blocks = rows.reshape(-1, 64, *out_shape)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  normalized = blocks / np.where(absmax > 0, absmax, 1.0)  # all-zero padding blocks -> 0
  codes = np.argmin(np.abs(normalized[..., None] - quant.NF4_CODE), axis=-1)
  restored = (quant.NF4_CODE[codes] * absmax).reshape(-1, *out_shape)[:in_size]
  return restored.reshape(kernel.shape), absmax[:, 0], codes.reshape(-1, *out_shape)


def test_nf4_matches_nearest_code_and_error_bound():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(200, 24)).astype(np.float32)  # in_pad 256: 4 blocks per column
  kernel[3, :] *= 10.0  # an outlier row: only its own blocks lose precision
  packed, absmax = quant.quantize_nf4(kernel)
  assert packed.dtype == np.uint8 and packed.shape == (128, 24) and absmax.shape == (4, 24)
  want, want_absmax, want_codes = nf4_reference(kernel)
  np.testing.assert_allclose(absmax, want_absmax, rtol=1e-7)
  # The layout: byte row r holds input row r (low nibble) and row r + 128 (high nibble).
  packed = np.asarray(packed)
  np.testing.assert_array_equal(packed & 15, want_codes[:128])
  np.testing.assert_array_equal(packed >> 4, want_codes[128:])
  restored = np.asarray(quant.dequantize_nf4(packed, absmax, kernel.shape))
  np.testing.assert_allclose(restored, want, atol=1e-6)
  block_absmax = np.repeat(np.asarray(absmax), 64, axis=0)[:200]
  assert np.all(np.abs(restored - kernel) <= block_absmax * quant.NF4_MAX_HALF_GAP + 1e-6)
  # 4 bits per (padded) weight plus one float32 per 64 of them.
  assert packed.nbytes + absmax.nbytes == 256 * 24 // 2 + 4 * 4 * 24


def test_nf4_keeps_output_axes_pads_inputs_and_vmaps_over_layers():
  # 3 layers of a [heads=2, head_dim=5, out=7] kernel: 10 input rows, padded to 128.
  kernel = np.random.default_rng(2).normal(size=(3, 2, 5, 7)).astype(np.float32)
  stored = quant.quantize_stacked(kernel, 'nf4', 1, (0, 1))
  assert stored['kernel_nf4'].shape == (3, 64, 7)
  assert stored['kernel_absmax'].shape == (3, 2, 7)
  restored = jax.vmap(lambda p, a: quant.dequantize_nf4(p, a, (2, 5, 7)))(
      stored['kernel_nf4'], stored['kernel_absmax'])
  for layer in range(3):
    np.testing.assert_allclose(restored[layer], nf4_reference(kernel[layer], 2)[0], atol=1e-6)
  # Output axes are kept: [in, heads, head_dim] -> packed [in_pad / 2, heads, head_dim].
  packed, absmax = quant.quantize_nf4(kernel[0].reshape(10, 7).T.reshape(7, 1, 10), (0,))
  assert packed.shape == (64, 1, 10) and absmax.shape == (2, 1, 10)
  with pytest.raises(ValueError, match='input axes first'):
    quant.quantize_nf4(kernel[0], (1,))
