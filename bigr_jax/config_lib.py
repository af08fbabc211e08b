"""Shared pieces of the config files in configs/ (big_vision style `get_config(arg)`)."""

import dataclasses

import ml_collections

from bigr_jax.models.config import MODEL_SIZES, GeneratorConfig


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,flag' config arguments against typed defaults; a bare name sets a bool to True."""
  out = ml_collections.ConfigDict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def generator_model(size: str, bits: int, **overrides) -> ml_collections.ConfigDict:
  """The original's model of that size (L, XL, XXL, L-512) with the released flags, as a ConfigDict."""
  if size not in MODEL_SIZES:
    raise ValueError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
  fields = dataclasses.asdict(GeneratorConfig(binary_size=bits, **MODEL_SIZES[size], **overrides))
  return ml_collections.ConfigDict(fields)


def base_generator_config() -> ml_collections.ConfigDict:
  """Training settings of the original (AdamW 0.9/0.95, lr 1e-4 constant, wd 2e-2, clip 1, EMA 0.9999)."""
  c = ml_collections.ConfigDict()
  c.mode = "train"
  c.seed = 0
  c.batch_size = 1024
  c.total_steps = 0  # 0: derived from num_epochs and the dataset size
  c.num_epochs = 400.0
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=2e-2, grad_clip=1.0,
      schedule="constant", warmup_steps=0, min_lr_ratio=0.0, grad_accum_steps=1))
  c.ema_decay = 0.9999
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
  c.logical_axis_rules = ()  # empty: bigr_jax.parallel.DEFAULT_RULES
  c.data = ml_collections.ConfigDict(dict(
      name="codes", data_dir="", split="train", image_size=256, flip=True, worker_count=4,
      on_bad_image="raise", min_image_size=0))
  c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", config=""))
  c.init_from = ""
  c.log_every = 100
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.tensorboard = True
  c.peak_flops_per_device = 0.0  # e.g. 197e12 (TPU v4 bf16), 918e12 (v5p); 0 = no MFU
  c.sample = ml_collections.ConfigDict(dict(
      labels=(207, 360, 387, 974, 88, 979, 417, 279), num_iter=20, cfg_scale=2.5, cfg_schedule="constant",
      gumbel_temp=0.17, gumbel_schedule="constant", batch_size=8, seed=0, use_ema=True))
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`:runlocal`: the same model family at a size a 2-core CPU trains in seconds."""
  c.model.update(dim=64, n_layer=2, n_head=4, denoise_hidden_dim=64, num_block_mlp=2, block_size=16, seq_len=16,
                 num_classes=10, scan_layers=True, dtype="float32", remat_policy="none")
  c.batch_size = 8
  c.optim.lr = 1e-3
  c.total_steps = 20
  c.log_every = 5
  c.checkpoint_every = 10
  c.data.name = "synthetic"
  c.data.worker_count = 0
  c.sample.update(labels=(0, 1, 2, 3), num_iter=4, batch_size=4)
  return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:args]' the way --config does (for tools outside absl flags)."""
  import importlib.util
  import pathlib
  path, _, arg = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"no config file {path}")
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
