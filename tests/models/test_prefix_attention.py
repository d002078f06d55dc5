"""Prefix-LM attention (`model.prefix_attention`): the kernels' mask, both implementations, and
what a bidirectional prefix lets each position see."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft
from openvlm_jax import config_lib
from openvlm_jax.models import attention
from openvlm_jax.models.vlm import VLM
from openvlm_jax.objectives import sft as sft_objective
from openvlm_jax.training import step as step_lib
from pallas_kernels import reference
from tests.models.test_attention_impl import assert_grads_close

VOCAB, SEQ, IMAGE_TOKEN = 40, 16, 3
IMAGE_START = 1  # the image tokens follow the bos token
TOLERANCE = 1e-5


def _tiny_model(attention_impl: str, prefix_attention: bool = True) -> VLM:
  config = sft.get_config('model=tiny')
  config.model.attention_impl = attention_impl
  config.model.prefix_attention = prefix_attention
  return VLM(config_lib.build_vlm_config(config.model, vocab_size=VOCAB,
                                         image_token_id=IMAGE_TOKEN))


def _batch(config, lengths, prefix_lens, seed=0):
  """Right-padded rows of `lengths` real tokens, one image each after the bos token."""
  rng = np.random.default_rng(seed)
  batch_size = len(lengths)
  num_image_tokens, size = config.vision.num_image_tokens, config.vision.image_size
  input_ids = rng.integers(4, VOCAB, size=(batch_size, SEQ)).astype(np.int32)
  input_ids[:, IMAGE_START:IMAGE_START + num_image_tokens] = IMAGE_TOKEN
  attention_mask = (np.arange(SEQ)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  input_ids[attention_mask == 0] = 0
  prefix_len = np.asarray(prefix_lens, np.int32)  # [batch]
  # The answer: from the first token after the prefix to the end of the real tokens.
  is_answer = (np.arange(SEQ)[None, :] >= prefix_len[:, None]) & (attention_mask == 1)
  loss_mask = np.zeros((batch_size, SEQ), np.float32)
  loss_mask[:, :-1] = is_answer[:, 1:]
  positions = (np.arange(SEQ)[None, :] * attention_mask).astype(np.int32)
  return {'input_ids': input_ids, 'targets': np.roll(input_ids, -1, axis=1),
          'loss_mask': loss_mask, 'attention_mask': attention_mask, 'positions': positions,
          'prefix_len': prefix_len,
          'images': rng.normal(size=(batch_size, 1, size, size, 3)).astype(np.float32)}


def _init(model, batch):
  return jax.jit(model.init)(jax.random.key(0), batch['input_ids'], batch['images'],
                             positions=batch['positions'],
                             attention_mask=batch['attention_mask'])


@pytest.mark.parametrize('impl', ['xla', 'pallas'])
def test_dot_product_attention_with_prefix_matches_the_dense_reference(impl):
  rng = np.random.default_rng(0)
  batch, seq, heads, kv_heads, head_dim = 3, 12, 4, 2, 16  # grouped-query attention
  query = jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), jnp.float32)
  key = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, head_dim)), jnp.float32)
  value = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, head_dim)), jnp.float32)
  lengths = np.array([12, 9, 6])  # right padding
  attention_mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
  prefix_len = jnp.array([5, 9, 0], jnp.int32)  # mid-sequence, all real tokens, none
  mask = attention.decoder_mask(attention_mask, impl,
                                attention.prefix_end_from_len(prefix_len, seq))
  ours = attention.dot_product_attention(query, key, value, mask=mask, impl=impl)
  expected = reference.attention(
      query, key, value, causal=True, segment_ids=jnp.ones((batch, seq), jnp.int32),
      kv_segment_ids=jnp.asarray(attention_mask), prefix_len=prefix_len)
  real = attention_mask.astype(bool)  # padding queries' outputs are never read
  error = float(jnp.max(jnp.abs(ours[real] - expected[real])))
  print(f'{impl}: max abs error {error:.1e}')
  assert error <= TOLERANCE
  causal_only = reference.attention(
      query, key, value, causal=True, segment_ids=jnp.ones((batch, seq), jnp.int32),
      kv_segment_ids=jnp.asarray(attention_mask))
  assert float(jnp.max(jnp.abs(ours[real] - causal_only[real]))) > 1e-2  # the prefix did


def _mean_loss(model, params, batch):
  """The SFT loss of `batch` through the training step's model call."""
  terms = sft_objective.loss_terms(step_lib.model_logits(model, params['params'], batch), batch)
  return terms['nll_sum'] / terms['num_tokens']


def _loss_and_grads(model, params, batch):
  return jax.jit(jax.value_and_grad(lambda params: _mean_loss(model, params, batch)))(params)


def test_tiny_vlm_with_prefix_same_loss_and_grads_under_xla_and_pallas():
  xla_model, pallas_model = _tiny_model('xla'), _tiny_model('pallas')
  config = xla_model.config
  prefix_start = IMAGE_START + config.vision.num_image_tokens
  batch = _batch(config, lengths=[SEQ, 12], prefix_lens=[prefix_start + 3, prefix_start + 1])
  params = _init(xla_model, batch)
  xla_loss, xla_grads = _loss_and_grads(xla_model, params, batch)
  pallas_loss, pallas_grads = _loss_and_grads(pallas_model, params, batch)
  causal_model = _tiny_model('xla', prefix_attention=False)
  causal_loss = jax.jit(lambda params: _mean_loss(causal_model, params, batch))(params)
  print(f'loss xla {float(xla_loss):.6f} pallas {float(pallas_loss):.6f} '
        f'causal {float(causal_loss):.6f}')
  assert abs(float(pallas_loss) - float(xla_loss)) <= TOLERANCE * abs(float(xla_loss))
  assert abs(float(causal_loss) - float(xla_loss)) > 1e-4  # the step passed prefix_len on
  assert_grads_close(xla_grads, pallas_grads, TOLERANCE)


def _changed_positions(model, params, batch, changed_batch):
  """Per position of row 0: the largest change of the logits between the two batches."""
  run = jax.jit(lambda batch: step_lib.model_logits(model, params['params'], batch))
  change = jnp.abs(run(changed_batch) - run(batch))[0]  # [seq, vocab]
  return np.asarray(jnp.max(change, axis=-1))  # [seq]


@pytest.mark.parametrize('prefix_attention', [True, False])
def test_only_prefix_tokens_see_later_tokens(prefix_attention):
  model = _tiny_model('xla', prefix_attention)
  config = model.config
  prefix_len = IMAGE_START + config.vision.num_image_tokens + 3
  batch = _batch(config, lengths=[14], prefix_lens=[prefix_len])
  params = _init(model, batch)
  later_prefix, answer = prefix_len - 1, prefix_len + 2

  def with_token(position):
    ids = batch['input_ids'].copy()
    ids[0, position] = 4 + (ids[0, position] - 3) % (VOCAB - 4)  # another text token
    return dict(batch, input_ids=ids)

  change = _changed_positions(model, params, batch, with_token(later_prefix))
  if prefix_attention:
    assert (change[:later_prefix] > 1e-4).all()  # every earlier prefix position sees it
  else:
    assert (change[:later_prefix] == 0).all()
  assert (change[later_prefix:14] > 1e-4).all()

  change = _changed_positions(model, params, batch, with_token(answer))
  assert (change[:answer] == 0).all()  # answer tokens stay causal either way
  assert (change[answer:14] > 1e-4).all()

  # The image sits after the bos token: only a prefix LM lets the bos position see it.
  images = batch['images'] + 1.0
  change = _changed_positions(model, params, batch, dict(batch, images=images))
  assert (change[0] > 1e-4) == prefix_attention
