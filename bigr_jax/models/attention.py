"""Bidirectional multi-head attention, three ways (`GeneratorConfig.attention`); all take and give (B, L, H, D).

- `xla`: einsums and a float32 softmax, as the original computes it; runs anywhere.
- `splash`: the Pallas TPU splash-attention kernel. L = 257 is not a multiple of its 128-token blocks, so the
  sequence is padded and the padded keys are masked out. On other backends the same kernel runs in Pallas'
  interpret mode (slow; for tests), chosen at lowering time, so a TPU topology compiled from a CPU host gets the
  real kernel. Under a mesh it runs per shard (`shard_map`): batch split as the "batch" rule says, heads as
  "heads".
- `cudnn`: `jax.nn.dot_product_attention`'s cuDNN flash attention, for NVIDIA GPUs (bfloat16 or float16 only).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask

SPLASH_BLOCK = 128  # the kernel's default block sizes; the sequence is padded to a multiple of this


def xla_attention(q, k, v):
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(scores / np.sqrt(q.shape[-1]), axis=-1).astype(q.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def cudnn_attention(q, k, v, implementation="cudnn"):
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU (cuDNN); this host runs "
                     f"{jax.default_backend()}: use 'xla', or 'splash' on TPU")
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _splash_kernel(length, padded, heads, interpret):
  keys_real = np.zeros((padded, padded), bool)
  keys_real[:, :length] = True  # every query, padded ones too, sees the real keys only: no empty softmax row
  mask = splash_attention_mask.MultiHeadMask([splash_attention_mask.NumpyMask(keys_real)] * heads)
  return jax.vmap(splash_attention_kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret))


def _splash_on_shard(q, k, v):
  batch, length, heads, head_dim = q.shape
  padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
  # The kernel does not scale the scores; it wants (B, H, L, D).
  to_kernel = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, padded - length), (0, 0)))
  args = (to_kernel(q / np.sqrt(head_dim).astype(q.dtype)), to_kernel(k), to_kernel(v))
  out = jax.lax.platform_dependent(*args, tpu=_splash_kernel(length, padded, heads, interpret=False),
                                   default=_splash_kernel(length, padded, heads, interpret=True))
  return jnp.swapaxes(out[:, :, :length], 1, 2)


def splash_attention(q, k, v):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _splash_on_shard(q, k, v)
  spec = nn.logical_to_mesh_axes(("batch", None, "heads", None))
  return jax.shard_map(_splash_on_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


# By `GeneratorConfig.attention`; the keys are `config.ATTENTION_KINDS`.
ATTENTION = {"xla": xla_attention, "splash": splash_attention, "cudnn": cudnn_attention}
