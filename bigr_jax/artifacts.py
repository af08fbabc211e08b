"""The one loader of trained weights, and the standard paths of a run's outputs.

A weights source is any of:
- a training workdir (it has `checkpoints/`): the latest train state's EMA params (or the raw ones);
- a params directory written by `python -m bigr_jax.convert from-torch` (an orbax params checkpoint);
- a released PyTorch file (.pt / .pth / .th / .bin) or .npz / .safetensors, converted on the fly;
- such a file on the Hugging Face hub by name, `hf://<owner>/<repo>/<path>[@revision]` (`bigr_jax.hub`).
Sampling, editing, evaluation, the demo and the app load through here; none of them imports `train/`.
"""

import pathlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from bigr_jax import hub, typed_config
from bigr_jax.weights import generator_weights, io, params_io, tokenizer_weights
from bigr_jax.models import bigr, tokenizer as tokenizer_lib
from bigr_jax.models.config import GeneratorConfig, TokenizerConfig

# Where each mode writes, relative to its workdir.
SAMPLES_DIR = "samples"  # --mode=sample: samples.png, samples.npz (ADM layout), samples.json
EVALUATION_SAMPLES = "samples/fid.npz"  # --mode=evaluate: the batch it generates and scores
EVALUATION_PARTS = "samples/fid_parts"  # ... and that batch's finished parts, while it is drawn
EVALUATION_RESULT = "evaluation.json"  # --mode=evaluate: FID, IS, precision and recall
EDIT_DIR = "edit"  # --mode=edit: <task>.png, <task>.npz
FEATURES_DIR = "features"  # --mode=features: features/<split>/, and linear_probe.json beside it


def output_path(workdir, relative: str) -> pathlib.Path:
  return pathlib.Path(workdir) / relative


def _kind(source) -> str:
  path = pathlib.Path(source)
  if path.suffix.lower() in io.SUFFIXES and path.is_file():
    return "file"
  if (path / "checkpoints").is_dir():
    return "workdir"
  if (path / "_METADATA").is_file():
    return "params"
  raise FileNotFoundError(f"no weights at {source}: expected a training workdir with checkpoints, a params directory "
                          f"(python -m bigr_jax.convert from-torch) or a file ending in {', '.join(io.SUFFIXES)}")


def _read_params(source, from_torch, use_ema: bool, shapes: Any, abstract: Any = None) -> Any:
  """Params from any weights source; `from_torch(state_dict)` converts a released file's. They are checked
  against the config's parameter `shapes` (a tree of ShapeDtypeStructs) before anything uses them."""
  kind = _kind(source)
  if kind == "params" and abstract is not None:
    return params_io.load_params(source, abstract)
  if kind == "params":
    params = params_io.load_params(source)
  elif kind == "file":
    params = from_torch(io.read_state_dict(source))
  else:
    params = params_io.train_state_params(source, use_ema=use_ema)
  mismatch = _mismatch(params, shapes)
  if mismatch:
    raise ValueError(f"the weights in {source} do not fit the config (model size, bits, scan_layers?): {mismatch}")
  if abstract is None:
    return params
  return jax.device_put(params, jax.tree_util.tree_map(lambda a: a.sharding, abstract))


def _mismatch(params, shapes) -> str:
  """How the params differ from the config's shapes ('' if they fit)."""
  have = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(k): tuple(s.shape) for k, s in jax.tree_util.tree_leaves_with_path(shapes)}
  missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  if missing or extra:
    return f"{len(missing)} arrays missing (e.g. {missing[:2]}), {len(extra)} not in the model (e.g. {extra[:2]})"
  wrong = [k for k in want if have[k] != want[k]]
  if wrong:
    return f"{len(wrong)} shapes differ, e.g. {wrong[0]} is {have[wrong[0]]} where the config has {want[wrong[0]]}"
  return ""


def generator_params(source, model_config: GeneratorConfig, use_ema: bool = True, abstract: Any = None) -> Any:
  """BiGR generator params from any weights source; `use_ema` picks a workdir's EMA. With `abstract`
  (ShapeDtypeStructs with shardings) the shapes are checked and the params land in those shardings;
  without, they are numpy trees."""
  return _read_params(hub.local_path(source, model_config),
                      lambda state_dict: generator_weights.torch_to_flax(state_dict, model_config),
                      use_ema, nn.unbox(bigr.param_shapes(model_config)), abstract)


def tokenizer_params(source, model_config: TokenizerConfig, use_ema: bool = True) -> Any:
  """B-AE params from any weights source (a released .th: its `ae.*` entries)."""
  return _read_params(hub.local_path(source, model_config),
                      lambda state_dict: tokenizer_weights.torch_to_flax(state_dict, model_config),
                      use_ema, nn.unbox(tokenizer_lib.param_shapes(model_config)))


def tokenizer_model_config(tokenizer_section) -> TokenizerConfig:
  """The B-AE architecture a generator config decodes with: `tokenizer.model` (its fields inline) or the
  model of the bae_* config file `tokenizer.config`."""
  if tokenizer_section.get("model", None):
    return TokenizerConfig.from_config(tokenizer_section.model)
  if not tokenizer_section.get("config", ""):
    raise ValueError("decoding samples needs a B-AE: set --config.tokenizer.config=configs/bae_d24.py (and "
                     "--config.tokenizer.checkpoint=<binaryae .th file, params dir or tokenizer workdir>)")
  return TokenizerConfig.from_config(typed_config.load_config_file(tokenizer_section.config).model)


class SamplingModels(NamedTuple):
  generator_config: GeneratorConfig
  generator_params: Any
  tokenizer_config: TokenizerConfig
  tokenizer_params: Any


def sampling_models(config, workdir, use_ema: bool = True) -> SamplingModels:
  """Generator and B-AE of a generator config: the generator from `config.init_from` if set, else from the
  workdir; the B-AE from `config.tokenizer` (see `tokenizer_model_config`; `checkpoint` any source)."""
  gen_config = GeneratorConfig.from_config(config.model)
  tok_config = tokenizer_model_config(config.tokenizer)
  if tok_config.codebook_size != gen_config.binary_size:
    raise ValueError(f"the tokenizer has {tok_config.codebook_size} bits, the generator {gen_config.binary_size}")
  if not config.tokenizer.checkpoint:
    raise ValueError("set --config.tokenizer.checkpoint=<binaryae .th file, params dir or tokenizer workdir>")
  gen_params = generator_params(config.init_from or workdir, gen_config, use_ema=use_ema)
  tok_params = tokenizer_params(config.tokenizer.checkpoint, tok_config)
  return SamplingModels(gen_config, gen_params, tok_config, tok_params)
