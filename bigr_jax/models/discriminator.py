"""PatchGAN discriminator for tokenizer training (the original's `bae.binaryae.Discriminator`).

conv4x4/2 -> LeakyReLU(0.2), then (n_layers - 1) x [conv4x4/2 (no bias) -> BatchNorm -> LeakyReLU], then
conv4x4/1 (no bias) -> BatchNorm -> LeakyReLU, then conv4x4/1 to one logit per patch. Every conv pads 1.
Modules are named `main_i` after the original's `main.i` (i counts the activations too).
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from bigr_jax.models.tokenizer import conv_init


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  index: int  # position in the original's nn.Sequential
  in_channels: int
  out_channels: int
  stride: int
  use_bias: bool
  batch_norm: bool  # followed by BatchNorm at index + 1


def discriminator_layout(in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> list[ConvSpec]:
  """The convs of the original's `main` Sequential, with their indices."""
  specs = [ConvSpec(0, in_channels, ndf, 2, True, False)]
  index, mult = 2, 1
  for n in range(1, n_layers + 1):
    prev_mult, mult = mult, min(2 ** n, 8)
    stride = 2 if n < n_layers else 1  # the last normalized conv keeps the resolution
    specs.append(ConvSpec(index, ndf * prev_mult, ndf * mult, stride, False, True))
    index += 3
  specs.append(ConvSpec(index, ndf * mult, 1, 1, True, False))
  return specs


class Discriminator(nn.Module):
  """Images (B, H, W, C) -> patch logits (B, H', W', 1), float32.

  BatchNorm keeps running statistics in the 'batch_stats' collection; with `train=True` it normalizes with
  batch statistics and updates them (flax momentum 0.9 = torch momentum 0.1; flax tracks the biased batch
  variance where torch tracks the unbiased one, a relative difference of 1/(B*H'*W')).
  """
  in_channels: int = 3
  ndf: int = 64
  n_layers: int = 3
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images, train: bool = False):
    dtype = jnp.dtype(self.dtype)
    x = images.astype(dtype)
    layout = discriminator_layout(self.in_channels, self.ndf, self.n_layers)
    for spec in layout:
      x = nn.Conv(spec.out_channels, (4, 4), strides=spec.stride, padding=((1, 1), (1, 1)),
                  use_bias=spec.use_bias, dtype=dtype, name=f"main_{spec.index}",
                  kernel_init=nn.with_logical_partitioning(conv_init, (None, None, "conv_in", "conv_out")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))(x)
      if spec.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                         use_fast_variance=False, name=f"main_{spec.index + 1}",
                         scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))(x)
      if spec is not layout[-1]:
        x = nn.leaky_relu(x, 0.2).astype(dtype)
    return x.astype(jnp.float32)


def hinge_d_loss(logits_real, logits_fake):
  """The original's discriminator loss: 0.5 (mean relu(1 - real) + mean relu(1 + fake))."""
  return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))
