"""Mesh, logical axis rules, multi-host start-up and global arrays.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...); the config's rules map them
to the mesh axes `data`, `fsdp` and `tensor`. Nothing here knows about models or data files.
"""

import math
import os
from typing import Any, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def initialize_distributed() -> None:
  """Starts JAX's multi-host runtime when the environment describes several processes.

  `jax.distributed.initialize()` discovers TPU pods and SLURM jobs by itself; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  on_cluster = any(name in os.environ for name in (
      'JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS'))
  if on_cluster and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (at most one -1, meaning 'the rest') against the device count."""
  shape = [int(sizes[axis]) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(sizes)}')
  known = math.prod(size for size in shape if size != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'config.mesh {dict(sizes)} does not divide {num_devices} devices')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f'config.mesh {dict(sizes)} needs {math.prod(shape)} devices, '
                     f'{num_devices} are present')
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(sizes, len(devices))
  device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple]) -> Any:
  """NamedShardings for a tree whose leaves are `nn.Partitioned` boxes (or plain arrays)."""
  logical_specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, tuple(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split along their first axis over the data and fsdp mesh axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, array)
          for name, array in local_batch.items()}
