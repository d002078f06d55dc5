"""DPO: the loss and metrics against numpy, the reference is the adapters-off starting model,
and a LoRA train step on fixed pairs raises the margin through the policy only."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import sft
from openvlm_jax import config_lib, objectives, parallel
from openvlm_jax.console import UserError
from openvlm_jax.models import vlm
from openvlm_jax.models.config import LoraConfig
from openvlm_jax.objectives import dpo
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib

VOCAB, SEQ, IMAGE_TOKEN = 40, 16, 3


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize('beta,label_smoothing', [(0.1, 0.0), (0.5, 0.2)])
def test_pair_terms_match_the_formula_in_numpy(beta, label_smoothing):
  rng = np.random.default_rng(0)
  policy = rng.normal(size=(6, 2)) * 3 - 10
  reference = policy + rng.normal(size=(6, 2))
  example_mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last pair is eval padding
  sums = dpo.pair_terms(jnp.asarray(policy, jnp.float32), jnp.asarray(reference, jnp.float32),
                        jnp.asarray(example_mask), beta=beta, label_smoothing=label_smoothing)
  real = example_mask > 0
  margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
  losses = (-(1 - label_smoothing) * _log_sigmoid(margin)
            - label_smoothing * _log_sigmoid(-margin))
  metrics = dpo.metrics(sums)
  np.testing.assert_allclose(sums['dpo_sum'], losses[real].sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics['dpo_loss'], losses[real].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['reward_margin'], margin[real].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['reward_accuracy'], (margin[real] > 0).mean())
  np.testing.assert_allclose(metrics['preference_accuracy'],
                             (policy[real, 0] > policy[real, 1]).mean())
  np.testing.assert_allclose(metrics['chosen_reward'],
                             beta * (policy[real, 0] - reference[real, 0]).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['rejected_logp'], policy[real, 1].mean(), rtol=1e-5)
  assert float(sums['num_pairs']) == 5


def test_answer_logps_sum_the_answer_tokens_log_probabilities():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  loss_mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = (np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * loss_mask).sum(-1)
  got = dpo.answer_logps(jnp.asarray(logits), {'targets': jnp.asarray(targets),
                                               'loss_mask': jnp.asarray(loss_mask)})
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_options_are_checked():
  with pytest.raises(UserError, match='beta=0.0: must be > 0'):
    objectives.get(ml_collections.ConfigDict({'name': 'dpo', 'beta': 0.0}))
  with pytest.raises(UserError, match=r'label_smoothing=0.5: must be in \[0, 0.5\)'):
    objectives.get(ml_collections.ConfigDict({'name': 'dpo', 'label_smoothing': 0.5}))
  with pytest.raises(UserError, match='sft_weight=-1.0: must be >= 0'):
    objectives.get(ml_collections.ConfigDict({'name': 'dpo', 'sft_weight': -1.0}))


def _lora_setup(base_dtype='float32', lr=1e-2):
  config = sft.get_config('model=tiny')
  vlm_config = dataclasses.replace(
      config_lib.build_vlm_config(config.model, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN),
      lora=LoraConfig(rank=4, alpha=8.0, targets=(r'llm/.*',), base_dtype=base_dtype))
  model = vlm.VLM(vlm_config)
  config.optimizer.lr, config.optimizer.warmup_steps = lr, 0
  trainable = optimizer_lib.trainable_fn((), lora_on=True)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, 100, trainable)
  example = {name: value[:1] for name, value in _rows(vlm_config, 1).items()
             if name in step_lib.MODEL_INPUTS}
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  shardings = state_lib.state_shardings(model, optimizer, example, mesh, config.logical_axis_rules)
  state = state_lib.create_train_state(model, optimizer, example, shardings, jax.random.key(0))
  return model, optimizer, schedule, trainable, state


def _rows(vlm_config, num_rows, seed=0):
  """Random rows with one image and the answer in the second half (as a pair's rows)."""
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(4, VOCAB, size=(num_rows, SEQ)).astype(np.int32)
  input_ids[:, 1:1 + vlm_config.vision.num_image_tokens] = IMAGE_TOKEN
  loss_mask = np.zeros((num_rows, SEQ), np.float32)
  loss_mask[:, SEQ // 2:-1] = 1.0
  size = vlm_config.vision.image_size
  return dict(input_ids=input_ids, targets=np.roll(input_ids, -1, axis=1), loss_mask=loss_mask,
              attention_mask=np.ones((num_rows, SEQ), np.int32),
              positions=np.tile(np.arange(SEQ, dtype=np.int32), (num_rows, 1)),
              prefix_len=np.full((num_rows,), SEQ // 2, np.int32),
              images=rng.normal(size=(num_rows, 1, size, size, 3)).astype(np.float32),
              num_images=np.ones((num_rows,), np.int32))


def _pairs(vlm_config, num_pairs):
  """[pairs, 2, ...]: chosen and rejected share the prompt and image, differ in the answer."""
  rows = _rows(vlm_config, 2 * num_pairs)
  pairs = {name: value.reshape((num_pairs, 2) + value.shape[1:]) for name, value in rows.items()}
  for name in ('images', 'input_ids'):
    half = slice(None, SEQ // 2) if name == 'input_ids' else slice(None)
    pairs[name][:, 1, half] = pairs[name][:, 0, half]
  pairs['targets'] = np.roll(pairs['input_ids'], -1, axis=-1)
  return pairs


def test_the_reference_is_the_starting_model_with_the_adapters_off():
  # QLoRA (NF4 base); the LoRA train step below checks a float32 base.
  model, _, _, _, state = _lora_setup('nf4')
  rows = _rows(model.config, 3)
  start = state.params
  moved = jax.tree_util.tree_map_with_path(  # every adapter moves, the base stays
      lambda path, leaf: leaf + 0.05 if str(path[-1]).count('lora_') else leaf, start)
  policy = jax.jit(lambda params, rows: step_lib.logits_fn_of(model, params)(rows))
  reference = jax.jit(lambda params, rows: step_lib.logits_fn_of(model, params)(
      rows, reference=True))
  np.testing.assert_allclose(reference(moved, rows), policy(start, rows), atol=1e-5)
  assert np.abs(np.asarray(policy(moved, rows)) - policy(start, rows)).max() > 1e-3


def test_a_train_step_on_pairs_raises_the_margin_through_the_policy_only():
  model, optimizer, schedule, trainable, state = _lora_setup(lr=3e-2)
  objective = objectives.get(ml_collections.ConfigDict({'name': 'dpo', 'beta': 0.5}))
  train_step = jax.jit(step_lib.make_train_step(model, objective, optimizer, schedule,
                                                trainable=trainable))
  batch = _pairs(model.config, 4)
  start_params = state.params
  history = []
  for _ in range(8):
    state, metrics = train_step(state, batch)
    history.append({name: float(value) for name, value in metrics.items()})
  # Step 1: the policy is the reference (B = 0), so every margin is 0 (to rounding: the two
  # forward passes compile apart) and the loss is log 2.
  np.testing.assert_allclose(history[0]['loss'], np.log(2.0), rtol=1e-5)
  assert abs(history[0]['reward_margin']) < 1e-5
  assert history[-1]['reward_margin'] > 0.5 and history[-1]['reward_accuracy'] == 1.0
  assert history[-1]['loss'] < 0.5 * np.log(2.0)
  # Only the adapters moved, so the reference is still the starting model.
  base = lambda params: [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                         if 'lora_' not in jax.tree_util.keystr(path)]
  for before, after in zip(base(start_params), base(state.params)):
    np.testing.assert_array_equal(before, after)


def test_the_reference_is_a_frozen_copy_unless_only_adapters_train(tmp_path):
  from configs import dpo as dpo_config  # pylint: disable=g-import-not-at-top
  from openvlm_jax.training import setup  # pylint: disable=g-import-not-at-top
  config = dpo_config.get_config()
  with config.unlocked():
    config.model = config_lib.model_section('tiny')
    config.model.prefix_attention = True
    config.lora.rank = 0
  run = setup.make_run(config, str(tmp_path))
  objective = objectives.get(config.objective, run.tokenizer)
  layout = setup.state_layout(run)
  reference = setup.reference_params(run, objective, layout)  # no LoRA: a copy
  state = state_lib.create_train_state(run.model, layout.optimizer, layout.example_inputs,
                                       layout.shardings, jax.random.key(config.seed))
  for copy, start in zip(jax.tree.leaves(reference), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(copy, start)  # the train state's own starting params
  with config.unlocked():
    config.lora.rank = 4
  run = setup.make_run(config, str(tmp_path))
  assert setup.reference_params(run, objective, setup.state_layout(run)) is None  # adapters off
  with config.unlocked():
    config.trainable = config_lib.RECIPES['lora']  # adapters and the projector
  run = setup.make_run(config, str(tmp_path))
  assert setup.reference_params(run, objective, setup.state_layout(run)) is not None


def test_a_full_fine_tuning_dpo_step_reads_the_frozen_copy():
  config = sft.get_config('model=tiny')
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=VOCAB,
                                           image_token_id=IMAGE_TOKEN)
  model = vlm.VLM(vlm_config)
  config.optimizer.lr, config.optimizer.warmup_steps = 3e-3, 0
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, 100)
  example = {name: value[:1] for name, value in _rows(vlm_config, 1).items()
             if name in step_lib.MODEL_INPUTS}
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  shardings = state_lib.state_shardings(model, optimizer, example, mesh, config.logical_axis_rules)
  state = state_lib.create_train_state(model, optimizer, example, shardings, jax.random.key(0))
  reference = jax.tree.map(jnp.copy, state.params)
  objective = objectives.get(ml_collections.ConfigDict({'name': 'dpo', 'beta': 0.5}))
  train_step = jax.jit(step_lib.make_train_step(model, objective, optimizer, schedule))
  batch = _pairs(model.config, 4)
  history = []
  for _ in range(6):
    state, metrics = train_step(state, batch, reference)
    history.append({name: float(value) for name, value in metrics.items()})
  np.testing.assert_allclose(history[0]['loss'], np.log(2.0), rtol=1e-5)  # policy = copy
  assert history[-1]['reward_margin'] > 0.5 and history[-1]['loss'] < 0.5 * np.log(2.0)
  # Every parameter trained, so only the copy still holds the start: the margin is measured
  # against it (with no copy, the adapter-less params would be the policy itself: margin 0).
  sums = jax.jit(step_lib.make_eval_step(model, objective))(state.params, batch, reference)
  assert float(objective.metrics(sums)['reward_margin']) > 0.5
  sums = jax.jit(step_lib.make_eval_step(model, objective))(state.params, batch)
  np.testing.assert_allclose(objective.metrics(sums)['reward_margin'], 0.0, atol=1e-5)


def test_sft_weight_adds_the_chosen_answers_cross_entropy_per_chosen_token():
  rng = np.random.default_rng(2)
  pairs, seq, vocab = 3, 6, 9
  targets = rng.integers(0, vocab, size=(pairs, 2, seq)).astype(np.int32)
  loss_mask = (rng.random((pairs, 2, seq)) < 0.6).astype(np.float32)
  batch = {'input_ids': jnp.asarray(targets), 'targets': jnp.asarray(targets),
           'loss_mask': jnp.asarray(loss_mask)}
  policy_logits = jnp.asarray(rng.normal(size=(2 * pairs, seq, vocab)).astype(np.float32))
  reference_logits = jnp.asarray(rng.normal(size=(2 * pairs, seq, vocab)).astype(np.float32))
  logits_fn = lambda rows, reference=False: reference_logits if reference else policy_logits
  plain = objectives.get(ml_collections.ConfigDict({'name': 'dpo'}))
  rpo = objectives.get(ml_collections.ConfigDict({'name': 'dpo', 'sft_weight': 0.5}))
  sums = rpo.terms(batch, logits_fn)
  log_probs = np.asarray(jax.nn.log_softmax(policy_logits)).reshape(pairs, 2, seq, vocab)
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  chosen_ce = (nll[:, 0] * loss_mask[:, 0]).sum() / loss_mask[:, 0].sum()
  np.testing.assert_allclose(rpo.metrics(sums)['chosen_ce'], chosen_ce, rtol=1e-5)
  np.testing.assert_allclose(rpo.loss_of(sums) - plain.loss_of(sums), 0.5 * chosen_ce,
                             rtol=1e-5)
