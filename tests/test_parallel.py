"""Sharded training on 8 simulated devices equals one device; checkpoints move between meshes."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from configs import sft
from openvlm_jax import checkpoint, config_lib, objectives, parallel
from openvlm_jax.models.vlm import VLM
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib
from openvlm_jax.training.state import TrainState

VOCAB, SEQ, IMAGE_TOKEN, BATCH, NUM_STEPS = 48, 16, 3, 8, 2
# Cheaper XLA CPU compiles (about a third less time); every mesh, and the reference, uses them.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
MESHES = {
    'data=8': dict(data=8, fsdp=1, tensor=1),
    'fsdp=8': dict(data=1, fsdp=8, tensor=1),
    'data=2,fsdp=2,tensor=2': dict(data=2, fsdp=2, tensor=2),
}
# What the config's rules must give a few parameters, written out by hand per mesh.
EXPECTED_SPECS = {
    "['llm']['embed_tokens']['embedding']": P('tensor', 'fsdp'),  # (vocab, embed)
    "['llm']['lm_head']['kernel']": P('fsdp', 'tensor'),  # (embed, vocab)
    "['llm']['layers']['mlp']['gate_proj']['kernel']": P(None, 'fsdp', 'tensor'),
    "['llm']['layers']['mlp']['down_proj']['kernel']": P(None, 'tensor', 'fsdp'),
    "['llm']['layers']['attention']['q_proj']['kernel']": P(None, 'fsdp', 'tensor', None),
    "['llm']['layers']['attention']['o_proj']['kernel']": P(None, 'tensor', None, 'fsdp'),
    "['llm']['layers']['input_norm']['scale']": P(None, None),
    "['vision']['layers']['fc1']['bias']": P(None, 'tensor'),
    "['vision']['patch_embedding']['kernel']": P(None, None, None, 'fsdp'),
}


def fixed_batch(vlm_config):
  rng = np.random.default_rng(0)
  input_ids = rng.integers(4, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  input_ids[:, 1:1 + vlm_config.vision.num_image_tokens] = IMAGE_TOKEN
  loss_mask = np.zeros((BATCH, SEQ), np.float32)
  loss_mask[:, 6:-1] = 1.0
  loss_mask[0, 6:12] = 0.0  # unequal token counts per row
  size = vlm_config.vision.image_size
  return dict(input_ids=input_ids, targets=np.roll(input_ids, -1, axis=1), loss_mask=loss_mask,
              attention_mask=np.ones((BATCH, SEQ), np.int32),
              positions=np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
              images=rng.normal(size=(BATCH, 1, size, size, 3)).astype(np.float32))


class Trainer:
  """One tiny model and batch; trains it on any mesh, one compile per mesh, results cached."""

  def __init__(self):
    self.config = sft.get_config('model=tiny')
    self.config.optimizer.lr = 1e-2
    self.config.optimizer.warmup_steps = 0
    self.vlm_config = config_lib.build_vlm_config(self.config.model, vocab_size=VOCAB,
                                                  image_token_id=IMAGE_TOKEN)
    self.model = VLM(self.vlm_config)
    self.optimizer, self.schedule = optimizer_lib.make_optimizer(self.config.optimizer, 100)
    self.batch = fixed_batch(self.vlm_config)
    self.example = {name: self.batch[name][:1] for name in step_lib.MODEL_INPUTS}
    # Initial state on the host: every mesh starts from exactly these numbers.
    params = jax.jit(lambda key: self.model.init(key, **self.example)['params'],
                     compiler_options=FAST_COMPILE)(jax.random.key(0))
    params = jax.device_get(jax.tree.map(lambda box: box.unbox(), params,
                                         is_leaf=lambda leaf: hasattr(leaf, 'unbox')))
    self.initial = TrainState(step=np.zeros((), np.int32), params=params,
                              opt_state=jax.device_get(self.optimizer.init(params)))
    self.results = {}

  def shardings(self, mesh):
    return state_lib.state_shardings(self.model, self.optimizer, self.example, mesh,
                                     self.config.logical_axis_rules)

  def train(self, name, sizes, devices=None):
    """Two steps on mesh `sizes`; returns (losses, state, jitted step, global batch)."""
    if name not in self.results:
      mesh = parallel.make_mesh(sizes, devices)
      shardings = self.shardings(mesh)
      state = jax.device_put(self.initial, shardings)
      step = parallel.under_mesh(jax.jit(
          step_lib.make_train_step(self.model, objectives.get('sft'), self.optimizer,
                                   self.schedule),
          in_shardings=(shardings, parallel.batch_sharding(mesh)), out_shardings=(shardings, None),
          donate_argnums=0, compiler_options=FAST_COMPILE), mesh, self.config.logical_axis_rules)
      batch = parallel.global_batch(self.batch, mesh)
      losses = []
      for _ in range(NUM_STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics['loss']))
      self.results[name] = (losses, state, step, batch)
    return self.results[name]


@pytest.fixture(scope='module')
def trainer():
  assert jax.device_count() == 8, 'tests/conftest.py simulates 8 CPU devices'
  return Trainer()


def named_leaves(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('name', list(MESHES))
def test_sharded_training_matches_one_device(trainer, name):
  losses, state, _, _ = trainer.train(name, MESHES[name])
  reference_losses, reference, _, _ = trainer.train('single', dict(data=1, fsdp=1, tensor=1),
                                                    jax.devices()[:1])
  assert reference_losses[1] < reference_losses[0]
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  assert int(state.step) == NUM_STEPS
  reference_params = named_leaves(reference.params)
  for path, leaf in named_leaves(state.params).items():
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(reference_params[path]), atol=2e-5,
                               err_msg=path)
  # Parameters and their Adam moments sit where the rules say, on all 8 devices.
  mu = named_leaves(state.opt_state)
  params = named_leaves(state.params)
  for path, expected in EXPECTED_SPECS.items():
    leaf = params[path]
    assert leaf.sharding.spec == expected, path
    assert len(leaf.sharding.device_set) == 8
    sizes = MESHES[name]
    expected_shard = tuple(dim // (sizes[axis] if axis else 1)
                           for dim, axis in zip(leaf.shape, tuple(expected)))
    assert leaf.sharding.shard_shape(leaf.shape) == expected_shard, path
    moments = [m for p, m in mu.items() if p.endswith(path) and '.mu' in p]
    assert moments and moments[0].sharding.spec == expected, path


def test_activation_constraints_reach_the_compiled_step(trainer):
  """Under `parallel.under_mesh` the models' `with_logical_constraint`s are in the program."""
  name = 'data=2,fsdp=2,tensor=2'
  _, state, step, batch = trainer.train(name, MESHES[name])
  mesh = parallel.make_mesh(MESHES[name])
  # Without the rules in context the constraints are silently dropped.
  assert 'sharding_constraint' not in step.__wrapped__.trace(state, batch).lower().as_text()
  with parallel.mesh_rules(mesh, trainer.config.logical_axis_rules):
    text = step.__wrapped__.trace(state, batch).lower().as_text()  # the jitted step, no compile
  constraints = [line for line in text.splitlines() if 'sharding_constraint' in line]
  # [batch, length, mlp] activations: batch over (data, fsdp), mlp over tensor.
  assert any('{"data", "fsdp"}, {}, {"tensor"}' in line for line in constraints), constraints[:5]
  # [batch, length, embed] residual stream: embed is not sharded (fsdp is taken by batch).
  assert any('{"data", "fsdp"}, {}, {}]' in line for line in constraints), constraints[:5]


def test_restore_onto_another_mesh(trainer, tmp_path):
  _, state, _, _ = trainer.train('fsdp=8', MESHES['fsdp=8'])
  manager = checkpoint.make_manager(str(tmp_path), keep=1)
  manager.save(NUM_STEPS, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()

  new_mesh = parallel.make_mesh(MESHES['data=2,fsdp=2,tensor=2'])
  new_shardings = trainer.shardings(new_mesh)
  abstract_state = checkpoint.abstract_like(state, new_shardings)
  restored = checkpoint.restore(manager, NUM_STEPS, abstract_state)
  manager.close()
  saved_params = named_leaves(state.params)
  for path, leaf in named_leaves(restored.params).items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(saved_params[path]), err_msg=path)
  for path, expected in EXPECTED_SPECS.items():
    leaf = named_leaves(restored.params)[path]
    assert leaf.sharding.mesh.shape == dict(data=2, fsdp=2, tensor=2)
    assert leaf.sharding.spec == expected, path
  assert int(restored.step) == NUM_STEPS
  np.testing.assert_array_equal(
      jax.tree.leaves(restored.opt_state)[0], jax.tree.leaves(state.opt_state)[0])


def test_mesh_shape_resolves_the_rest():
  assert parallel.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
  with pytest.raises(ValueError, match='needs 4 devices'):
    parallel.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(ValueError, match='at most one axis'):
    parallel.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)


class FakeDevice:
  """Just what mesh construction reads from a device."""

  def __init__(self, device_id, process_index):
    self.id, self.process_index, self.platform = device_id, process_index, 'gpu'
    self.device_kind = 'fake'

  def __repr__(self):
    return f'FakeDevice({self.id})'


def test_multi_slice_mesh_puts_dcn_axes_across_processes():
  # 2 nodes x 4 GPUs: fsdp=4 inside a node (fast links), data across the 2 nodes (slow links).
  devices = [FakeDevice(i, process_index=1 - i // 4) for i in range(8)]
  sizes = dict(data=1, fsdp=4, tensor=1, dcn_data=2, dcn_fsdp=1, dcn_tensor=1)
  grid = parallel.device_grid(sizes, devices)
  assert grid.shape == (2, 4, 1)
  assert [{device.process_index for device in grid[row].flat} for row in range(2)] == [{0}, {1}]
  # data=2 within each node, fsdp=2 across nodes.
  sizes = dict(data=2, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=2, dcn_tensor=1)
  grid = parallel.device_grid(sizes, devices)
  assert grid.shape == (2, 4, 1)
  assert {device.process_index for device in grid[:, :2].flat} == {0}
  assert {device.process_index for device in grid[:, 2:].flat} == {1}
  # Single slice keeps the devices' order.
  grid = parallel.device_grid(dict(data=-1, fsdp=2, tensor=1), devices)
  assert [device.id for device in grid.flat] == list(range(8))


def test_initialize_distributed_reads_the_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  for name, _ in parallel.CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('SLURM_NTASKS', '1')  # an interactive SLURM shell is one process
  parallel.initialize_distributed()
  assert calls == []  # one process: nothing to start
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert parallel.cluster_detected()
  monkeypatch.delenv('SLURM_NTASKS')
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  parallel.initialize_distributed()
  assert calls == [dict(num_processes=2, process_id=1)]
