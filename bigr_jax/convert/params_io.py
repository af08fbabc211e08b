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


def train_state_params(workdir, use_ema: bool = True, step: Optional[int] = None) -> Any:
  """Params (EMA by default) from a training workdir's latest (or given) checkpoint, as numpy arrays."""
  root = pathlib.Path(workdir).absolute() / "checkpoints"
  steps = sorted(int(p.name) for p in root.glob("[0-9]*") if p.is_dir()) if root.exists() else []
  if not steps:
    raise FileNotFoundError(f"no training checkpoints under {root}")
  step = steps[-1] if step is None else step
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(root / str(step) / "state")
  return jax.tree_util.tree_map(np.asarray, state["ema_params" if use_ema else "params"])
