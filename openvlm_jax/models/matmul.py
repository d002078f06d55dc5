"""The Dense layers' matmul, with a backward pass laid out for XLA's CPU dot kernels.

XLA on CPU hands a dot to its fast kernel (YNNPACK) only when both operands have a plain
row-major layout. The weight gradient x^T dy of a Dense layer does not: XLA folds the
transpose into the dot and falls back to a kernel about 3x slower, which made our train step
slower than PyTorch's. Here the backward pass materialises the transposes (of the weight for
dx, and of the smaller of x and dy for dW) behind `lax.optimization_barrier`, so every dot of
the step takes the fast path. On GPU and TPU plain `lax.dot_general` is used: their compilers
pick layouts themselves, and the extra copies would only cost memory traffic.
"""

import functools
import math

import jax
import jax.numpy as jnp


def _plain_contraction(lhs_ndim: int, dimension_numbers) -> int:
  """Number of contracted axes if lhs's trailing axes meet rhs's leading ones, else 0."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  num = len(lhs_contract)
  plain = (not lhs_batch and not rhs_batch
           and tuple(lhs_contract) == tuple(range(lhs_ndim - num, lhs_ndim))
           and tuple(rhs_contract) == tuple(range(num)))
  return num if plain else 0


def _dot(lhs: jax.Array, rhs: jax.Array, out_dtype) -> jax.Array:
  """A 2-D matmul accumulated in float32."""
  return jnp.dot(lhs, rhs, preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(inputs: jax.Array, kernel: jax.Array, num_contract: int) -> jax.Array:
  """inputs [..., in...] x kernel [in..., out...] -> [..., out...]."""
  in_size = math.prod(kernel.shape[:num_contract])
  lead_shape = inputs.shape[:inputs.ndim - num_contract]
  out_shape = kernel.shape[num_contract:]
  flat = _dot(inputs.reshape(-1, in_size), kernel.reshape(in_size, -1), inputs.dtype)
  return flat.reshape(*lead_shape, *out_shape)


def _matmul_fwd(inputs, kernel, num_contract):
  return _matmul(inputs, kernel, num_contract), (inputs, kernel)


def _matmul_bwd(num_contract, residuals, out_grad):
  inputs, kernel = residuals
  in_size = math.prod(kernel.shape[:num_contract])
  out_size = math.prod(kernel.shape[num_contract:])
  inputs_2d = inputs.reshape(-1, in_size)  # [tokens, in]
  out_grad_2d = out_grad.reshape(-1, out_size)  # [tokens, out]
  kernel_t = jax.lax.optimization_barrier(kernel.reshape(in_size, out_size).T)  # [out, in]
  inputs_grad = _dot(out_grad_2d, kernel_t, inputs.dtype).reshape(inputs.shape)
  if in_size <= out_size:
    inputs_t = jax.lax.optimization_barrier(inputs_2d.T)  # [in, tokens]
    kernel_grad = _dot(inputs_t, out_grad_2d, kernel.dtype)
  else:
    out_grad_t = jax.lax.optimization_barrier(out_grad_2d.T)  # [out, tokens]
    kernel_grad = _dot(out_grad_t, inputs_2d, kernel.dtype).T
  return inputs_grad, kernel_grad.reshape(kernel.shape)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> jax.Array:
  """Drop-in `lax.dot_general` for Dense layers (flax's `dot_general` argument).

  On CPU, a contraction of lhs's trailing axes with rhs's leading axes goes through the
  layout-friendly custom VJP above; anything else, and every other backend, goes to
  `lax.dot_general` unchanged.
  """
  num_contract = _plain_contraction(lhs.ndim, dimension_numbers)
  if (jax.default_backend() != 'cpu' or not num_contract or precision is not None
      or preferred_element_type is not None or lhs.dtype != rhs.dtype):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return _matmul(lhs, rhs, num_contract)
