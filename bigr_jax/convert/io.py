"""Reading and writing PyTorch-style state dicts (.pt/.pth/.th, .npz, .safetensors) as numpy arrays."""

import collections
import pathlib
from typing import Mapping, Optional

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin")


def read_state_dict(path, key: Optional[str] = None) -> "collections.OrderedDict[str, np.ndarray]":
  """Reads a state dict of arrays. For torch files, `key` picks a sub-dict ("ema" in released checkpoints).

  Torch files are opened with `weights_only=True`: a file that needs arbitrary pickled code is refused.
  With key=None, a dict holding "ema" (and no arrays at top level) is unwrapped automatically.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such weights file: {path}")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return collections.OrderedDict((k, data[k]) for k in data.files)
  if suffix == ".safetensors":
    from safetensors.numpy import load_file
    return collections.OrderedDict(load_file(str(path)))
  if suffix in TORCH_SUFFIXES:
    try:
      import torch
    except ImportError as e:
      raise ImportError("reading PyTorch files needs torch: pip install 'bigr_jax[torch]'") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling of anything but tensors and containers is refused
      raise ValueError(f"{path} could not be loaded as plain tensors (weights_only=True): {e}") from e
    if key is not None:
      if key not in obj:
        raise KeyError(f"{path} has no entry {key!r}; its top-level keys are {sorted(obj)[:10]}")
      obj = obj[key]
    elif "ema" in obj and not any(hasattr(v, "shape") for v in obj.values()):
      obj = obj["ema"]
    return collections.OrderedDict(
        (k, v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy())
        for k, v in obj.items() if hasattr(v, "shape"))
  raise ValueError(f"unknown weights format {suffix!r} for {path}: use .pt/.pth/.th, .npz or .safetensors")


def write_state_dict(state_dict: Mapping[str, np.ndarray], path, wrap_key: Optional[str] = None,
                     aliases: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  """Writes a state dict. Torch files may wrap it as {wrap_key: state_dict} (the released "ema" layout).

  `aliases` maps extra key -> existing key; in torch files the alias shares the tensor's storage, as the
  original's duplicate registration does, so the file is no bigger.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  aliases = dict(aliases or {})
  suffix = path.suffix.lower()
  if suffix in TORCH_SUFFIXES:
    import torch
    tensors = collections.OrderedDict()
    for k, v in state_dict.items():
      tensors[k] = tensors[aliases[k]] if k in aliases and aliases[k] in tensors else torch.from_numpy(
          np.ascontiguousarray(v))
    torch.save({wrap_key: tensors} if wrap_key else tensors, path)
  elif suffix == ".npz":
    np.savez(path, **{k: np.asarray(v) for k, v in state_dict.items()})
  elif suffix == ".safetensors":
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
  else:
    raise ValueError(f"unknown weights format {suffix!r} for {path}: use .pt/.pth/.th, .npz or .safetensors")
  return path
