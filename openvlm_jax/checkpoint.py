"""Orbax checkpoints of the train state, the data iterator's position and the config.

One CheckpointManager per workdir (`<workdir>/checkpoints/<step>/{state,data,config}`), async
saves, the newest `keep` kept. Restoring onto any mesh works: the targets carry the shardings.
"""

import os
from typing import Any, Optional

from etils import epath
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A manager over `<workdir>/checkpoints` that keeps the newest `keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  handlers = dict(state=ocp.StandardCheckpointHandler(),
                  data=grain.checkpoint.CheckpointHandler(),
                  config=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         config: ml_collections.ConfigDict, force: bool = False) -> bool:
  """Starts an async save of state, data position and config at `step`."""
  return manager.save(step, force=force, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config.to_dict()),
  ))


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `state` (arrays or shapes) that carry `shardings`."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      state, shardings)


def _key_names(path: tuple) -> tuple:
  """A tree path as plain names, so attribute keys (TrainState.params) match saved dict keys."""
  return tuple(str(getattr(key, 'name', getattr(key, 'key', getattr(key, 'idx', key))))
               for key in path)


def check_shapes(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises a ValueError naming the first tensor whose saved shape differs from the model's."""
  saved = manager.item_metadata(step)['state']
  if saved is None:  # a manager that has not saved yet knows no handler for 'state'
    saved = ocp.StandardCheckpointHandler().metadata(
        epath.Path(manager.directory) / str(step) / 'state')
  saved_leaves = {_key_names(path): leaf
                  for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  for path, expected in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    name = jax.tree_util.keystr(path)
    found = saved_leaves.get(_key_names(path))
    if found is None:
      raise ValueError(f'checkpoint step {step} in {manager.directory} has no tensor {name}')
    if tuple(found.shape) != tuple(expected.shape):
      raise ValueError(f'checkpoint step {step} in {manager.directory}: tensor {name} has shape '
                       f'{tuple(found.shape)}, the model expects {tuple(expected.shape)}')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Optional[Any] = None) -> Any:
  """Restores the state at `step` onto the shardings in `abstract_state`.

  The data iterator, when given, is moved to where it was at `step`, in place.
  """
  check_shapes(manager, step, abstract_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))['state']
