"""Generator hyper-parameters, named as the original `ModelArgs` names them."""

import ast
import dataclasses
from typing import Optional

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Architecture of a BiGR generator (trunk + transcoder).

  Field names follow the original `ModelArgs` so that a config string recorded from the original code
  can be read with `from_model_args`. The defaults are the released flags (use_adaLN, p_flip, focal 0,
  alpha -1, 256 training / 100 inference diffusion steps).
  """
  dim: int = 1024
  n_layer: int = 24
  n_head: int = 16
  n_kv_head: Optional[int] = None
  multiple_of: int = 256
  ffn_dim_multiplier: Optional[float] = None
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  initializer_range: float = 0.02
  token_dropout_p: float = 0.0
  attn_dropout_p: float = 0.0
  resid_dropout_p: float = 0.1
  ffn_dropout_p: float = 0.1
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  binary_size: int = 24
  cls_token_num: int = 1
  block_size: int = 256
  seq_len: int = 256
  denoise_hidden_dim: int = 1024
  num_block_mlp: int = 3
  p_flip: bool = True
  focal: float = 0.0
  alpha: float = -1.0
  n_sample_steps: int = 256
  infer_steps: int = 100
  sample_temperature: float = 1.0
  use_adaLN: bool = True
  # Our own fields (no counterpart in the original).
  dtype: str = "float32"  # compute dtype; params stay float32
  scan_layers: bool = True  # nn.scan over blocks (stacked params) or an unrolled loop
  remat_policy: str = "none"  # none | full | dots | dots_saveable

  def __post_init__(self):
    if self.dim % self.n_head:
      raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
    if self.n_head % self.kv_heads:
      raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
    grid = int(round(self.block_size ** 0.5))
    if grid * grid != self.block_size:
      raise ValueError(f"block_size={self.block_size} is not a square number of tokens")
    if self.seq_len != self.block_size:
      raise ValueError(f"seq_len={self.seq_len} must equal block_size={self.block_size}")
    if self.cls_token_num != 1:
      raise ValueError("only one class token (cls_token_num=1) is supported, as in every released model")
    if self.head_dim % 4:
      raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 for the 2D rotary embedding")
    if self.remat_policy not in ("none", "full", "dots", "dots_saveable"):
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head or self.n_head

  @property
  def grid_size(self) -> int:
    return int(round(self.block_size ** 0.5))

  @property
  def ffn_hidden_dim(self) -> int:
    hidden = int(2 * 4 * self.dim / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return -(-hidden // self.multiple_of) * self.multiple_of

  @property
  def null_class(self) -> int:
    return self.num_classes

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "GeneratorConfig":
    return dataclasses.replace(self, **changes)


# The original's model sizes (`BIGR_L`, `BIGR_XL`, `BIGR_XXL`, `BIGR_L_512`).
MODEL_SIZES = {
    "L": dict(n_layer=24, n_head=16, dim=1024, num_block_mlp=3, denoise_hidden_dim=1024),
    "XL": dict(n_layer=36, n_head=20, dim=1280, num_block_mlp=6, denoise_hidden_dim=1280),
    "XXL": dict(n_layer=48, n_head=24, dim=1536, num_block_mlp=8, denoise_hidden_dim=1536),
    "L-512": dict(n_layer=24, n_head=16, dim=1024, num_block_mlp=6, denoise_hidden_dim=1280,
                  block_size=1024, seq_len=1024),
}

# Flags of the original scripts that are not `ModelArgs` fields, or that they override.
_FIELD_ALIASES = {"codebook_size": "binary_size", "use_adaln": "use_adaLN", "dropout_p": "resid_dropout_p"}


def from_model_args(model_args, **overrides) -> GeneratorConfig:
  """Builds a config from the original's ModelArgs fields (a dict, or its string form).

  Fields that the original has but that do not change the computation (caption_dim, max_seq_len, ...)
  are ignored; anything else unknown is an error.
  """
  if isinstance(model_args, str):
    model_args = ast.literal_eval(model_args)
  known = {f.name for f in dataclasses.fields(GeneratorConfig)}
  ignored = {"caption_dim", "max_seq_len", "max_batch_size", "quant_size", "mask_ratio_min", "mask_ratio_max",
             "mask_ratio_mu", "mask_ratio_std", "smoothing", "gen_iter"}  # unused by the original's code
  unsupported = {"n_repeat": 1, "aux": 0.0, "drop_path_rate": 0.0}  # every release uses these values
  kwargs = {}
  for key, value in dict(model_args).items():
    key = _FIELD_ALIASES.get(key, key)
    if key in known:
      kwargs[key] = value
    elif key in unsupported:
      if value != unsupported[key]:
        raise ValueError(f"{key}={value} is not supported (only {unsupported[key]}, as in every released model)")
    elif key not in ignored:
      raise ValueError(f"unknown generator field {key!r} in {model_args}")
  if "block_size" in kwargs and "seq_len" not in kwargs:
    kwargs["seq_len"] = kwargs["block_size"]
  kwargs.update(overrides)
  return GeneratorConfig(**kwargs)
