"""The Dense matmul's custom backward equals plain autodiff of lax.dot_general."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvlm_jax.models import matmul


@pytest.mark.parametrize('in_shape,out_shape', [((6,), (10,)), ((10,), (6,)), ((2, 4), (5,)),
                                                ((7,), (3, 4))])
def test_gradients_match_lax_dot_general(in_shape, out_shape):
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(size=(2, 3, *in_shape)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(*in_shape, *out_shape)), jnp.float32)
  num = len(in_shape)
  dims = ((tuple(range(2, 2 + num)), tuple(range(num))), ((), ()))
  cotangent = jnp.asarray(rng.normal(size=(2, 3, *out_shape)), jnp.float32)

  def loss(dot_general, x, w):
    return jnp.sum(dot_general(x, w, dims) * cotangent)

  ours = jax.grad(lambda x, w: loss(matmul.dense_dot_general, x, w), argnums=(0, 1))
  plain = jax.grad(lambda x, w: loss(jax.lax.dot_general, x, w), argnums=(0, 1))
  np.testing.assert_allclose(matmul.dense_dot_general(inputs, kernel, dims),
                             jax.lax.dot_general(inputs, kernel, dims), rtol=1e-5, atol=1e-5)
  for got, want in zip(ours(inputs, kernel), plain(inputs, kernel)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_keep_their_dtype():
  inputs = jnp.ones((4, 8), jnp.bfloat16)
  kernel = jnp.ones((8, 3), jnp.bfloat16)
  dims = (((1,), (0,)), ((), ()))
  out, grads = jax.value_and_grad(
      lambda x, w: matmul.dense_dot_general(x, w, dims).astype(jnp.float32).sum(),
      argnums=(0, 1))(inputs, kernel)
  assert float(out) == 4 * 3 * 8
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(grads[1], np.float32), 4.0)
