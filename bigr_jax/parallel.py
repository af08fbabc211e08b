"""Device mesh, logical-axis sharding rules, and host-local to global batches."""

import contextlib
import os
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
from jax.experimental import mesh_utils, multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bigr_jax.config_sections import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter / activation axes -> mesh axes. One table; configs may replace it.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("mlp2", "fsdp"),
    ("layers", None),
    ("classes", None),
    ("bits", None),
    ("tokens", None),
)


def several_processes() -> bool:
  """Whether the environment makes this command one process of several (before JAX joins them)."""
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return (int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 or len(hosts) > 1
          or int(os.environ.get("SLURM_NTASKS", "1")) > 1)


def maybe_initialize_distributed(peer_timeout_s: float = 300.0) -> None:
  """Joins the other processes of a multi-host run, before anything touches the devices.

  TPU pod slices (and SLURM) are detected by JAX itself. Elsewhere (GPU hosts, or several CPU processes on one
  machine) set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on
  every process. A process that sends no heartbeat for `peer_timeout_s` (dead, hung, or cut off) ends every
  other process: JAX aborts them, and `bigr_jax.supervisor` says which was lost.
  """
  if jax.distributed.is_initialized():
    return
  timeout = {"heartbeat_timeout_seconds": max(1, round(peer_timeout_s))}
  if "JAX_NUM_PROCESSES" in os.environ:
    missing = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if k not in os.environ]
    if missing:
      raise ValueError(f"JAX_NUM_PROCESSES is set but {', '.join(missing)} is not: set all three on every process")
    jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]), **timeout)
  elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS")):
    jax.distributed.initialize(**timeout)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> Tuple[int, ...]:
  """Resolves one -1 entry to the remaining devices; checks that the product is the device count."""
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {sizes} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {num_devices} are available; set mesh sizes (e.g. --config.mesh.data=-1)")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh ('data', 'fsdp', 'tensor') from `config.mesh` (a section or a MeshConfig)."""
  mesh_config = MeshConfig.from_config(mesh_config)
  devices = np.asarray(devices if devices is not None else jax.devices())
  sizes = mesh_shape([mesh_config.data, mesh_config.fsdp, mesh_config.tensor], devices.size)
  dcn = mesh_config.dcn_data
  if dcn > 1:
    per_slice = list(sizes)
    if per_slice[0] % dcn:
      raise ValueError(f"data={sizes[0]} is not divisible by dcn_data={dcn}")
    per_slice[0] //= dcn
    grid = mesh_utils.create_hybrid_device_mesh(per_slice, [dcn, 1, 1], devices=list(devices))
  else:
    grid = devices.reshape(sizes)
  # Auto axes: Flax's logical sharding relies on them (the newer Explicit default breaks it).
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(config) -> tuple:
  rules = config.get("logical_axis_rules", None)
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules) if rules \
      else DEFAULT_RULES


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves carry logical axis names (nn.LogicallyPartitioned)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 1, axes: Sequence[str] = BATCH_AXES, batch: int = 0) -> NamedSharding:
  """An ndim-array split along its first (batch) dimension over the mesh `axes`; a `batch` they do not divide is
  an error naming both."""
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  if batch % shards:
    raise ValueError(f"batch {batch} is not divisible by the {shards} devices of mesh axes {tuple(axes)}")
  return NamedSharding(mesh, P(tuple(axes), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split: the product of the batch axes."""
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def round_up_to_shards(batch_size: int, mesh: Mesh) -> int:
  """The smallest global batch >= `batch_size` that splits over the batch shards of every host."""
  multiple = batch_shards(mesh) * jax.process_count()
  return -(-batch_size // multiple) * multiple


def pad_to_shards(array: np.ndarray, mesh: Mesh, mode: str = "edge") -> np.ndarray:
  """Pads axis 0 to a multiple of the batch shards (a last batch the mesh cannot split); slice the result
  back to `len(array)`."""
  pad = round_up_to_shards(len(array), mesh) - len(array)
  return np.pad(array, [(0, pad)] + [(0, 0)] * (np.ndim(array) - 1), mode=mode) if pad else array


def batch_size_per_process(global_batch_size: int, mesh: Mesh) -> int:
  """Host-local batch; the global batch must split evenly over the batch axes and the hosts."""
  shards = batch_shards(mesh)
  if global_batch_size % shards:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the {shards} batch shards of the mesh "
                     f"{dict(mesh.shape)}")
  if global_batch_size % jax.process_count():
    raise ValueError(f"batch size {global_batch_size} is not divisible by {jax.process_count()} hosts")
  return global_batch_size // jax.process_count()


class MeshJit:
  """`jax.jit(fn)` that is always traced, lowered and run under `jax.set_mesh(mesh)`.

  Flax's activation sharding constraints (`nn.with_logical_constraint`) are silently dropped when no mesh is
  set while tracing; this keeps them on however the step is called (`step(...)` or `step.lower(...)`).
  """

  def __init__(self, fn, mesh: Mesh, **jit_kwargs):
    self.mesh = mesh
    self._jitted = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self._jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self._jitted.lower(*args)


@contextlib.contextmanager
def tracing_on(mesh: Mesh, rules):
  """Inside a traced function: the model sees `mesh` and the logical `rules` (its activation constraints, and
  splash attention's per-shard split), as it does under `MeshJit` and the trainers' rules."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def from_same_on_every_host(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array split over the batch axes, from a host array that every process holds whole."""
  sharding = batch_sharding(mesh, np.ndim(array))
  return jax.make_array_from_callback(np.shape(array), sharding, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
  """The whole array on this host, every process the same copy (an array spanning several processes is gathered:
  each holds only its own shards)."""
  if getattr(array, "is_fully_addressable", True):
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def wait_for_every_process(name: str) -> None:
  """Returns once every process got here (on one process at once): e.g. after process 0 wrote files that all
  read next."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy arrays (split along the batch axis) -> global jax arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}
