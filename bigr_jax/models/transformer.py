"""Bidirectional LLaMA trunk of BiGR: RMSNorm, SwiGLU, 2D rotary attention, shared adaLN."""

import einops
import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from bigr_jax.models import attention as attention_lib
from bigr_jax.models.config import GeneratorConfig

dense_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(init, axes):
  return nn.with_logical_partitioning(init, axes)


def rope_2d_table(grid_size: int, head_dim: int, base: float, cls_token_num: int = 1) -> np.ndarray:
  """(cos, sin) per position and rotation pair: shape (cls + grid^2, head_dim // 2, 2).

  Pairs [0, head_dim/4) rotate with the token's row, the rest with its column. The class
  positions get an all-zero table (cos = sin = 0), which zeroes their rotated q and k, exactly as the
  original does; the released weights were trained with that.
  """
  half = head_dim // 2
  freqs = 1.0 / (base ** (np.arange(0, half, 2, dtype=np.float32)[: half // 2] / half))
  angles = np.outer(np.arange(grid_size, dtype=np.float32), freqs).astype(np.float32)
  rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, half // 2))
  cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, half // 2))
  grid = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, half)
  table = np.stack([np.cos(grid), np.sin(grid)], axis=-1).astype(np.float32)
  return np.concatenate([np.zeros((cls_token_num, half, 2), np.float32), table])


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs (2i, 2i+1) of x: (B, L, H, D) by table (L, D/2, 2), in float32."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = table[None, :, None, :, 0]
  sin = table[None, :, None, :, 1]
  out = jnp.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                   pairs[..., 1] * cos + pairs[..., 0] * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def shard_tokens(x):
  """Keeps activations (B, ..., dim) split over the batch axes; without this, FSDP-sharded weights can make
  XLA gather whole-batch activations on every device. A no-op outside `nn.logical_axis_rules`."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", param_with_axes(nn.initializers.ones, ("embed",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * weight.astype(self.dtype)


DENSE_OUTPUT = "dense_output"


@jax.custom_vjp
def dense_matmul(x, kernel):
  """x (..., in) @ kernel (in, out), as nn.Dense computes it; only the backward pass differs from autodiff.

  Autodiff forms the kernel gradient as (dy^T x)^T, and XLA:CPU then copies each layer's output gradient
  into a transposed layout, a slow strided copy. Here it is one 2-D dot, x^T dy, over the flattened tokens:
  the same sums, without the copy (about 10% off a CPU train step; `benchmarks/train_step.py`).
  """
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_matmul_fwd(x, kernel):
  return dense_matmul(x, kernel), (x, kernel)


def _dense_matmul_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  dkernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))
  return dx, dkernel


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def _dense_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's `dot_general` hook; Dense always contracts the last input axis with the kernel's first."""
  assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
  assert precision is None and preferred_element_type is None
  # Named, so that the "dots" remat policies still save it: they see the custom VJP, not its dot_general.
  return checkpoint_name(dense_matmul(x, kernel), DENSE_OUTPUT)


def dense(features, axes, name, dtype, use_bias=False, kernel_init=dense_init):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name, dot_general=_dense_dot_general,
                  kernel_init=param_with_axes(kernel_init, axes),
                  bias_init=param_with_axes(nn.initializers.zeros, axes[-1:]))


class Attention(nn.Module):
  config: GeneratorConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, rope_table):
    cfg = self.config
    dtype = cfg.compute_dtype
    kv_dim = cfg.kv_heads * cfg.head_dim
    qkv = dense(cfg.dim + 2 * kv_dim, ("embed", "heads"), "wqkv", dtype)(x)
    q, k, v = jnp.split(qkv, [cfg.dim, cfg.dim + kv_dim], axis=-1)
    q = einops.rearrange(q, "b l (h d) -> b l h d", d=cfg.head_dim)
    k = einops.rearrange(k, "b l (h d) -> b l h d", d=cfg.head_dim)
    v = einops.rearrange(v, "b l (h d) -> b l h d", d=cfg.head_dim)
    q, k = apply_rope(q, rope_table), apply_rope(k, rope_table)
    if cfg.kv_heads != cfg.n_head:
      k = jnp.repeat(k, cfg.n_head // cfg.kv_heads, axis=2)
      v = jnp.repeat(v, cfg.n_head // cfg.kv_heads, axis=2)
    # Bidirectional: every token attends to every token (the original passes an all-True mask).
    out = attention_lib.ATTENTION[cfg.attention](q, k, v)
    out = einops.rearrange(out, "b l h d -> b l (h d)")
    out = dense(cfg.dim, ("heads", "embed"), "wo", dtype)(out)
    return nn.Dropout(cfg.resid_dropout_p, deterministic=self.deterministic)(out)


class FeedForward(nn.Module):
  config: GeneratorConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = cfg.compute_dtype
    gate = dense(cfg.ffn_hidden_dim, ("embed", "mlp"), "w1", dtype)(x)
    up = dense(cfg.ffn_hidden_dim, ("embed", "mlp"), "w3", dtype)(x)
    out = dense(cfg.dim, ("mlp", "embed"), "w2", dtype)(nn.silu(gate) * up)
    return nn.Dropout(cfg.ffn_dropout_p, deterministic=self.deterministic)(out)


class Block(nn.Module):
  """Pre-norm block; with adaLN, shift/scale/gate come from the shared adaLN output plus `ada_gss`."""
  config: GeneratorConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, adaln, rope_table):
    cfg = self.config
    dtype = cfg.compute_dtype
    attn_norm = RMSNorm(cfg.norm_eps, dtype, name="attention_norm")
    ffn_norm = RMSNorm(cfg.norm_eps, dtype, name="ffn_norm")
    attention = Attention(cfg, self.deterministic, name="attention")
    feed_forward = FeedForward(cfg, self.deterministic, name="feed_forward")
    if cfg.use_adaLN:
      ada_gss = self.param(
          "ada_gss",
          param_with_axes(lambda key, shape: jax.random.normal(key, shape) / np.sqrt(cfg.dim),
                          (None, None, None, "embed")),
          (1, 1, 6, cfg.dim))
      mod = (adaln + ada_gss).astype(dtype)  # (B, 1, 6, dim)
      shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (mod[:, :, i] for i in range(6))
      h = x + gate_a * attention(attn_norm(x) * (1 + scale_a) + shift_a, rope_table)
      return shard_tokens(h + gate_f * feed_forward(ffn_norm(h) * (1 + scale_f) + shift_f))
    h = x + attention(attn_norm(x), rope_table)
    return shard_tokens(h + feed_forward(ffn_norm(h)))


_save_dense_outputs = jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots,
                                                             _save_dense_outputs),
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _save_dense_outputs),
}


class _ScanBody(nn.Module):
  """Adapts Block to nn.scan's (carry, xs) -> (carry, ys) form; ys are the hidden states if asked."""
  config: GeneratorConfig
  deterministic: bool = True
  keep_hidden: bool = False

  @nn.compact
  def __call__(self, x, adaln, rope_table):
    block_cls = Block
    if self.config.remat_policy != "none":
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.config.remat_policy], prevent_cse=False)
    x = block_cls(self.config, self.deterministic, name="block")(x, adaln, rope_table)
    return x, (x if self.keep_hidden else None)


class Trunk(nn.Module):
  """The stack of blocks. Returns the last hidden state and, if `keep_hidden`, every block's output."""
  config: GeneratorConfig

  @nn.compact
  def __call__(self, x, adaln, rope_table, deterministic: bool = True, keep_hidden: bool = False):
    cfg = self.config
    if cfg.scan_layers:
      scanned = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layer,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, hidden = scanned(cfg, deterministic, keep_hidden, name="layers")(x, adaln, rope_table)
      return x, hidden
    block_cls = Block
    if cfg.remat_policy != "none":
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy])
    hidden = []
    for i in range(cfg.n_layer):
      x = block_cls(cfg, deterministic, name=f"layers_{i}")(x, adaln, rope_table)
      hidden.append(x)
    return x, (jnp.stack(hidden) if keep_hidden else None)
