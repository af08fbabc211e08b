"""PyTorch <-> Flax weights of the B-AE tokenizer, its PatchGAN discriminator and LPIPS.

State dicts are plain `{name: np.ndarray}` in the original's key names. The released B-AE files
(`binaryae_ema_*.th`) hold a whole `BinaryGAN`: `ae.*` (the autoencoder), `disc.*` and `perceptual.*`.
Every converter checks the complete key set and every shape first, and raises one ValueError that lists
all missing, unexpected and mis-shaped entries.
"""

import os
import re
from typing import Iterable

from flax import traverse_util
import flax.linen as nn
import numpy as np

from bigr_jax.weights.io import read_state_dict
from bigr_jax.models.discriminator import discriminator_layout
from bigr_jax.models.lpips import LPIPS_CHANNELS, VGG16_CONVS
from bigr_jax.models.tokenizer import TokenizerConfig, decoder_layout, encoder_layout

CHECKPOINT_GROUPS = ("ae", "disc", "perceptual")

# A spec row: (torch key, flax path, how to convert, torch shape). `how` is "conv" (O,I,kh,kw) <-> (kh,kw,I,O),
# or "copy".


def _conv_rows(key, path, out_channels, in_channels, kernel, bias=True):
  rows = [(f"{key}.weight", path + ("kernel",), "conv", (out_channels, in_channels, kernel, kernel))]
  if bias:
    rows.append((f"{key}.bias", path + ("bias",), "copy", (out_channels,)))
  return rows


def _norm_rows(key, path, channels):
  return [(f"{key}.weight", path + ("scale",), "copy", (channels,)),
          (f"{key}.bias", path + ("bias",), "copy", (channels,))]


def _block_rows(key, path, kind, in_channels, out_channels):
  if kind in ("conv_in", "conv_out"):
    return _conv_rows(key, path, out_channels, in_channels, 3)
  if kind == "norm":
    return _norm_rows(key, path, in_channels)
  if kind in ("down", "up"):
    return _conv_rows(f"{key}.conv", path + ("conv",), out_channels, in_channels, 3)
  if kind == "res":
    return (_norm_rows(f"{key}.norm1", path + ("norm1",), in_channels)
            + _conv_rows(f"{key}.conv1", path + ("conv1",), out_channels, in_channels, 3)
            + _norm_rows(f"{key}.norm2", path + ("norm2",), out_channels)
            + _conv_rows(f"{key}.conv2", path + ("conv2",), out_channels, out_channels, 3)
            + _conv_rows(f"{key}.conv_out", path + ("conv_out",), out_channels, in_channels, 1))
  if kind == "attn":
    rows = _norm_rows(f"{key}.norm", path + ("norm",), in_channels)
    for name in ("q", "k", "v", "proj_out"):
      rows += _conv_rows(f"{key}.{name}", path + (name,), in_channels, in_channels, 1)
    return rows
  raise ValueError(f"unknown block kind {kind!r}")


def tokenizer_specs(config: TokenizerConfig) -> list[tuple]:
  """Every B-AE state-dict entry in the original's key order, with its Flax path and torch shape."""
  rows = []
  for index, (kind, in_channels, out_channels) in enumerate(encoder_layout(config)):
    rows += _block_rows(f"encoder.blocks.{index}", ("encoder", f"blocks_{index}"), kind, in_channels, out_channels)
  rows += _conv_rows("quantize.proj.0", ("quantize", "proj"), config.codebook_size, config.emb_dim, 1)
  rows.append(("quantize.embed.weight", ("quantize", "embed"), "copy", (config.codebook_size, config.emb_dim)))
  for index, (kind, in_channels, out_channels) in enumerate(decoder_layout(config)):
    rows += _block_rows(f"generator.blocks.{index}", ("generator", f"blocks_{index}"), kind, in_channels,
                        out_channels)
  channels = config.nf * config.ch_mult[0]
  rows += _conv_rows("generator.logsigma.0", ("generator", "logsigma_0"), channels, channels, 3)
  rows += _conv_rows("generator.logsigma.2", ("generator", "logsigma_2"), config.n_channels, channels, 1)
  return rows


def discriminator_specs(in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> list[tuple]:
  """Discriminator entries in key order; BatchNorm running stats map to the 'batch_stats' collection."""
  rows = []
  for spec in discriminator_layout(in_channels, ndf, n_layers):
    rows += _conv_rows(f"main.{spec.index}", ("params", f"main_{spec.index}"), spec.out_channels,
                       spec.in_channels, 4, bias=spec.use_bias)
    if spec.batch_norm:
      key, name, channels = f"main.{spec.index + 1}", f"main_{spec.index + 1}", spec.out_channels
      rows += _norm_rows(key, ("params", name), channels)
      rows += [(f"{key}.running_mean", ("batch_stats", name, "mean"), "copy", (channels,)),
               (f"{key}.running_var", ("batch_stats", name, "var"), "copy", (channels,)),
               (f"{key}.num_batches_tracked", None, "counter", ())]
  return rows


def lpips_specs() -> list[tuple]:
  """LPIPS entries (VGG16 convs in torchvision names, then the linear heads)."""
  rows = []
  for index, in_channels, out_channels in VGG16_CONVS:
    rows += _conv_rows(f"features.{index}", ("net", f"features_{index}"), out_channels, in_channels, 3)
  for k, channels in enumerate(LPIPS_CHANNELS):
    rows.append((f"lin{k}.model.1.weight", (f"lin{k}", "kernel"), "conv", (1, channels, 1, 1)))
  return rows


# --- checking and converting ---------------------------------------------------------------------------


def _listing(names: list[str], limit: int = 20) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check(found: dict, expected: dict, what: str, strays: Iterable[str] = ()):
  """Raises one ValueError naming every missing, unexpected (strays included) and mis-shaped entry."""
  missing = [k for k in expected if k not in found]
  unexpected = [k for k in found if k not in expected] + list(strays)
  misshaped = [f"{k}: expected {tuple(expected[k])}, got {tuple(found[k])}"
               for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
  if missing or unexpected or misshaped:
    lines = [f"{what} does not match the model:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): {_listing(missing)}")
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): {_listing(unexpected)}")
    if misshaped:
      lines.append(f"  wrong shape ({len(misshaped)}): {_listing(misshaped)}")
    raise ValueError("\n".join(lines))


def split_checkpoint(state_dict: dict) -> dict[str, dict]:
  """Groups a `BinaryGAN` state dict by prefix: {'ae', 'disc', 'perceptual', '' (no known prefix)}."""
  groups = {name: {} for name in CHECKPOINT_GROUPS + ("",)}
  for key, value in state_dict.items():
    head, _, rest = key.partition(".")
    if head in CHECKPOINT_GROUPS and rest:
      groups[head][rest] = value
    else:
      groups[""][key] = value
  return groups


def _select(state_dict: dict, group: str) -> tuple[dict, list[str]]:
  """(entries of one group, stray keys) from a bare dict or a prefixed checkpoint; other groups are dropped.

  In a prefixed checkpoint, keys without a known prefix are strays, reported as unexpected.
  """
  groups = split_checkpoint(state_dict)
  if groups[group]:
    return groups[group], list(groups[""])
  return groups[""], []


def _to_flax(array, how):
  array = np.asarray(array, np.float32)
  return np.ascontiguousarray(array.transpose(2, 3, 1, 0)) if how == "conv" else array


def _to_torch(array, how):
  array = np.asarray(array, np.float32)
  return np.ascontiguousarray(array.transpose(3, 2, 0, 1)) if how == "conv" else array.copy()


def _import(selected: tuple[dict, list[str]], specs: list, what: str) -> dict:
  state_dict, strays = selected
  # Step counters are optional on the way in (older torch files lack them); nothing reads them.
  expected = {key: shape for key, _, how, shape in specs if how != "counter" or key in state_dict}
  _check({k: np.shape(v) for k, v in state_dict.items()}, expected, what, strays)
  return traverse_util.unflatten_dict(
      {path: _to_flax(state_dict[key], how) for key, path, how, _ in specs if path is not None})


def _flax_shape(how, torch_shape):
  return tuple(torch_shape[i] for i in (2, 3, 1, 0)) if how == "conv" else tuple(torch_shape)


def _export(tree, specs: list, what: str, prefix: str) -> dict:
  flat = traverse_util.flatten_dict(nn.meta.unbox(tree))
  expected = {path: _flax_shape(how, shape) for _, path, how, shape in specs if path is not None}
  _check({"/".join(p): np.shape(v) for p, v in flat.items()}, {"/".join(p): s for p, s in expected.items()}, what)
  out = {}
  for key, path, how, _ in specs:
    # Torch's BatchNorm step counter is not tracked here; with a fixed momentum torch never reads it.
    out[prefix + key] = np.zeros((), np.int64) if how == "counter" else _to_torch(flat[path], how)
  return out


def _unwrap_params(tree):
  tree = nn.meta.unbox(tree)
  if set(tree.keys()) == {"params"}:
    return tree["params"]
  return tree


def torch_to_flax(state_dict: dict, config: TokenizerConfig) -> dict:
  """B-AE params (the tree under 'params') from a state dict with or without the `ae.` prefix.

  `disc.*` and `perceptual.*` entries of a released `.th` file are ignored.
  """
  return _import(_select(state_dict, "ae"), tokenizer_specs(config), "B-AE state dict")


def flax_to_torch(params, config: TokenizerConfig, prefix: str = "") -> dict[str, np.ndarray]:
  """The original's B-AE state dict, in its key order (`prefix="ae."` for the `.th` layout)."""
  return _export(_unwrap_params(params), tokenizer_specs(config), "B-AE params", prefix)


def discriminator_torch_to_flax(state_dict: dict, in_channels: int = 3, ndf: int = 64,
                                n_layers: int = 3) -> dict:
  """{'params', 'batch_stats'} of `Discriminator` from a state dict with or without the `disc.` prefix."""
  return _import(_select(state_dict, "disc"), discriminator_specs(in_channels, ndf, n_layers),
                 "discriminator state dict")


def discriminator_flax_to_torch(variables, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
                                prefix: str = "") -> dict[str, np.ndarray]:
  """The original's discriminator state dict from {'params', 'batch_stats'}; the step counters are 0."""
  variables = nn.meta.unbox(variables)
  specs = discriminator_specs(in_channels, ndf, n_layers)
  return _export({"params": variables["params"], "batch_stats": variables["batch_stats"]}, specs,
                 "discriminator variables", prefix)


# torchvision's vgg16 names its convs `features.i`; LPIPS wraps the same layers as `net.sliceN.i`.
_LPIPS_SLICE_KEY = re.compile(r"^net\.slice[1-5]\.(\d+)\.")
_LPIPS_IGNORED = re.compile(r"^(classifier\.|scaling_layer\.)")


def lpips_torch_to_flax(state_dict: dict) -> dict:
  """LPIPS params from torch names: VGG16 convs as `features.i.*` (torchvision) or `net.sliceN.i.*` (lpips,
  optionally under `perceptual.`), and heads `lin{k}.model.1.weight`. Several files may be merged first.

  VGG's classifier and LPIPS's fixed scaling-layer buffers are ignored.
  """
  selected, strays = _select(state_dict, "perceptual")
  renamed = {}
  for key, value in selected.items():
    key = _LPIPS_SLICE_KEY.sub(r"features.\1.", key)
    if not _LPIPS_IGNORED.match(key):
      renamed[key] = value
  return _import((renamed, strays), lpips_specs(), "LPIPS state dict")


def lpips_flax_to_torch(params) -> dict[str, np.ndarray]:
  """LPIPS params back to torchvision (`features.i.*`) and lpips (`lin{k}.model.1.weight`) names."""
  return _export(_unwrap_params(params), lpips_specs(), "LPIPS params", "")


def read_lpips_params(paths: Iterable[os.PathLike]) -> dict:
  """LPIPS params from weight files, e.g. torchvision's vgg16 file and lpips's `vgg.pth` heads."""
  merged = {}
  for path in paths:
    merged.update(read_state_dict(path))
  return lpips_torch_to_flax(merged)
