"""The binary transcoder: a per-token Bernoulli diffusion head (denoiser MLP, schedule, wBCE, reverse step)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigr_jax.models.transformer import dense

FREQUENCY_EMBEDDING_SIZE = 256


def linear_schedule(num_steps: int) -> dict:
  """Buffers of the linear Bernoulli schedule, computed as the original does (float64, then float32).

  beta[t] is the one-step keep probability (t -> t+1 keeps a bit with beta, else a fair coin); k_final[t]
  and b_final[t] give q(z_t = 1 | z_0) = k_final[t] * z_0 + b_final[t]. Index 0 is padding (t = 0).
  """
  beta = 1 - 1 / (num_steps - np.arange(1, num_steps + 1) + 1)
  k_final, b_final = [1.0], [0.0]
  for i in range(num_steps):
    k_final.append(k_final[-1] * beta[i])
    b_final.append(beta[i] * b_final[-1] + 0.5 * (1 - beta[i]))
  beta = np.hstack([1.0, beta]).astype(np.float32)
  return {
      "k_final": np.hstack([1.0, k_final[1:]]).astype(np.float32),
      "b_final": np.hstack([0.0, b_final[1:]]).astype(np.float32),
      "beta": beta,
      "cumbeta": np.cumprod(beta.astype(np.float64)).astype(np.float32),  # torch accumulates wider
  }


def inference_timesteps(num_steps: int, infer_steps: int) -> np.ndarray:
  """The descending timesteps of the reverse process (e.g. 256, 253, ..., 3, 1 for 100 of 256)."""
  steps = np.arange(1, num_steps + 1)
  if infer_steps != num_steps:
    steps = steps[np.array(np.linspace(0.0, 1.0, infer_steps) * (num_steps - 1), int)]
  return steps[::-1].copy()


def timestep_embedding(t, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _layer_norm(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class DenoiseMLP(nn.Module):
  """Predicts per-bit logits (of the flip indicator with p_flip) from noisy bits x_t, t - 1 and a condition.

  Besides `__call__`, its parts are callable on their own so that a sampler can embed each token's condition
  once per sampling iteration and each timestep once for all tokens: `embed_condition`, `embed_time`, `step`.
  """
  bits: int
  hidden_dim: int
  num_blocks: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    w, dtype, zeros = self.hidden_dim, self.dtype, nn.initializers.zeros
    self.x_embedder = dense(w, ("bits", "mlp"), "x_embedder", dtype, use_bias=True)
    self.c_embedder = dense(w, ("embed", "mlp"), "c_embedder", dtype, use_bias=True)
    self.t_embedder_0 = dense(w, (None, "mlp"), "t_embedder_0", dtype, use_bias=True)
    self.t_embedder_2 = dense(w, ("mlp", "mlp2"), "t_embedder_2", dtype, use_bias=True)
    self.modulations = [dense(3 * w, ("mlp", "mlp2"), f"blocks_{j}_adaLN_modulation", dtype, True, zeros)
                        for j in range(self.num_blocks)]
    self.mlps_in = [dense(w, ("mlp", "mlp2"), f"blocks_{j}_mlp_0", dtype, use_bias=True)
                    for j in range(self.num_blocks)]
    self.mlps_out = [dense(w, ("mlp2", "mlp"), f"blocks_{j}_mlp_2", dtype, use_bias=True)
                     for j in range(self.num_blocks)]
    self.final_modulation = dense(2 * w, ("mlp", "mlp2"), "final_adaLN_modulation", dtype, True, zeros)
    self.final_linear = dense(self.bits, ("mlp", "bits"), "final_linear", dtype, True, zeros)

  def embed_condition(self, cond):
    """(..., dim) -> (..., W): the condition's share of the conditioning vector."""
    return self.c_embedder(cond)

  def embed_time(self, t_minus_1):
    """(R,) timesteps t - 1 -> (R, W): the timestep's share of the conditioning vector."""
    t = self.t_embedder_0(timestep_embedding(t_minus_1).astype(self.dtype))
    return self.t_embedder_2(nn.silu(t))

  def step(self, x_t, t_emb, c_emb):
    """Logits (..., K) from x_t (..., K) and embeddings that broadcast against it (..., W)."""
    x = self.x_embedder(x_t.astype(self.dtype) * 2.0 - 1.0)
    s = nn.silu(t_emb + c_emb)
    for modulation, mlp_in, mlp_out in zip(self.modulations, self.mlps_in, self.mlps_out):
      shift, scale, gate = jnp.split(modulation(s), 3, axis=-1)
      h = mlp_in(_layer_norm(x) * (1 + scale) + shift)
      x = x + gate * mlp_out(nn.silu(h))
    shift, scale = jnp.split(self.final_modulation(s), 2, axis=-1)
    logits = self.final_linear(_layer_norm(x) * (1 + scale) + shift)
    return logits.astype(jnp.float32)

  def __call__(self, x_t, t_minus_1, cond):
    return self.step(x_t, self.embed_time(t_minus_1), self.embed_condition(cond))


def weighted_bce(logits, target, focal: float = 0.0, alpha: float = -1.0):
  """Per-bit BCE-with-logits times the original's focal factor and its per-token class balance.

  With alpha = -1 the weight is (1 - r) * y + r * (1 - y) + 1/K, r = fraction of set target bits in the
  token (the paper's wBCE); alpha > 0 is a fixed balance; any other alpha, no weighting.
  """
  ce = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  if focal != 0.0:
    p = jax.nn.sigmoid(logits)
    p_wrong = jnp.clip(1 - (p * target + (1 - p) * (1 - target)), 1e-6, 1 - 1e-6)
    ce = ce * p_wrong ** focal
  bits = target.shape[-1]
  if alpha == -1:
    rate = target.sum(-1, keepdims=True) / bits
    ce = ((1 - rate) * target + rate * (1 - target) + 1.0 / bits) * ce
  elif alpha > 0:
    ce = (alpha * target + (1 - alpha) * (1 - target)) * ce
  return ce


def reverse_coefficients(num_steps: int, infer_steps: int) -> dict:
  """Per reverse step (descending t): t - 1 for the denoiser, and k, b of t_next and the t -> t_next keep.

  `keep` is the product of the one-step keep probabilities t_next+1..t: the one-step maps are affine
  (x -> beta x + (1 - beta) / 2), so their composition is one affine map. The last step (t = 1) has no
  t_next; its entries (k = 1, b = 0, keep = 1) are never used.
  """
  schedule = linear_schedule(num_steps)
  steps = inference_timesteps(num_steps, infer_steps)
  nxt = np.append(steps[1:], 0)
  beta = schedule["beta"].astype(np.float64)
  keep = np.array([np.prod(beta[n + 1:t + 1]) for t, n in zip(steps, nxt)])
  last = nxt == 0
  return {
      "t_minus_1": (steps - 1).astype(np.int32),
      "k_next": np.where(last, 1.0, schedule["k_final"][nxt]).astype(np.float32),
      "b_next": np.where(last, 0.0, schedule["b_final"][nxt]).astype(np.float32),
      "keep": np.where(last, 1.0, keep).astype(np.float32),
  }


def bernoulli_posterior(x_t, x0_probs, k_next, b_next, keep):
  """P(z_{t_next} = 1 | z_t, predicted P(z_0 = 1)), as the original samples it.

  prior = q(z_{t_next} | z_0) averaged over the prediction; likelihood = the one-step transitions
  t_next+1..t applied to the indicator of z_t (one affine map with slope `keep`). Both over {1, 0}.
  """
  one = (k_next * x0_probs + b_next) * (x_t * keep + 0.5 * (1 - keep))
  zero = (k_next * (1 - x0_probs) + b_next) * ((1 - x_t) * keep + 0.5 * (1 - keep))
  return one / (one + zero)


def masked_token_mean(per_bit, token_mask):
  """Mean of per-bit losses (R, K) over the rows whose token is masked (R,), as the original reduces it."""
  weights = token_mask.reshape(-1, 1).astype(per_bit.dtype)
  return jnp.sum(per_bit * weights) / (jnp.sum(weights) * per_bit.shape[-1])


def reverse_probs(x_t, x0_probs, t, t_next, schedule):
  """`bernoulli_posterior` for timesteps t > t_next >= 1 (possibly traced) and `linear_schedule` buffers."""
  steps = jnp.arange(schedule["beta"].shape[0])
  keep = jnp.prod(jnp.where((steps > t_next) & (steps <= t), schedule["beta"], 1.0))
  k_next = jnp.asarray(schedule["k_final"])[t_next]
  b_next = jnp.asarray(schedule["b_final"])[t_next]
  return bernoulli_posterior(x_t, x0_probs, k_next, b_next, keep)
