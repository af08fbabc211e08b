"""The binary autoencoder (B-AE) tokenizer: encoder, binary quantizer, decoder (the original's `Generator`).

Weight-compatible with the original `bae.binaryae.BinaryAutoEncoder`: module names mirror its state dict
(`encoder/blocks_i/...`, `quantize/...`, `generator/blocks_i/...`), and `encoder_layout` /
`decoder_layout` give the block lists that both the modules and the weight converter walk. Images are
NHWC floats in [0, 1]; bits are (B, h, w, K) floats in {0, 1}.
"""

import ast
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigr_jax.models.config import GROUPS, TokenizerConfig

# Original hparams that do not change the computation of the autoencoder.
_IGNORED_HPARAMS = {
    "seed", "beta", "quantizer_type", "disc_layers", "ndf", "disc_start_step", "disc_weight_max",
    "perceptual_weight", "code_weight", "base_lr", "lr", "batch_size", "diff_aug", "ema_beta",
}


def from_hparams(hparams, **overrides) -> TokenizerConfig:
  """Builds a config from the original's B-AE hparams (a dict or its string form, e.g. a fixture's).

  Training-only fields are ignored; `use_tanh=True` (not used by any released model) and unknown fields
  are errors.
  """
  if isinstance(hparams, str):
    hparams = ast.literal_eval(hparams)
  hparams = dict(hparams)
  if hparams.pop("use_tanh", False):
    raise ValueError("use_tanh=True is not supported (no released B-AE uses it)")
  if hparams.get("quantizer") is None:
    hparams.pop("quantizer", None)  # the original's `quantizer` hparam is unused (None)
  known = {f.name for f in dataclasses.fields(TokenizerConfig)}
  kwargs = {}
  for key, value in hparams.items():
    if key in known:
      kwargs[key] = value
    elif key not in _IGNORED_HPARAMS:
      raise ValueError(f"unknown B-AE field {key!r} in {hparams}")
  kwargs.update(overrides)
  return TokenizerConfig(**kwargs)


# Block lists. Each entry is (kind, in_channels, out_channels) with kind in
# conv_in / conv_out (3x3 convs), res, attn, down, up, norm. The index is the original's `blocks.i`.


def encoder_layout(config: TokenizerConfig) -> list[tuple[str, int, int]]:
  cfg = config
  nf, res = cfg.nf, cfg.img_size
  blocks = [("conv_in", cfg.n_channels, nf)]
  channels = nf
  for level, mult in enumerate(cfg.ch_mult):
    for _ in range(cfg.res_blocks):
      blocks.append(("res", channels, nf * mult))
      channels = nf * mult
      if res in cfg.attn_resolutions:
        blocks.append(("attn", channels, channels))
    if level != len(cfg.ch_mult) - 1:
      blocks.append(("down", channels, channels))
      res //= 2
  blocks += [("res", channels, channels), ("attn", channels, channels), ("res", channels, channels),
             ("norm", channels, channels), ("conv_out", channels, cfg.emb_dim)]
  return blocks


def decoder_layout(config: TokenizerConfig) -> list[tuple[str, int, int]]:
  cfg = config
  channels = cfg.nf * cfg.ch_mult[-1]
  res = cfg.latent_size
  blocks = [("norm", cfg.emb_dim, cfg.emb_dim)] if cfg.norm_first else []
  blocks += [("conv_in", cfg.emb_dim, channels),
             ("res", channels, channels), ("attn", channels, channels), ("res", channels, channels)]
  for level in reversed(range(len(cfg.ch_mult))):
    for _ in range(cfg.decoder_res_blocks):
      blocks.append(("res", channels, cfg.nf * cfg.ch_mult[level]))
      channels = cfg.nf * cfg.ch_mult[level]
      if res in cfg.attn_resolutions:
        blocks.append(("attn", channels, channels))
    if level != 0:
      blocks.append(("up", channels, channels))
      res *= 2
  blocks += [("norm", channels, channels), ("conv_out", channels, cfg.n_channels)]
  return blocks


# torch Conv2d's default init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)): variance scale 1/3.
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(features, kernel: int, name: str, dtype, stride: int = 1, padding="SAME", use_bias: bool = True):
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, use_bias=use_bias, dtype=dtype,
                 name=name, kernel_init=nn.with_logical_partitioning(conv_init, (None, None, "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def group_norm(name: str):
  """GroupNorm(32, eps 1e-6) computed in float32 with the two-pass variance (closer to torch)."""
  return nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a skip (1x1 `conv_out` only when in != out)."""
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(group_norm("norm1")(x).astype(self.dtype)))
    h = conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(group_norm("norm2")(h).astype(self.dtype)))
    skip_proj = conv(self.out_channels, 1, "conv_out", self.dtype)
    if x.shape[-1] != self.out_channels:
      x = skip_proj(x)
    elif self.is_initializing():
      skip_proj(x)  # unused, but the original's state dict holds it, so create it
    return x + h


class AttnBlock(nn.Module):
  """Single-head softmax self-attention over all h*w positions with 1x1 q/k/v/proj convs; residual."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = group_norm("norm")(x).astype(self.dtype)
    q, k, v = (conv(channels, 1, name, self.dtype)(h).reshape(batch, height * width, channels)
               for name in ("q", "k", "v"))
    scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * channels ** -0.5
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(batch, height, width, channels)
    return x + conv(channels, 1, "proj_out", self.dtype)(out)


class Downsample(nn.Module):
  """Zero-pad right and bottom by one, then a VALID stride-2 conv3x3 (SAME would pad differently)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest x2, then conv3x3."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], 3, "conv", self.dtype)(x)


def _run_blocks(layout, x, dtype, remat: bool, start: int = 0):
  """Applies a block list; modules are named `blocks_i` after the original's `blocks.i` (i from `start`).
  `remat`: residual and attention blocks recompute their activations in the backward pass."""
  res_block, attn_block = (nn.remat(ResBlock), nn.remat(AttnBlock)) if remat else (ResBlock, AttnBlock)
  for index, (kind, _, out_channels) in enumerate(layout, start):
    name = f"blocks_{index}"
    if kind in ("conv_in", "conv_out"):
      x = conv(out_channels, 3, name, dtype)(x)
    elif kind == "norm":
      x = group_norm(name)(x).astype(dtype)
    elif kind == "res":
      x = res_block(out_channels, dtype, name=name)(x)
    elif kind == "attn":
      x = attn_block(dtype, name=name)(x)
    elif kind == "down":
      x = Downsample(dtype, name=name)(x)
    elif kind == "up":
      x = Upsample(dtype, name=name)(x)
    else:
      raise ValueError(f"unknown block kind {kind!r}")
  return x


class Encoder(nn.Module):
  """Images (B, H, W, 3) -> features (B, H/f, W/f, emb_dim). No activation between the last GN and conv."""
  config: TokenizerConfig

  @nn.compact
  def __call__(self, images):
    return _run_blocks(encoder_layout(self.config), images.astype(self.config.compute_dtype),
                       self.config.compute_dtype, self.config.remat)


class Decoder(nn.Module):
  """Features (B, h, w, emb_dim) -> images (B, h*f, w*f, 3), unbounded (no output activation).

  The original calls it `Generator`. Its `logsigma` head (conv3x3, ReLU, conv1x1) is never used, but it is
  in the released state dict, so its params are created at init to keep the export loadable strictly.
  """
  config: TokenizerConfig

  @nn.compact
  def __call__(self, features):
    cfg = self.config
    dtype = cfg.compute_dtype
    layout = decoder_layout(cfg)
    h = _run_blocks(layout[:-2], features.astype(dtype), dtype, cfg.remat)
    if self.is_initializing():
      channels = h.shape[-1]
      conv(cfg.n_channels, 1, "logsigma_2", dtype)(nn.relu(conv(channels, 3, "logsigma_0", dtype)(h)))
    return _run_blocks(layout[-2:], h, dtype, cfg.remat, start=len(layout) - 2)


def straight_through_bits(bit_probs, key: Optional[jax.Array], deterministic: bool):
  """Bits in {0, 1}: Bernoulli(p) draws, or p > 0.5 when deterministic; gradients flow to p unchanged.

  Written as b + (p - stop_gradient(p)) so the forward value is exactly b.
  """
  if deterministic:
    bits = (bit_probs > 0.5).astype(bit_probs.dtype)
  else:
    bits = jax.random.bernoulli(key, bit_probs).astype(bit_probs.dtype)
  return bits + (bit_probs - jax.lax.stop_gradient(bit_probs))


def binary_entropy(p, eps: float = 1e-6):
  """Entropy (nats) of Bernoulli(p); clipped so saturated probabilities stay finite."""
  p = jnp.clip(p, eps, 1 - eps)
  return -(p * jnp.log(p) + (1 - p) * jnp.log(1 - p))


def binary_entropy_from_logits(logits):
  """Entropy of Bernoulli(sigmoid(l)) without clipping: p softplus(-l) + (1 - p) softplus(l)."""
  p = jax.nn.sigmoid(logits)
  return p * jax.nn.softplus(-logits) + (1 - p) * jax.nn.softplus(logits)


class BinaryQuantizer(nn.Module):
  """1x1 conv -> sigmoid bit probabilities; bits -> features through the (K, emb_dim) matrix `embed`."""
  config: TokenizerConfig

  def setup(self):
    cfg = self.config
    # Bit probabilities in float32: a bf16 sigmoid would shift the p > 0.5 threshold.
    self.proj = conv(cfg.codebook_size, 1, "proj", jnp.float32)
    self.embed = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("bits", "conv_out")),
                            (cfg.codebook_size, cfg.emb_dim))

  def bit_logits(self, features):
    return self.proj(features.astype(jnp.float32))

  def embed_bits(self, bits):
    """z_q[d] = sum_k bits_k E[k, d]: (B, h, w, K) -> (B, h, w, emb_dim)."""
    dtype = self.config.compute_dtype
    return jnp.einsum("bhwk,kd->bhwd", bits.astype(dtype), self.embed.astype(dtype))

  def __call__(self, features, deterministic: bool):
    """Returns (bits with straight-through gradient, bit probabilities, aux losses)."""
    logits = self.bit_logits(features)
    bit_probs = jax.nn.sigmoid(logits)
    if self.config.quantizer == "lfq":
      bits = straight_through_bits(bit_probs, None, deterministic=True)
    else:
      key = None if deterministic else self.make_rng("sample")
      bits = straight_through_bits(bit_probs, key, deterministic)
    # The original's codebook loss applies a sigmoid to p, which is already a probability (a BLD quirk); its
    # weight is 0 in every released recipe, kept for fidelity.
    code_loss = jnp.mean(jax.nn.sigmoid(bit_probs) * (1 - jax.nn.sigmoid(bit_probs)))
    # LFQ-style entropy penalty, factorised over bits: confident bits per token (low per-position entropy),
    # but every bit used across the batch (high entropy of its mean).
    sample_entropy = jnp.mean(binary_entropy_from_logits(logits))
    batch_entropy = jnp.mean(binary_entropy(jnp.mean(bit_probs, axis=(0, 1, 2))))
    aux = {"code_loss": code_loss, "entropy_loss": sample_entropy - batch_entropy,
           "sample_entropy": sample_entropy, "batch_entropy": batch_entropy}
    return bits, bit_probs, aux


class BinaryAutoEncoder(nn.Module):
  """The B-AE. Sampling bits needs the rng 'sample' unless deterministic."""
  config: TokenizerConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.quantize = BinaryQuantizer(self.config)
    self.generator = Decoder(self.config)

  def _check_images(self, images):
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != cfg.n_channels:
      raise ValueError(f"images must be NHWC with {cfg.n_channels} channels, got shape {images.shape}")
    if images.shape[1] % cfg.downsample_factor or images.shape[2] % cfg.downsample_factor:
      raise ValueError(f"image size {images.shape[1:3]} is not divisible by {cfg.downsample_factor}")

  def _quantize(self, images, deterministic: Optional[bool]):
    self._check_images(images)
    deterministic = self.config.deterministic if deterministic is None else deterministic
    return self.quantize(self.encoder(images), deterministic)

  def encode(self, images, deterministic: Optional[bool] = None):
    """Images (B, H, W, 3) in [0, 1] -> (bit_probs, bits), both (B, H/f, W/f, K) float32."""
    bits, bit_probs, _ = self._quantize(images, deterministic)
    return bit_probs, bits

  def decode(self, bits):
    """Bits (B, h, w, K) -> images (B, h*f, w*f, 3) float32, unbounded (clip to [0, 1] for display)."""
    if bits.shape[-1] != self.config.codebook_size:
      raise ValueError(f"bits must be (B, h, w, {self.config.codebook_size}), got shape {bits.shape}")
    images = self.generator(self.quantize.embed_bits(bits)).astype(jnp.float32)
    if self.config.grayscale:  # one grey value per pixel, in every channel
      images = jnp.broadcast_to(images.mean(axis=-1, keepdims=True), images.shape)
    return images

  def __call__(self, images, deterministic: Optional[bool] = None):
    """Reconstruction (B, H, W, 3) float32 and aux: bits, bit_probs, code_loss, entropy terms."""
    bits, bit_probs, aux = self._quantize(images, deterministic)
    reconstruction = self.decode(bits)
    return reconstruction, dict(aux, bits=bits, bit_probs=bit_probs)


def init_inputs(config: TokenizerConfig, batch: int = 1):
  return (jnp.zeros((batch, config.img_size, config.img_size, config.n_channels), jnp.float32),)


def init_params(config: TokenizerConfig, key):
  """Random params; init runs the deterministic path, so it needs no 'sample' rng."""
  return BinaryAutoEncoder(config).init({"params": key}, *init_inputs(config), deterministic=True)["params"]


def param_shapes(config: TokenizerConfig):
  """Parameter shapes and logical axes without allocating anything."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


