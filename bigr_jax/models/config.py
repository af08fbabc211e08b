"""Architectures of the generator (named as the original `ModelArgs` names them) and of the B-AE tokenizer."""

import ast
import dataclasses
from typing import Optional

import jax.numpy as jnp

from bigr_jax import typed_config

ATTENTION_KINDS = ("xla", "splash", "cudnn")  # bigr_jax.models.attention


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Architecture of a BiGR generator (trunk + transcoder).

  Field names follow the original `ModelArgs` so that a config string recorded from the original code
  can be read with `from_model_args`. The defaults are the released flags (use_adaLN, p_flip, focal 0,
  alpha -1, 256 diffusion steps in training). The sampler's settings (the original's `infer_steps` and
  `sample_temperature`) live in `config_sections.SamplerConfig`.
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
  use_adaLN: bool = True
  # Our own fields (no counterpart in the original).
  dtype: str = "float32"  # compute dtype; params stay float32
  scan_layers: bool = True  # nn.scan over blocks (stacked params) or an unrolled loop
  remat_policy: str = "none"  # none | full | dots | dots_saveable
  attention: str = "xla"  # xla | splash (Pallas, TPU) | cudnn (GPU, bf16/fp16): bigr_jax.models.attention

  def __post_init__(self):
    for name in ("dim", "n_layer", "n_head", "binary_size", "num_classes", "block_size", "denoise_hidden_dim",
                 "num_block_mlp", "n_sample_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"generator {name}={getattr(self, name)} must be a positive integer")
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
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"unknown attention {self.attention!r}: xla, splash or cudnn")
    if self.attention == "cudnn" and self.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"attention 'cudnn' needs dtype bfloat16 or float16 (cuDNN's flash attention), "
                       f"not {self.dtype!r}")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @classmethod
  def from_config(cls, section) -> "GeneratorConfig":
    """From a config's `model` section; unknown fields are an error."""
    return typed_config.from_section(cls, section, "generator config.model")

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



QUANTIZERS = ("binary", "lfq")
GROUPS = 32  # GroupNorm groups everywhere, as in the original


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Architecture of a B-AE. Defaults are the released d24 model at 256 px.

  `quantizer="binary"` is the original: sigmoid bit probabilities, Bernoulli-sampled (or thresholded when
  `deterministic`) bits with a straight-through gradient. `quantizer="lfq"` is our own addition, not in the
  original: bits are always the sign of the logit (p > 0.5), with the same straight-through gradient, and
  the aux dict's `entropy_loss` (per-bit lookup-free-quantization entropy penalty) is meant to be added to
  the training loss.
  """
  codebook_size: int = 24  # K, bits per token
  img_size: int = 256  # nominal size; attention placement depends on it, not on the input's size
  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  emb_dim: int = 256
  n_channels: int = 3
  gen_mul: float = 1.0  # decoder res blocks per level = int(res_blocks * gen_mul), as in the original
  norm_first: bool = True
  deterministic: bool = False
  quantizer: str = "binary"
  dtype: str = "float32"  # compute dtype; params, norms and bit probabilities stay float32
  # Training memory: keep only each residual and attention block's input and recompute the rest in the backward
  # pass (our addition; results are unchanged).
  remat: bool = False
  # Our addition, for grayscale datasets (the demo's digits, MNIST): the decoder's channels are averaged, so
  # reconstructions and samples are grey, as the data is. The weights are the same either way.
  grayscale: bool = False

  def __post_init__(self):
    # Lists from a config file or a recorded hparams string become tuples, so the config stays hashable.
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
    bad = sorted({self.nf * m for m in self.ch_mult + (1,)} | ({self.emb_dim} if self.norm_first else set()))
    bad = [c for c in bad if c % GROUPS]
    if bad:
      raise ValueError(f"GroupNorm({GROUPS}) needs channel counts divisible by {GROUPS}; got {bad} "
                       f"(from nf={self.nf}, ch_mult={self.ch_mult}, emb_dim={self.emb_dim})")
    if self.img_size % self.downsample_factor:
      raise ValueError(f"img_size={self.img_size} is not divisible by the downsampling factor "
                       f"{self.downsample_factor} of ch_mult={self.ch_mult}")
    if self.decoder_res_blocks < 1 or self.res_blocks < 1:
      raise ValueError(f"res_blocks={self.res_blocks} with gen_mul={self.gen_mul} leaves no residual block")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @classmethod
  def from_config(cls, section) -> "TokenizerConfig":
    """From a tokenizer config's `model` section; unknown fields are an error."""
    return typed_config.from_section(cls, section, "tokenizer config.model")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_size(self) -> int:
    return self.img_size // self.downsample_factor

  @property
  def decoder_res_blocks(self) -> int:
    return int(self.res_blocks * self.gen_mul)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "TokenizerConfig":
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
             "mask_ratio_mu", "mask_ratio_std", "smoothing", "gen_iter",  # unused by the original's code
             "infer_steps", "sample_temperature"}  # sampler settings: SamplerConfig
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
