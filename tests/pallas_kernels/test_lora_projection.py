"""Fused (Q)LoRA projection: interpret mode against the jnp reference (outputs and gradients)
for float, int8 and NF4 weights, and lowering for GPU (Triton) and TPU (Mosaic) by export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lora_projection, reference


def _relative_error(ours, expected):
  ours, expected = np.asarray(ours, np.float32), np.asarray(expected, np.float32)
  return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


def _weight(rng, kind, in_features, out_features, dtype):
  """(weight, keyword arguments that go with it) of `kind` 'float' | 'int8' | 'nf4'.

  NF4: random codes for every packed row, padding rows included (the kernel must ignore
  those past in_features), and random block absmax.
  """
  if kind == 'float':
    return jnp.asarray(rng.normal(size=(in_features, out_features)), dtype), {}
  if kind == 'int8':
    weight = jnp.asarray(rng.integers(-127, 128, size=(in_features, out_features)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.01, 0.02, size=out_features), jnp.float32)
    return weight, {'weight_scale': scale}
  in_pad = -(-in_features // 128) * 128
  packed = jnp.asarray(rng.integers(0, 256, size=(in_pad // 2, out_features)), jnp.uint8)
  absmax = jnp.asarray(rng.uniform(0.5, 2.0, size=(in_pad // 64, out_features)), jnp.float32)
  return packed, {'weight_absmax': absmax}


@pytest.mark.parametrize('weight_kind,dtype,in_features,block_k,tolerance', [
    ('float', jnp.float32, 40, 16, 1e-5),
    ('int8', jnp.float32, 40, 16, 1e-5),
    ('float', jnp.bfloat16, 40, 16, 2e-2),
    ('nf4', jnp.float32, 200, 64, 1e-5),  # in_pad 256: two steps of one absmax row each
    ('nf4', jnp.float32, 200, 128, 1e-5),  # one step whose tile spans two absmax rows
    ('nf4', jnp.float32, 300, None, 1e-5),  # in_pad 384: default block_k (64 divides 192)
    ('nf4', jnp.bfloat16, 200, None, 2e-2),
])
def test_matches_reference(weight_kind, dtype, in_features, block_k, tolerance):
  rng = np.random.default_rng(0)
  out_features, rank = 24, 4  # ragged against the 16-wide blocks
  x = jnp.asarray(rng.normal(size=(2, 9, in_features)), dtype)
  weight, weight_kwargs = _weight(rng, weight_kind, in_features, out_features, dtype)
  lora_a = jnp.asarray(rng.normal(size=(in_features, rank)), dtype)
  lora_b = jnp.asarray(rng.normal(size=(rank, out_features)), dtype)
  cotangent = jnp.asarray(rng.normal(size=(2, 9, out_features)), dtype)

  def run(projection, **kwargs):
    fn = lambda x, a, b: projection(x, weight, a, b, scale=0.5, **weight_kwargs, **kwargs)
    out, pullback = jax.vjp(fn, x, lora_a, lora_b)
    return (out, *pullback(cotangent))

  got = jax.jit(lambda: run(lora_projection.lora_projection, block_m=8, block_n=16,
                            block_k=block_k, interpret=True))()
  want = jax.jit(lambda: run(reference.lora_projection))()
  for name, ours, expected in zip(('y', 'dx', 'dA', 'dB'), got, want):
    assert ours.shape == expected.shape and ours.dtype == expected.dtype, name
    error = _relative_error(ours, expected)
    print(f'{weight_kind} {dtype.__name__} in={in_features} {name}: relative error {error:.1e}')
    assert error <= tolerance, (name, error)


def test_nf4_decode_matches_the_reference_table():
  """Every byte value: the kernel's select-tree decode equals the reference's table lookup."""
  packed = jnp.arange(256, dtype=jnp.uint8).reshape(64, 4)  # in_pad 128, 4 outputs
  absmax = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, size=(2, 4)), jnp.float32)
  np.testing.assert_array_equal(lora_projection.dequantize_nf4(packed, absmax),
                                reference.dequantize_nf4(packed, absmax))


def test_weight_arguments_are_checked():
  x = jnp.zeros((2, 8))
  lora_a, lora_b = jnp.zeros((8, 2)), jnp.zeros((2, 4))
  with pytest.raises(ValueError, match='int8'):
    lora_projection.lora_projection(x, jnp.zeros((8, 4)), lora_a, lora_b, scale=1.0,
                                    weight_scale=jnp.ones(4))
  with pytest.raises(ValueError, match='uint8'):
    lora_projection.lora_projection(x, jnp.zeros((64, 4)), lora_a, lora_b, scale=1.0,
                                    weight_absmax=jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='packed layout'):  # absmax rows != in_pad / 64
    lora_projection.lora_projection(x, jnp.zeros((64, 4), jnp.uint8), lora_a, lora_b,
                                    scale=1.0, weight_absmax=jnp.ones((1, 4)))
  with pytest.raises(ValueError, match='block_k'):
    lora_projection.lora_projection(x, jnp.zeros((64, 4), jnp.uint8), lora_a, lora_b,
                                    scale=1.0, weight_absmax=jnp.ones((2, 4)), block_k=96)


# platform -> (backend argument, custom call the Pallas lowering emits)
_PLATFORMS = {'cuda': ('gpu', '__gpu$xla.gpu.triton'), 'tpu': ('tpu', 'tpu_custom_call')}


def _abstract_operands(kind, tokens, in_features, out_features, rank):
  """ShapeDtypeStructs (x, weight, lora_a, lora_b, weight aux or None), bfloat16 compute."""
  struct = jax.ShapeDtypeStruct
  if kind == 'nf4':
    in_pad = -(-in_features // 128) * 128
    weight = struct((in_pad // 2, out_features), jnp.uint8)
    aux = struct((in_pad // 64, out_features), jnp.float32)
  elif kind == 'int8':
    weight, aux = struct((in_features, out_features), jnp.int8), struct((out_features,),
                                                                        jnp.float32)
  else:
    weight, aux = struct((in_features, out_features), jnp.bfloat16), None
  return (struct((tokens, in_features), jnp.bfloat16), weight,
          struct((in_features, rank), jnp.bfloat16), struct((rank, out_features), jnp.bfloat16),
          aux)


@pytest.mark.parametrize('weight_kind', ['bf16', 'int8', 'nf4'])
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_lowers_for_gpu_and_tpu(platform, weight_kind):
  """Forward and jax.value_and_grad export for the platform with the Pallas kernel inside.

  This checks that Pallas lowers the kernel to Triton / Mosaic (nothing compiles or runs):
  a 7B gate_proj and down_proj, and a small ragged shape that the wrapper pads up.
  """
  backend, custom_call = _PLATFORMS[platform]
  aux_name = {'int8': 'weight_scale', 'nf4': 'weight_absmax'}.get(weight_kind)

  def forward(x, weight, lora_a, lora_b, aux):
    kwargs = {aux_name: aux} if aux_name else {}
    return lora_projection.lora_projection(x, weight, lora_a, lora_b, scale=2.0,
                                           backend=backend, interpret=False, **kwargs)

  def loss(x, weight, lora_a, lora_b, aux):
    return jnp.sum(forward(x, weight, lora_a, lora_b, aux).astype(jnp.float32))

  # value_and_grad: the loss keeps the forward kernel alive (a bare grad drops it).
  value_and_grad = jax.value_and_grad(loss, argnums=(0, 2, 3))
  for tokens, in_features, out_features, rank in ((256, 4096, 11008, 16),
                                                  (256, 11008, 4096, 16), (9, 200, 72, 4)):
    x, weight, lora_a, lora_b, aux = _abstract_operands(
        weight_kind, tokens, in_features, out_features, rank)
    for fn in (forward, value_and_grad):
      exported = jax.export.export(
          jax.jit(fn), platforms=[platform],
          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)],
      )(x, weight, lora_a, lora_b, aux)
      assert custom_call in exported.mlir_module(), (fn.__name__, in_features)
