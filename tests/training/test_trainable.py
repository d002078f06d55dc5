"""Trainable-parameter control: frozen parameters stay bitwise fixed and get no optimizer state;
QLoRA steps run and learn; the masked state checkpoints and restores."""

import jax
import numpy as np
import optax
import pytest

from configs import sft
from openvlm_jax import checkpoint, config_lib, objectives, parallel
from openvlm_jax.models.vlm import VLM, dummy_inputs
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib

VOCAB, SEQ, IMAGE_TOKEN = 40, 16, 3


def lora_setup(base_dtype='float32', recipe='lora'):
  """A tiny LoRA VLM (adapters on the LLM's and vision tower's Dense layers) and its step."""
  config = sft.get_config(f'model=tiny,lora=1,recipe={recipe}')
  config.lora.rank, config.lora.base_dtype = 4, base_dtype
  config.optimizer.lr, config.optimizer.warmup_steps = 1e-2, 0
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=VOCAB,
                                           image_token_id=IMAGE_TOKEN, lora=config.lora)
  model = VLM(vlm_config)
  trainable = optimizer_lib.trainable_fn(config.trainable, lora_on=True)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, 100, trainable)
  example = dummy_inputs(vlm_config, 1, SEQ)
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  shardings = state_lib.state_shardings(model, optimizer, example, mesh, config.logical_axis_rules)
  state = state_lib.create_train_state(model, optimizer, example, shardings, jax.random.key(0))
  train_step = jax.jit(step_lib.make_train_step(model, objectives.get('sft'), optimizer,
                                                schedule, trainable=trainable))
  return vlm_config, state, train_step, trainable, shardings


def fixed_batch(vlm_config, batch_size=4, seed=0):
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(4, VOCAB, size=(batch_size, SEQ)).astype(np.int32)
  input_ids[:, 1:1 + vlm_config.vision.num_image_tokens] = IMAGE_TOKEN
  loss_mask = np.zeros((batch_size, SEQ), np.float32)
  loss_mask[:, 8:-1] = 1.0
  size = vlm_config.vision.image_size
  return {'input_ids': input_ids, 'targets': np.roll(input_ids, -1, axis=1), 'loss_mask': loss_mask,
          'attention_mask': np.ones((batch_size, SEQ), np.int32),
          'positions': np.tile(np.arange(SEQ, dtype=np.int32), (batch_size, 1)),
          'images': rng.normal(size=(batch_size, 1, size, size, 3)).astype(np.float32)}


def flat(tree):
  return {optimizer_lib.path_string(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_only_trainable_params_change_and_have_optimizer_state(tmp_path):
  vlm_config, state, train_step, trainable, shardings = lora_setup()
  before = jax.device_get(flat(state.params))
  mask = flat(trainable(state.params))
  trained = {name for name, trains in mask.items() if trains}
  assert trained and all(name.endswith(('lora_a', 'lora_b')) or name.startswith('projector/')
                         for name in trained)
  assert 'llm/layers/attention/q_proj/lora_b' in trained
  assert 'llm/layers/attention/q_proj/kernel' not in trained
  # Optimizer moments exist for exactly the trainable parameters.
  adam_state = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState))
  assert set(flat(adam_state.mu)) == trained
  assert set(flat(adam_state.nu)) == trained

  batch = fixed_batch(vlm_config)
  for _ in range(3):
    state, _metrics = train_step(state, batch)
  after = jax.device_get(flat(state.params))
  for name, value in after.items():
    if name in trained:
      assert not np.array_equal(value, before[name]), name
    else:
      np.testing.assert_array_equal(value, before[name], err_msg=name)

  # The masked optimizer state saves and restores.
  manager = checkpoint.make_manager(str(tmp_path), keep=1)
  manager.save(3, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  abstract = checkpoint.abstract_like(state, shardings)
  restored = checkpoint.restore(manager, 3, abstract)
  manager.close()
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, want)
  assert jax.tree.structure(restored) == jax.tree.structure(state)


@pytest.mark.parametrize('base_dtype', ['nf4'])
def test_qlora_step_runs_and_loss_decreases(base_dtype):
  vlm_config, state, train_step, _trainable, _ = lora_setup(base_dtype)
  names = flat(state.params)
  assert names['llm/layers/mlp/up_proj/kernel_nf4'].dtype == np.uint8
  batch = fixed_batch(vlm_config)
  losses = []
  for _ in range(15):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0], losses
  np.testing.assert_array_equal(flat(state.params)['llm/layers/mlp/up_proj/kernel_nf4'],
                                names['llm/layers/mlp/up_proj/kernel_nf4'])
