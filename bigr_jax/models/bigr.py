"""The BiGR generator: bit projection, class and mask tokens, trunk, transcoder, masked loss, features."""

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigr_jax.models.config import GeneratorConfig
from bigr_jax.models.transcoder import DenoiseMLP, linear_schedule, masked_token_mean, weighted_bce
from bigr_jax.models.transformer import (RMSNorm, Trunk, dense, dense_init, param_with_axes, rope_2d_table,
                                         shard_tokens)


def mask_counts(num_tokens: int) -> np.ndarray:
  """The masked-token count of each step s = 0..N-1 of the original's cosine schedule, max(1, floor(N cos(pi/2
  s/N))), in float64: float32 rounds a few counts down (e.g. s = 512 of N = 768)."""
  steps = np.arange(num_tokens, dtype=np.float64)
  return np.maximum(1, np.floor(num_tokens * np.cos(np.pi / 2.0 * steps / num_tokens))).astype(np.int32)


def cosine_mask_count(key, num_tokens: int):
  """The original's training mask count: s ~ U{0..N-1}, then `mask_counts`; one per batch."""
  return jnp.asarray(mask_counts(num_tokens))[jax.random.randint(key, (), 0, num_tokens)]


def random_mask(key, batch: int, num_tokens: int, count):
  """Exactly `count` masked tokens per row, uniformly placed (by rank, so ties cannot change the count)."""
  noise = jax.random.uniform(key, (batch, num_tokens))
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return ranks < count


class BiGR(nn.Module):
  """Trunk + transcoder. Inputs: bits (B, N, K) in {0, 1}, row-major over the token grid; labels (B,).

  `token_mask` (B, N) is True where a token is masked (its embedding replaced by `mask_tok`).
  """
  config: GeneratorConfig

  def setup(self):
    cfg = self.config
    dtype = cfg.compute_dtype
    self.cls_embedding = nn.Embed(cfg.num_classes + 1, cfg.dim, dtype=dtype, name="cls_embedding",
                                  embedding_init=param_with_axes(dense_init, ("classes", "embed")))
    self.tok_embeddings = dense(cfg.dim, ("bits", "embed"), "tok_embeddings", dtype, use_bias=True)
    self.mask_tok = self.param("mask_tok", param_with_axes(nn.initializers.normal(1.0), (None, "embed")),
                               (1, cfg.dim))
    if cfg.use_adaLN:
      self.adaLN = dense(6 * cfg.dim, ("embed", "mlp"), "adaLN", dtype, True, nn.initializers.zeros)
    self.trunk = Trunk(cfg)
    self.norm = RMSNorm(cfg.norm_eps, dtype)
    self.diffusion_pos_embed_learned = self.param(
        "diffusion_pos_embed_learned", param_with_axes(dense_init, (None, "tokens", "embed")),
        (1, cfg.seq_len, cfg.dim))
    self.denoise_mlp = DenoiseMLP(cfg.binary_size, cfg.denoise_hidden_dim, cfg.num_block_mlp, dtype)
    self.rope_table = jnp.asarray(rope_2d_table(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num))

  def class_embedding(self, labels, label_weights=None):
    """(B, dim) class embedding; with labels (B, M) and label_weights (B, M), their weighted sum."""
    if label_weights is None:
      return self.cls_embedding(labels)
    return jnp.einsum("bmd,bm->bd", self.cls_embedding(labels), label_weights.astype(self.config.compute_dtype))

  def _run_trunk(self, bits, cond, token_mask, deterministic, keep_hidden=False):
    cfg = self.config
    tokens = self.tok_embeddings(bits.astype(cfg.compute_dtype))
    if token_mask is not None:
      tokens = jnp.where(token_mask[..., None], self.mask_tok.astype(tokens.dtype), tokens)
    h = shard_tokens(jnp.concatenate([cond[:, None, :].astype(tokens.dtype), tokens], axis=1))
    if not deterministic and cfg.token_dropout_p > 0:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - cfg.token_dropout_p, h.shape)
      h = jnp.where(keep, h / (1 - cfg.token_dropout_p), 0).astype(h.dtype)
    adaln = None
    if cfg.use_adaLN:
      adaln = self.adaLN(nn.silu(cond))[:, None].reshape(cond.shape[0], 1, 6, cfg.dim)
    return self.trunk(h, adaln, self.rope_table, deterministic=deterministic, keep_hidden=keep_hidden)

  def condition(self, bits, labels, token_mask, label_weights=None, deterministic: bool = True):
    """Per-token transcoder conditions (B, N, dim), float32: final norm, class token dropped, + pos embed."""
    cond = self.class_embedding(labels, label_weights)
    h, _ = self._run_trunk(bits, cond, token_mask, deterministic)
    out = self.norm(h).astype(jnp.float32)[:, self.config.cls_token_num:]
    return shard_tokens(out + self.diffusion_pos_embed_learned)

  def denoise(self, x_t, t_minus_1, cond):
    """Flip logits (R, K) from noisy bits x_t (R, K), timesteps t - 1 (R,) and conditions (R, dim)."""
    return self.denoise_mlp(x_t, t_minus_1, cond)

  # The denoiser in parts, for samplers: a token's condition embedding is shared by every diffusion step
  # and a timestep's embedding by every token, so each is computed once.
  def embed_condition(self, cond):
    """Transcoder conditions (..., dim) -> the denoiser's condition embeddings (..., W)."""
    return self.denoise_mlp.embed_condition(cond)

  def embed_time(self, t_minus_1):
    """Timesteps t - 1 (R,) -> the denoiser's timestep embeddings (R, W)."""
    return self.denoise_mlp.embed_time(t_minus_1)

  def denoise_step(self, x_t, t_emb, c_emb):
    """Flip logits (..., K) from x_t (..., K) and embeddings broadcasting against it (..., W)."""
    return self.denoise_mlp.step(x_t, t_emb, c_emb)

  def features(self, bits, labels, layers: Sequence[int], label_weights=None):
    """{layer: (B, N, dim)} hidden states after block `layer` (0-based), before the final norm, no class token.

    Runs every block; `truncate_params` gives a smaller model that stops at the last layer needed.
    """
    cond = self.class_embedding(labels, label_weights)
    _, hidden = self._run_trunk(bits, cond, None, True, keep_hidden=True)
    return {layer: hidden[layer].astype(jnp.float32)[:, self.config.cls_token_num:] for layer in layers}

  def pooled_features(self, bits, labels, layers: Sequence[int], label_weights=None):
    """{layer: (B, dim)}: `features` averaged over the tokens (the representation the paper probes)."""
    return {layer: h.mean(axis=1) for layer, h in self.features(bits, labels, layers, label_weights).items()}

  def __call__(self, bits, labels, token_mask, x_t, t_minus_1, deterministic: bool = True):
    """Every parameter on one path (used by init): conditions, then denoiser logits."""
    cond = self.condition(bits, labels, token_mask, deterministic=deterministic)
    return self.denoise(x_t, t_minus_1, cond.reshape(-1, cond.shape[-1]))

  def loss_draws(self, bits, deterministic: bool = False) -> "LossDraws":
    """Every random draw of one training loss (rngs: 'mask', 'diffusion', 'label_drop'), as the original makes
    them: one cosine mask count per batch, placed uniformly in each row; each label replaced by the null class
    with `class_dropout_prob` (none when deterministic); each token's timestep uniform on 1..n_sample_steps;
    and the uniforms of its noisy bits."""
    cfg = self.config
    batch, num_tokens, num_bits = bits.shape
    count_key, place_key = jax.random.split(self.make_rng("mask"))
    token_mask = random_mask(place_key, batch, num_tokens, cosine_mask_count(count_key, num_tokens))
    drop_label = jnp.zeros((batch,), bool)
    if not deterministic and cfg.class_dropout_prob > 0:
      drop_label = jax.random.uniform(self.make_rng("label_drop"), (batch,)) < cfg.class_dropout_prob
    t_key, noise_key = jax.random.split(self.make_rng("diffusion"))
    t = jax.random.randint(t_key, (batch * num_tokens,), 1, cfg.n_sample_steps + 1)
    # Rows are (sample, token) pairs, batch-major: they stay split over the batch axes.
    noise = shard_tokens(jax.random.uniform(noise_key, (batch * num_tokens, num_bits)))
    return LossDraws(token_mask=token_mask, drop_label=drop_label, t=t, noise=noise)

  def loss(self, bits, labels, draws: "LossDraws", deterministic: bool = False):
    """Masked-modelling loss of the original, given its random draws (`loss_draws`; rng 'dropout' when
    `token_dropout_p` > 0 and not deterministic).

    The transcoder sees every token at its own timestep t, its noisy bits x_t = (noise < q(x_t = 1 | x_0, t)),
    and the weighted BCE is averaged over the masked tokens only. Returns (loss, metrics).
    """
    cfg = self.config
    num_bits = bits.shape[-1]
    labels = jnp.where(draws.drop_label, cfg.null_class, labels)
    cond = self.condition(bits, labels, draws.token_mask, deterministic=deterministic)

    schedule = linear_schedule(cfg.n_sample_steps)
    z0 = bits.reshape(-1, num_bits).astype(jnp.float32)
    probs = (jnp.asarray(schedule["k_final"])[draws.t][:, None] * z0
             + jnp.asarray(schedule["b_final"])[draws.t][:, None])
    x_t = shard_tokens((draws.noise < probs).astype(jnp.float32))
    logits = shard_tokens(self.denoise(x_t, draws.t - 1, shard_tokens(cond.reshape(-1, cfg.dim))))
    target = jnp.logical_xor(z0 > 0.5, x_t > 0.5).astype(jnp.float32) if cfg.p_flip else z0
    per_bit = weighted_bce(logits, target, cfg.focal, cfg.alpha)
    loss = masked_token_mean(per_bit, draws.token_mask)
    x0_logits = jnp.where(x_t > 0.5, -logits, logits) if cfg.p_flip else logits
    bit_accuracy = jnp.mean(((x0_logits > 0) == (z0 > 0.5)).astype(jnp.float32))
    return loss, {"loss": loss, "bit_accuracy": bit_accuracy,
                  "mask_ratio": jnp.mean(draws.token_mask.astype(jnp.float32))}


class LossDraws(NamedTuple):
  """The random draws of one training loss (`BiGR.loss_draws`), or draws recorded elsewhere (the parity test)."""
  token_mask: jax.Array  # (B, N) bool: the token's embedding is replaced by mask_tok; the loss covers these
  drop_label: jax.Array  # (B,) bool: the label is replaced by the null class
  t: jax.Array  # (B * N,) int32 timesteps in 1..n_sample_steps, rows batch-major (b, n)
  noise: jax.Array  # (B * N, K) float32 uniforms: a noisy bit is 1 where noise < q(x_t = 1 | x_0, t)


def init_inputs(config: GeneratorConfig, batch: int = 1):
  """Dummy inputs that reach every parameter, for `BiGR.init` and `jax.eval_shape`."""
  n, k = config.seq_len, config.binary_size
  return (jnp.zeros((batch, n, k), jnp.float32), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, n), bool),
          jnp.zeros((batch * n, k), jnp.float32), jnp.zeros((batch * n,), jnp.int32))


def init_params(config: GeneratorConfig, key):
  return BiGR(config).init({"params": key}, *init_inputs(config))["params"]


def param_shapes(config: GeneratorConfig):
  """Parameter shapes and logical axes without allocating anything."""
  return jax.eval_shape(lambda: BiGR(config).init({"params": jax.random.key(0)}, *init_inputs(config)))["params"]




def truncate_params(config: GeneratorConfig, params, last_layer: int):
  """A config and params holding blocks 0..last_layer only, for cheaper feature extraction."""
  if not 0 <= last_layer < config.n_layer:
    raise ValueError(f"layer {last_layer} is out of range for a {config.n_layer}-layer model")
  params = dict(params)
  trunk = dict(params["trunk"])
  if config.scan_layers:
    trunk["layers"] = jax.tree_util.tree_map(lambda x: x[: last_layer + 1], trunk["layers"])
  else:
    trunk = {k: v for k, v in trunk.items() if int(k.split("_")[1]) <= last_layer}
  params["trunk"] = trunk
  return config.replace(n_layer=last_layer + 1), params


class ForwardFlops(NamedTuple):
  """Analytic matmul FLOPs of one forward pass of one image (2 per multiply-add)."""
  embed: float  # bits -> dim
  block: float  # one trunk block (projections, attention, feed-forward)
  condition: float  # per token: the transcoder's condition embedding (once per sampler iteration)
  denoise_step: float  # per token: one denoising MLP pass (input, time, blocks, output)


def forward_flops(config: GeneratorConfig) -> ForwardFlops:
  cfg = config
  length = cfg.seq_len + cfg.cls_token_num
  kv_dim = cfg.kv_heads * cfg.head_dim
  per_token_block = 2 * (cfg.dim * (cfg.dim + 2 * kv_dim) + cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden_dim)
  attention = 2 * 2 * length * length * cfg.dim  # scores and weighted values
  w = cfg.denoise_hidden_dim
  denoise_step = 2 * (cfg.binary_size * w + 256 * w + w * w + cfg.num_block_mlp * (2 * w * w + 3 * w * w)
                      + 2 * w * w + w * cfg.binary_size)
  return ForwardFlops(embed=2 * cfg.seq_len * cfg.binary_size * cfg.dim,
                      block=length * per_token_block + attention, condition=2 * cfg.dim * w,
                      denoise_step=denoise_step)


def train_flops_per_image(config: GeneratorConfig) -> float:
  """Analytic FLOPs of one training step per image (forward + backward = 3x forward matmul FLOPs)."""
  f = forward_flops(config)
  return 3.0 * (f.embed + config.n_layer * f.block + config.seq_len * (f.condition + f.denoise_step))
