"""LPIPS perceptual distance (VGG16 variant) for tokenizer training.

VGG16 `features` (convs named `features_i` after torchvision's indices, so pretrained weights map by
name), channel-unit-normalized activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, squared
differences weighted by the 1x1 linear heads `lin0..lin4`, spatially averaged and summed. Weights come
from files: see `bigr_jax.weights.tokenizer_weights.lpips_torch_to_flax`. Inputs are NHWC.
"""

import flax.linen as nn
import jax.numpy as jnp

# torchvision vgg16().features conv indices and channels; a ReLU follows each, a 2x2 max-pool precedes
# each slice after the first.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64),
               (5, 64, 128), (7, 128, 128),
               (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512),
               (24, 512, 512), (26, 512, 512), (28, 512, 512))
SLICE_ENDS = (2, 7, 14, 21, 28)  # the last conv of each slice; its ReLU output is the tapped feature
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's ScalingLayer constants (fixed buffers, not learned).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
  """The five tapped ReLU outputs of VGG16, NHWC."""
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    taps = []
    for index, _, out_channels in VGG16_CONVS:
      if index in (5, 10, 17, 24):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.Conv(out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=f"features_{index}")(x)
      x = nn.relu(x)
      if index in SLICE_ENDS:
        taps.append(x)
    return taps


class LPIPS(nn.Module):
  """Perceptual distance per image, (B,) float32.

  Inputs go through LPIPS's scaling layer as they are. Note that the original B-AE trainer feeds images in
  [0, 1], not the [-1, 1] that LPIPS was calibrated on; `BinaryGAN` does the same, so we keep it.
  """
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images, targets):
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    batch = images.shape[0]
    both = jnp.concatenate([images, targets], axis=0).astype(jnp.float32)
    taps = VGG16Features(self.dtype, name="net")((both - shift) / scale)
    total = jnp.zeros((batch,), jnp.float32)
    for k, tap in enumerate(taps):
      tap = tap.astype(jnp.float32)
      tap = tap / (jnp.sqrt(jnp.sum(tap * tap, axis=-1, keepdims=True)) + 1e-10)
      diff = (tap[:batch] - tap[batch:]) ** 2
      weighted = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, name=f"lin{k}")(diff)
      total = total + jnp.mean(weighted, axis=(1, 2, 3))
    return total
