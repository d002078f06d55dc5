"""Orbax checkpoints of the train state, the data iterator's position and the config.

One CheckpointManager per workdir (`<workdir>/checkpoints/<step>/{state,data,config}`), async
saves, the newest `keep` kept. Restoring onto any mesh works: the targets carry the shardings.
"""

import os
from collections.abc import Sequence
from typing import Any, Optional

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from openvlm_jax.console import UserError


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`, absolute."""
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


def saved_steps(workdir: str) -> list[int]:
  """The finished checkpoints' steps, oldest first, without creating anything."""
  folder = checkpoint_dir(workdir)
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder)
                if name.isdigit() and os.path.isdir(os.path.join(folder, name)))


def require_step(workdir: str, step: int = -1) -> int:
  """The checkpoint step to read (-1: the latest), or a UserError saying what there is."""
  steps = saved_steps(workdir)
  if not steps:
    raise UserError(f'no checkpoint in {workdir}: train first (--mode=train), or pass the '
                    'workdir of a trained run')
  if step == -1:
    return steps[-1]
  if step not in steps:
    raise UserError(f'no checkpoint at step {step} in {checkpoint_dir(workdir)} (saved steps: '
                    f'{steps})')
  return step


def make_manager(workdir: str, keep: int,
                 protect: Sequence[int] = ()) -> ocp.CheckpointManager:
  """A manager over `<workdir>/checkpoints` that keeps the newest `keep` steps.

  Steps in `protect` are never rotated away by this manager: a resumed run protects the step
  it started from, so a run that goes bad cannot push the last good checkpoint out.
  """
  policies = [preservation.LatestN(keep)]
  if protect:
    policies.append(preservation.CustomSteps(list(protect)))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation.AnyPreservationPolicy(policies), create=True,
      enable_async_checkpointing=True)
  handlers = dict(state=ocp.StandardCheckpointHandler(),
                  data=grain.checkpoint.CheckpointHandler(),
                  config=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


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
      raise UserError(f'checkpoint step {step} in {manager.directory} has no tensor {name}')
    if tuple(found.shape) != tuple(expected.shape):
      raise UserError(f'checkpoint step {step} in {manager.directory}: tensor {name} has shape '
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


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Reads only the parameters of the train state at `step` (no optimizer moments).

  `abstract_params` carries the shardings; the rest of the saved state is not read.
  """
  check_shapes(manager, step, {'params': abstract_params})
  target = {'params': abstract_params}
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(
        epath.Path(manager.directory) / str(step) / 'state',
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
  return restored['params']


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The config saved with checkpoint `step`, as a dict; None if it has none."""
  if not (epath.Path(manager.directory) / str(step) / 'config').exists():
    return None
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def raise_failed_save(manager: ocp.CheckpointManager, wait: bool = False) -> None:
  """Raises a UserError if a background save failed (after waiting for it, with `wait`)."""
  try:
    if wait:
      manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as error:  # pylint: disable=broad-except  (whatever the writer hit)
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    raise UserError(f'saving a checkpoint in {manager.directory} failed: '
                    f'{type(cause).__name__}: {cause}') from error
