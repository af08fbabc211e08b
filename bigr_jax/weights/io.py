"""Reading and writing PyTorch-style state dicts (.pt/.pth/.th/.bin, .npz, .safetensors) as numpy arrays."""

import pathlib
from typing import Mapping, Optional

import numpy as np

from bigr_jax import files

TORCH_SUFFIXES = (".th", ".pt", ".pth", ".bin")
SUFFIXES = TORCH_SUFFIXES + (".npz", ".safetensors")


def _tensor_to_numpy(tensor):
  import torch
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
    tensor = tensor.float()
  return tensor.numpy()


def read_state_dict(path, key: Optional[str] = None) -> dict:
  """{name: array} in file order. For torch files, `key` picks a nested dict; with key=None a dict whose
  only state dict sits under "ema" (the released generator checkpoints) is unwrapped.

  Torch files are read with `weights_only=True`: a file that needs arbitrary pickled code is refused.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no weights file at {path}")
  suffix = path.suffix.lower()
  if suffix not in SUFFIXES:
    raise ValueError(f"unknown weights format {suffix!r} for {path}; use .th/.pt/.pth/.bin, .npz or .safetensors")
  try:
    return _read(path, suffix, key)
  except (ValueError, KeyError, ImportError):  # ours: they name the file and what is wrong
    raise
  except Exception as e:  # pylint: disable=broad-except  (each reader fails its own way on a damaged file)
    raise files.UnusableFile(f"{path} cannot be read as {suffix} weights ({files.first_cause(e)}); the file is "
                             "truncated or damaged: download or export it again") from e


def _read(path: pathlib.Path, suffix: str, key: Optional[str]) -> dict:
  if suffix in TORCH_SUFFIXES:
    import pickle
    try:
      import torch
    except ImportError as e:
      raise ImportError("reading PyTorch files needs torch: pip install 'bigr_jax[torch]'") from e
    try:
      loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path} is not a plain tensor file (it needs pickled code, refused): {e}") from e
    if not isinstance(loaded, dict):
      raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    if key is None and "ema" in loaded and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
      key = "ema"
    if key is not None:
      if key not in loaded:
        raise ValueError(f"{path} has no entry {key!r}; its top level holds {list(loaded)[:10]}")
      loaded = loaded[key]
    nested = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if nested:
      raise ValueError(f"{path} is not a flat state dict: entries {nested[:10]} are not tensors; "
                       "pick one with key=...")
    return {k: _tensor_to_numpy(v) for k, v in loaded.items()}
  if key is not None:
    raise ValueError(f"key={key!r} applies to torch files only, not {suffix}")
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  from safetensors.numpy import load_file
  return load_file(str(path))


def write_state_dict(state_dict: Mapping[str, np.ndarray], path, wrap_key: Optional[str] = None,
                     aliases: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  """Writes {name: array} atomically (temp file + rename). Torch files keep the key order, may wrap the dict
  as {wrap_key: state_dict} (the released "ema" layout), and store `aliases` (extra key -> existing key)
  as views of the same storage, as the original's duplicate module registration does.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix not in SUFFIXES:
    raise ValueError(f"unknown weights format {suffix!r} for {path}; use .th/.pt/.pth/.bin, .npz or .safetensors")
  arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}  # ascontiguousarray makes 0-d 1-d
  aliases = dict(aliases or {})
  with files.atomic_path(path) as tmp:
    if suffix in TORCH_SUFFIXES:
      import torch
      tensors = {}
      for k, v in arrays.items():
        tensors[k] = tensors[aliases[k]] if aliases.get(k) in tensors else torch.from_numpy(v)
      torch.save({wrap_key: tensors} if wrap_key else tensors, tmp)
    elif suffix == ".npz":
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    else:
      from safetensors.numpy import save_file
      save_file(arrays, tmp)
  return path
