"""The train step: the loss falls on a fixed batch; accumulation matches one big batch."""

import dataclasses

import jax
import numpy as np

from configs import sft
from openvlm_jax import config_lib, objectives, parallel
from openvlm_jax.models.vlm import VLM
from openvlm_jax.objectives import quantitative
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib

VOCAB, SEQ, IMAGE_TOKEN = 40, 16, 3


def tiny_setup(grad_accum_steps=1, lr=1e-2, objective=None):
  config = sft.get_config('model=tiny')
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=VOCAB,
                                           image_token_id=IMAGE_TOKEN)
  model = VLM(vlm_config)
  config.optimizer.lr = lr
  config.optimizer.warmup_steps = 0
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, num_steps=100)
  size = vlm_config.vision.image_size
  example = dict(input_ids=np.zeros((1, SEQ), np.int32),
                 images=np.zeros((1, 1, size, size, 3), np.float32),
                 positions=np.zeros((1, SEQ), np.int32),
                 attention_mask=np.ones((1, SEQ), np.int32))
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  shardings = state_lib.state_shardings(model, optimizer, example, mesh, config.logical_axis_rules)
  state = state_lib.create_train_state(model, optimizer, example, shardings, jax.random.key(0))
  train_step = step_lib.make_train_step(model, objective or objectives.get('sft'), optimizer,
                                        schedule, grad_accum_steps)
  return vlm_config, state, jax.jit(train_step)


def fixed_batch(vlm_config, batch_size=4, seed=0):
  rng = np.random.default_rng(seed)
  num_image_tokens = vlm_config.vision.num_image_tokens
  input_ids = rng.integers(4, VOCAB, size=(batch_size, SEQ)).astype(np.int32)
  input_ids[:, 1:1 + num_image_tokens] = IMAGE_TOKEN
  targets = np.roll(input_ids, -1, axis=1)
  loss_mask = np.zeros((batch_size, SEQ), np.float32)
  loss_mask[:, 8:-1] = 1.0
  size = vlm_config.vision.image_size
  return dict(input_ids=input_ids, targets=targets, loss_mask=loss_mask,
              attention_mask=np.ones((batch_size, SEQ), np.int32),
              positions=np.tile(np.arange(SEQ, dtype=np.int32), (batch_size, 1)),
              images=rng.normal(size=(batch_size, 1, size, size, 3)).astype(np.float32))


def test_loss_decreases_on_a_fixed_batch():
  vlm_config, state, train_step = tiny_setup()
  batch = fixed_batch(vlm_config)
  losses = []
  for _ in range(30):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 30


def test_gradient_accumulation_matches_one_batch():
  vlm_config, state_one, step_one = tiny_setup(grad_accum_steps=1)
  _, state_acc, step_acc = tiny_setup(grad_accum_steps=2)
  batch = fixed_batch(vlm_config, batch_size=4)
  batch['loss_mask'][0, :] = 0.0  # unequal token counts per micro-batch
  batch['loss_mask'][0, 10] = 1.0
  state_one, metrics_one = step_one(state_one, batch)
  state_acc, metrics_acc = step_acc(state_acc, batch)
  np.testing.assert_allclose(metrics_one['loss'], metrics_acc['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics_one['grad_norm'], metrics_acc['grad_norm'], rtol=1e-4)
  for one, acc in zip(jax.tree.leaves(state_one.params), jax.tree.leaves(state_acc.params)):
    np.testing.assert_allclose(one, acc, atol=1e-5)


def test_accumulation_is_exact_for_a_loss_with_two_counts():
  """CE per target token + lambda * NTL per number token: micro-batches hold unequal shares."""
  digits = quantitative.NumberTokens(ids=np.arange(4, 14, dtype=np.int32),
                                     values=np.arange(10, dtype=np.float32))
  objective = dataclasses.replace(
      objectives.get('sft'), name='two_counts',
      terms=lambda batch, logits_fn: quantitative.loss_terms(
          logits_fn(batch), batch, number_tokens=digits),
      counts=lambda batch: quantitative.counts(batch, digits),
      loss=(('nll_sum', 1.0, 'num_tokens'), ('ntl_sum', 0.5, 'number_tokens')),
      metrics=quantitative.metrics)
  vlm_config, state_one, step_one = tiny_setup(grad_accum_steps=1, objective=objective)
  _, state_acc, step_acc = tiny_setup(grad_accum_steps=2, objective=objective)
  batch = fixed_batch(vlm_config, batch_size=4)
  batch['targets'][0::2, 8:] = 20  # no number token in micro-batch 0's rows
  state_one, metrics_one = step_one(state_one, batch)
  state_acc, metrics_acc = step_acc(state_acc, batch)
  ce, ntl = float(metrics_one['ce']), float(metrics_one['ntl'])
  np.testing.assert_allclose(metrics_one['loss'], ce + 0.5 * ntl, rtol=1e-5)
  np.testing.assert_allclose(metrics_one['loss'], metrics_acc['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics_one['grad_norm'], metrics_acc['grad_norm'], rtol=1e-4)
  for one, acc in zip(jax.tree.leaves(state_one.params), jax.tree.leaves(state_acc.params)):
    np.testing.assert_allclose(one, acc, atol=1e-5)


def test_weight_decay_skips_norms_and_biases():
  params = dict(dense=dict(kernel=np.ones((2, 2)), bias=np.ones(2)), norm=dict(scale=np.ones(2)),
                embed=dict(embedding=np.ones((3, 2))))
  mask = optimizer_lib.decay_mask(params)
  assert mask == dict(dense=dict(kernel=True, bias=False), norm=dict(scale=False),
                      embed=dict(embedding=True))


def test_schedule_warms_up_then_decays():
  config = sft.get_config().optimizer
  schedule = optimizer_lib.learning_rate_schedule(config, num_steps=1000)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(config.warmup_steps)), config.lr, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(1000)), config.lr * config.min_lr_ratio, rtol=1e-6)
