"""attention_impl='pallas' (flash kernels, interpret mode on CPU) against 'xla'."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import sft
from openvlm_jax import config_lib
from openvlm_jax.models import attention
from openvlm_jax.models.vlm import VLM
from openvlm_jax.objectives import sft as sft_objective

VOCAB, SEQ, IMAGE_TOKEN = 40, 16, 3
TOLERANCE = 1e-5


def _relative_error(ours, expected):
  ours, expected = np.asarray(ours), np.asarray(expected)
  return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


def assert_grads_close(xla_grads, pallas_grads, tolerance: float) -> None:
  """Every gradient leaf agrees to `tolerance`, relative to the leaf's largest magnitude."""
  flat_xla = jax.tree_util.tree_leaves_with_path(xla_grads)
  flat_pallas = jax.tree.leaves(pallas_grads)
  assert len(flat_xla) == len(flat_pallas)
  worst = 0.0
  for (path, want), got in zip(flat_xla, flat_pallas):
    scale = max(float(jnp.max(jnp.abs(want))), 1e-6)
    error = float(jnp.max(jnp.abs(got - want))) / scale
    worst = max(worst, error)
    assert error <= tolerance, (jax.tree_util.keystr(path), error)
  print(f'{len(flat_xla)} gradient leaves, worst relative error {worst:.1e}')


def test_dot_product_attention_pallas_matches_xla_with_left_padding():
  rng = np.random.default_rng(0)
  query = jnp.asarray(rng.normal(size=(2, 12, 4, 16)), jnp.float32)
  key = jnp.asarray(rng.normal(size=(2, 12, 2, 16)), jnp.float32)
  value = jnp.asarray(rng.normal(size=(2, 12, 2, 16)), jnp.float32)
  attention_mask = np.ones((2, 12), np.int32)
  attention_mask[1, :5] = 0  # left padding: queries 0..4 of example 1 see no real key
  xla = attention.dot_product_attention(
      query, key, value, mask=attention.decoder_mask(attention_mask, 'xla'), impl='xla')
  pallas = attention.dot_product_attention(
      query, key, value, mask=attention.decoder_mask(attention_mask, 'pallas'), impl='pallas')
  real = attention_mask.astype(bool)
  assert _relative_error(np.asarray(pallas)[real], np.asarray(xla)[real]) <= TOLERANCE


def _tiny_model(attention_impl):
  config = sft.get_config('model=tiny')
  config.model.attention_impl = attention_impl
  return VLM(config_lib.build_vlm_config(config.model, vocab_size=VOCAB,
                                         image_token_id=IMAGE_TOKEN))


def _loss_and_grads(model, params, batch):
  loss_fn = sft_objective.loss_terms

  def loss(params):
    logits = model.apply(params, batch['input_ids'], batch['images'],
                         positions=batch['positions'], attention_mask=batch['attention_mask'])
    terms = loss_fn(logits, batch)
    return terms['nll_sum'] / terms['num_tokens']

  return jax.jit(jax.value_and_grad(loss))(params)


def test_tiny_vlm_same_loss_and_grads_as_xla():
  rng = np.random.default_rng(0)
  xla_model, pallas_model = _tiny_model('xla'), _tiny_model('pallas')
  config = xla_model.config
  num_image_tokens, size = config.vision.num_image_tokens, config.vision.image_size
  batch_size = 2
  input_ids = rng.integers(4, VOCAB, size=(batch_size, SEQ)).astype(np.int32)
  input_ids[:, 3:3 + num_image_tokens] = IMAGE_TOKEN
  attention_mask = np.ones((batch_size, SEQ), np.int32)
  attention_mask[1, :2] = 0  # left padding
  loss_mask = np.zeros((batch_size, SEQ), np.float32)
  loss_mask[:, 3 + num_image_tokens:-1] = 1.0
  positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
  batch = {'input_ids': input_ids, 'targets': np.roll(input_ids, -1, axis=1),
           'loss_mask': loss_mask, 'attention_mask': attention_mask, 'positions': positions,
           'images': rng.normal(size=(batch_size, 1, size, size, 3)).astype(np.float32)}
  params = jax.jit(xla_model.init)(
      jax.random.key(0), batch['input_ids'], batch['images'], positions=batch['positions'],
      attention_mask=batch['attention_mask'])
  xla_loss, xla_grads = _loss_and_grads(xla_model, params, batch)
  pallas_loss, pallas_grads = _loss_and_grads(pallas_model, params, batch)
  print(f'loss xla {float(xla_loss):.6f} pallas {float(pallas_loss):.6f}')
  assert abs(float(pallas_loss) - float(xla_loss)) <= TOLERANCE * abs(float(xla_loss))
  assert_grads_close(xla_grads, pallas_grads, TOLERANCE)
