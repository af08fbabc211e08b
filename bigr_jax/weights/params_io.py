"""Params-only orbax checkpoints (what `python -m bigr_jax.convert from-torch` writes)."""

import logging
import pathlib
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from bigr_jax import files


def save_params(params: Any, directory) -> pathlib.Path:
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f"{directory} exists; choose a new output directory")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, params)
  return directory


def load_params(directory, abstract_params: Optional[Any] = None) -> Any:
  """Restores params; with `abstract_params` (ShapeDtypeStructs, optionally sharded) shapes are checked."""
  directory = pathlib.Path(directory).absolute()
  if not directory.exists():
    raise FileNotFoundError(f"no params checkpoint at {directory}")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      return checkpointer.restore(directory, abstract_params) if abstract_params is not None \
          else checkpointer.restore(directory)
    except (ValueError, KeyError) as e:
      raise ValueError(f"the params in {directory} do not fit the config (model size, bits, scan_layers?): "
                       f"{e}") from e


def finished_steps(directory) -> list:
  """Steps whose checkpoint under `directory` was written to the end (orbax writes into
  `<step>.orbax-checkpoint-tmp-*` and renames it when done)."""
  directory = pathlib.Path(directory)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def train_state(workdir, step: Optional[int] = None, fields: Optional[tuple] = None) -> dict:
  """The fields (all by default) of a training workdir's latest (or given) finished checkpoint, as numpy trees.
  Only the fields asked for are read (a B-AE's EMA params are a sixth of its state's arrays). It is restored onto
  one local device, so a workdir written on any mesh or topology (a pod) loads here."""
  root = pathlib.Path(workdir).absolute() / "checkpoints"
  steps = finished_steps(root)
  if not steps:
    raise FileNotFoundError(f"no training checkpoints under {root}")
  path = root / str(steps[-1] if step is None else step) / "state"
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  quiet_failed_reads()
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(path)  # the item's tree: shapes and dtypes
    wanted = {name: metadata[name] for name in (fields or metadata)}
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), wanted)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds; the cause is named)
    raise files.UnusableFile(f"checkpoint {path.parent} cannot be read: {files.first_cause(e)}. Resuming the training "
                             "run sets it aside and falls back to the step before") from e
  return jax.tree_util.tree_map(np.asarray, state)


def train_state_params(workdir, use_ema: bool = True, step: Optional[int] = None) -> Any:
  """Params (EMA by default) of a training workdir's latest (or given) checkpoint, as numpy trees."""
  field = "ema_params" if use_ema else "params"
  return train_state(workdir, step, fields=(field,))[field]


def quiet_failed_reads() -> None:
  """When a restore fails, orbax's other pending reads fail too, as they finish: each reports `RuntimeError:
  Event loop is closed` through sys.unraisablehook, or asyncio logs its never-retrieved task. Hundreds of
  tracebacks that bury the real cause. This drops those two kinds of report (orbax is the process's only user
  of asyncio) and passes every other one on."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_event_loops", False):
    return

  def hook(report):
    if not (report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  hook.drops_closed_event_loops = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(
      lambda record: not record.getMessage().startswith("Task exception was never retrieved"))
