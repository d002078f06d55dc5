"""Mesh, logical axis rules, multi-host start-up and global arrays.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...); the config's rules map them
to the mesh axes `data`, `fsdp` and `tensor`. Nothing here knows about models or data files.
"""

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from openvlm_jax.console import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
# Environment variables that say "this process is one of several" (name, minimum value).
CLUSTER_VARIABLES = (('JAX_COORDINATOR_ADDRESS', None), ('TPU_WORKER_HOSTNAMES', None),
                     ('MEGASCALE_COORDINATOR_ADDRESS', None), ('SLURM_NTASKS', 2),
                     ('OMPI_COMM_WORLD_SIZE', 2))


def cluster_detected() -> bool:
  """Whether the environment describes a multi-process job (a single SLURM task is not one)."""
  for name, minimum in CLUSTER_VARIABLES:
    value = os.environ.get(name)
    if value is not None and (minimum is None or int(value) >= minimum):
      return True
  return False


def initialize_distributed() -> None:
  """Starts JAX's multi-host runtime when the environment describes several processes.

  `jax.distributed.initialize()` discovers TPU pods, SLURM and Open MPI jobs by itself;
  elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID on every process. Every process logs its index.
  """
  if cluster_detected() and not jax.distributed.is_initialized():
    explicit = {}
    if 'JAX_NUM_PROCESSES' in os.environ:
      explicit['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if 'JAX_PROCESS_ID' in os.environ:
      explicit['process_id'] = int(os.environ['JAX_PROCESS_ID'])
    jax.distributed.initialize(**explicit)  # JAX_COORDINATOR_ADDRESS is read by jax itself
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (at most one -1, meaning 'the rest') against the device count."""
  shape = [int(sizes[axis]) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise UserError(f'config.mesh: at most one axis may be -1, got {dict(sizes)}')
  known = math.prod(size for size in shape if size != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f'config.mesh {dict(sizes)} does not divide {num_devices} devices')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise UserError(f'config.mesh {dict(sizes)} needs {math.prod(shape)} devices, '
                     f'{num_devices} are present')
  return tuple(shape)


def dcn_shape(sizes: Mapping[str, int]) -> tuple[int, ...]:
  """The slow-network (DCN) factor of each mesh axis: `dcn_data`, ... (1 when absent)."""
  return tuple(int(sizes.get(f'dcn_{axis}', 1)) for axis in MESH_AXES)


def device_grid(sizes: Mapping[str, int], devices: Sequence[Any]) -> np.ndarray:
  """`devices` arranged as a [data, fsdp, tensor] array for `config.mesh` sizes.

  Single slice: `sizes` gives each axis's size. Multi-slice (any `dcn_<axis>` > 1): `data`,
  `fsdp`, `tensor` are sizes within one slice (fast ICI links) and `dcn_<axis>` says how many
  slices that axis spans, so axis `a` has size `sizes[a] * dcn_a`. Slices are TPU slices
  (devices with `slice_index`) or, elsewhere (GPU nodes), processes.
  """
  devices = list(devices)
  dcn = dcn_shape(sizes)
  if math.prod(dcn) == 1:
    return np.asarray(devices).reshape(mesh_shape(sizes, len(devices)))
  num_slices = math.prod(dcn)
  if len(devices) % num_slices:
    raise UserError(f'config.mesh dcn sizes {dcn} do not divide {len(devices)} devices')
  ici = mesh_shape(sizes, len(devices) // num_slices)
  process_is_granule = getattr(devices[0], 'slice_index', None) is None
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                              process_is_granule=process_is_granule)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) over `devices` (default: all devices).

  Axis types are Auto, so the models' `nn.with_logical_constraint`s act as hints to GSPMD.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(device_grid(sizes, devices), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Sequence[tuple]) -> Iterator[None]:
  """Makes `mesh` and the logical axis `rules` current, so the models' activation constraints
  (`nn.with_logical_constraint`) take effect when a function is traced inside."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield


def under_mesh(function: Callable, mesh: Mesh, rules: Sequence[tuple]) -> Callable:
  """Wraps (a jitted) `function` so every call traces and runs inside `mesh_rules`."""

  @functools.wraps(function)
  def wrapped(*args, **kwargs):
    with mesh_rules(mesh, rules):
      return function(*args, **kwargs)

  return wrapped


def kernel_mesh_axes(logical_name: str, *sizes: int) -> str | tuple[str, ...] | None:
  """Mesh axes the current rules give `logical_name`, if their device count divides `sizes`.

  For calling a kernel per device under `jax.shard_map` (a Pallas call is opaque to XLA's
  partitioner, which would otherwise gather its operands whole onto every device). Returns None
  outside a mesh, for a name no rule maps, or when the split would be uneven; the caller then
  keeps that dimension whole.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = nn.logical_to_mesh_axes((logical_name,))[0]
  if axes is None:
    return None
  count = math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes))
  if count == 1 or any(size % count for size in sizes):
    return None
  return axes


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
