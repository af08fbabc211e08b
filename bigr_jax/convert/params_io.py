"""Params-only orbax checkpoints (what `python -m bigr_jax.convert from-torch` writes)."""

import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


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


def train_state(workdir, step: Optional[int] = None) -> dict:
  """Every field of a training workdir's latest (or given) finished checkpoint, as numpy trees. It is
  restored onto one local device, so a workdir written on any mesh or topology (a pod) loads here."""
  root = pathlib.Path(workdir).absolute() / "checkpoints"
  # Finished checkpoints only: orbax writes into "<step>.orbax-checkpoint-tmp-*" and renames when done.
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()) if root.exists() else []
  if not steps:
    raise FileNotFoundError(f"no training checkpoints under {root}")
  path = root / str(steps[-1] if step is None else step) / "state"
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = ocp.StandardCheckpointHandler().metadata(path)  # the item's tree: shapes and dtypes
  target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(path, target)
  return jax.tree_util.tree_map(np.asarray, state)


def train_state_params(workdir, use_ema: bool = True, step: Optional[int] = None) -> Any:
  """Params (EMA by default) of a training workdir's latest (or given) checkpoint, as numpy trees."""
  return train_state(workdir, step)["ema_params" if use_ema else "params"]
