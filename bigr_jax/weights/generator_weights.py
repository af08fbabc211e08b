"""PyTorch <-> Flax weights of the BiGR generator, for the scanned and the unrolled layer layouts."""

import collections
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

from flax import traverse_util
import flax.linen as nn
import numpy as np

from bigr_jax.models import bigr
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.models.transcoder import linear_schedule

ALIAS_PREFIX = "diffusion_processor._denoise_fn."
BUFFER_PREFIX = "diffusion_processor.scheduler."
BUFFERS = ("k_final", "b_final", "beta", "cumbeta")


class Entry(NamedTuple):
  torch_key: str
  flax_path: Tuple[str, ...]
  layer: Optional[int]  # block index when the Flax tensor is stacked over layers (scanned layout)
  transpose: bool  # torch Linear (out, in) <-> Flax Dense (in, out)


def _linear(torch_prefix, flax_path, bias=True, layer=None):
  entries = [Entry(f"{torch_prefix}.weight", flax_path + ("kernel",), layer, True)]
  if bias:
    entries.append(Entry(f"{torch_prefix}.bias", flax_path + ("bias",), layer, False))
  return entries


def entries(config: GeneratorConfig) -> List[Entry]:
  """Every parameter, in the original state_dict order (aliases and buffers excluded)."""
  out = [
      Entry("mask_tok", ("mask_tok",), None, False),
      Entry("diffusion_pos_embed_learned", ("diffusion_pos_embed_learned",), None, False),
      Entry("cls_embedding.embedding_table.weight", ("cls_embedding", "embedding"), None, False),
      *_linear("tok_embeddings", ("tok_embeddings",)),
  ]
  if config.use_adaLN:
    out += _linear("adaLN.1", ("adaLN",))
  for i in range(config.n_layer):
    if config.scan_layers:
      prefix, layer = ("trunk", "layers", "block"), i
    else:
      prefix, layer = ("trunk", f"layers_{i}"), None
    t = f"layers.{i}"
    if config.use_adaLN:
      out.append(Entry(f"{t}.ada_gss", prefix + ("ada_gss",), layer, False))
    out += _linear(f"{t}.attention.wqkv", prefix + ("attention", "wqkv"), False, layer)
    out += _linear(f"{t}.attention.wo", prefix + ("attention", "wo"), False, layer)
    for w in ("w1", "w3", "w2"):
      out += _linear(f"{t}.feed_forward.{w}", prefix + ("feed_forward", w), False, layer)
    out.append(Entry(f"{t}.attention_norm.weight", prefix + ("attention_norm", "weight"), layer, False))
    out.append(Entry(f"{t}.ffn_norm.weight", prefix + ("ffn_norm", "weight"), layer, False))
  out.append(Entry("norm.weight", ("norm", "weight"), None, False))
  d = ("denoise_mlp",)
  out += _linear("denoise_mlp.t_embedder.mlp.0", d + ("t_embedder_0",))
  out += _linear("denoise_mlp.t_embedder.mlp.2", d + ("t_embedder_2",))
  out += _linear("denoise_mlp.x_embedder", d + ("x_embedder",))
  out += _linear("denoise_mlp.c_embedder", d + ("c_embedder",))
  for j in range(config.num_block_mlp):
    out += _linear(f"denoise_mlp.blocks.{j}.mlp.0", d + (f"blocks_{j}_mlp_0",))
    out += _linear(f"denoise_mlp.blocks.{j}.mlp.2", d + (f"blocks_{j}_mlp_2",))
    out += _linear(f"denoise_mlp.blocks.{j}.adaLN_modulation.1", d + (f"blocks_{j}_adaLN_modulation",))
  out += _linear("denoise_mlp.final_layer.linear", d + ("final_linear",))
  out += _linear("denoise_mlp.final_layer.adaLN_modulation.1", d + ("final_adaLN_modulation",))
  return out


def _flax_shape(entry: Entry, torch_shape) -> tuple:
  return tuple(reversed(torch_shape)) if entry.transpose else tuple(torch_shape)


def expected_torch_shapes(config: GeneratorConfig) -> Dict[str, tuple]:
  """Torch key -> shape for a config, derived from the Flax parameter shapes (nothing allocated)."""
  shapes = nn.meta.unbox(bigr.param_shapes(config))
  out = {}
  for e in entries(config):
    node = shapes
    for name in e.flax_path:
      node = node[name]
    shape = node.shape[1:] if e.layer is not None else node.shape
    out[e.torch_key] = _flax_shape(e, shape)
  return out


def state_dict_shapes(config: GeneratorConfig) -> "collections.OrderedDict[str, tuple]":
  """Every entry of the original state_dict in order: parameters, their `_denoise_fn` aliases, buffers."""
  shapes = collections.OrderedDict(expected_torch_shapes(config))
  for key in [k for k in shapes if k.startswith("denoise_mlp.")]:
    shapes[ALIAS_PREFIX + key[len("denoise_mlp."):]] = shapes[key]
  for name in BUFFERS:
    shapes[BUFFER_PREFIX + name] = (config.n_sample_steps + 1,)
  return shapes


def _hint(config: GeneratorConfig, key: str, got, want) -> str:
  """A likely config field for a shape mismatch."""
  if key.startswith("tok_embeddings.weight") or key.endswith("x_embedder.weight"):
    return f" (binary_size/bits: the file has {got[-1]}, the config {want[-1]})"
  if key == "diffusion_pos_embed_learned":
    return f" (seq_len: the file has {got[1]} tokens, the config {want[1]}; 512 px models use 1024)"
  if key.startswith("cls_embedding"):
    return f" (num_classes: the file has {got[0] - 1} classes + null, the config {want[0] - 1})"
  if key.startswith("denoise_mlp"):
    return " (denoise_hidden_dim)"
  return " (dim / model size)"


def validate(state_dict: Mapping[str, np.ndarray], config: GeneratorConfig) -> None:
  """Raises ValueError listing missing, unexpected and mis-shaped keys, with the likely config field."""
  want = expected_torch_shapes(config)
  present = {k for k in state_dict if not k.startswith(ALIAS_PREFIX) and not k.startswith(BUFFER_PREFIX)}
  missing = [k for k in want if k not in present]
  unexpected = sorted(present - set(want))
  misshaped = [f"{k}: file {tuple(state_dict[k].shape)} vs config {want[k]}{_hint(config, k, state_dict[k].shape, want[k])}"
               for k in want if k in present and tuple(state_dict[k].shape) != want[k]]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
  if misshaped:
    problems.append("mis-shaped keys:\n    " + "\n    ".join(misshaped[:10]))
  if problems:
    layers = {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")}
    note = f" The file has {len(layers)} layers, the config {config.n_layer}." if layers else ""
    if missing and any(k.startswith("adaLN") for k in missing):
      note += " The config has use_adaLN=True; the file was trained without adaLN?"
    if unexpected and any(k.startswith("adaLN") for k in unexpected):
      note += " The file uses adaLN; set use_adaLN=True."
    raise ValueError("the weights do not fit the config:\n  " + "\n  ".join(problems) + note)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], config: GeneratorConfig) -> dict:
  """Flax params (plain nested dicts of float32 numpy arrays) from an original generator state dict."""
  validate(state_dict, config)
  flat: Dict[Tuple[str, ...], np.ndarray] = {}
  stacked: Dict[Tuple[str, ...], Dict[int, np.ndarray]] = collections.defaultdict(dict)
  for e in entries(config):
    value = np.asarray(state_dict[e.torch_key], np.float32)
    value = value.T if e.transpose else value
    if e.layer is None:
      flat[e.flax_path] = value
    else:
      stacked[e.flax_path][e.layer] = value
  for path, per_layer in stacked.items():
    flat[path] = np.stack([per_layer[i] for i in range(config.n_layer)])
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(params, config: GeneratorConfig, with_aliases: bool = True, with_buffers: bool = True):
  """An original-layout state dict (same keys and order, aliases and scheduler buffers included)."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  out = collections.OrderedDict()
  for e in entries(config):
    value = np.asarray(flat[e.flax_path], np.float32)
    if e.layer is not None:
      value = value[e.layer]
    out[e.torch_key] = value.T.copy() if e.transpose else value
  if with_aliases:
    for key in [k for k in out if k.startswith("denoise_mlp.")]:
      out[ALIAS_PREFIX + key[len("denoise_mlp."):]] = out[key]
  if with_buffers:
    schedule = linear_schedule(config.n_sample_steps)
    for name in BUFFERS:
      out[BUFFER_PREFIX + name] = schedule[name]
  return out


def aliases(state_dict: Mapping[str, np.ndarray]) -> Dict[str, str]:
  """alias key -> primary key, for writers that share storage."""
  return {k: "denoise_mlp." + k[len(ALIAS_PREFIX):] for k in state_dict if k.startswith(ALIAS_PREFIX)}

