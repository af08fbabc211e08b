"""The FID Inception-v3 in Flax, as pytorch-fid builds it, and its weight converter.

pytorch-fid (`pytorch_fid.inception.fid_inception_v3`) patches torchvision's Inception3 into the network
of the TensorFlow FID graph (`inception-2015-12-05`): 1008 classes, no auxiliary head, and these blocks:

* `FIDInceptionA` / `FIDInceptionC` / `FIDInceptionE_1`: the pool branch averages without counting the
  padding (`count_include_pad=False`);
* `FIDInceptionE_2` (`Mixed_7c`): the pool branch is a 3x3 max pool (stride 1, padding 1).

Module names mirror the torch state dict (`Mixed_5b/branch1x1/conv/kernel` <- `Mixed_5b.branch1x1.conv.
weight`), so `params_from_torch` is a rename plus transposes; the weights file is the standard
`pt_inception-2015-12-05-6726825d.pth`, read from a path (nothing is downloaded).

The forward pass takes NHWC images in [0, 1], resizes them to 299x299 bilinearly without antialiasing
(`F.interpolate(..., mode="bilinear", align_corners=False)`, as pytorch-fid does) and scales them to
[-1, 1]. It returns:

* `pool`: (B, 2048) average-pooled features (FID, precision / recall);
* `logits`: (B, 1008) `fc` with its bias, and `logits_unbiased`: without it; the ADM evaluator (and
  torch-fidelity) take the Inception-Score softmax over the unbiased logits (`softmax/logits/MatMul`);
* `spatial`: (B, 17, 17, 7), ADM's sFID features: TF's `mixed_6/conv:0` is the ReLU output of the 1x1
  branch of the seventh mixed block (`Mixed_6d.branch1x1`), of which ADM keeps the first 7 channels.
"""

import functools
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigr_jax.weights import io as convert_io

IMAGE_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
BN_EPS = 1e-3  # torchvision's BasicConv2d, the TF value
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

# Torch parameter name -> (flax name, whether the array is a conv kernel to transpose).
_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_IGNORED_PREFIXES = ("AuxLogits.",)  # torchvision's auxiliary head; the FID network has none


def _pad(kernel) -> tuple:
  """Torch's symmetric padding for an odd kernel with stride 1 ('same')."""
  return tuple((k // 2, k // 2) for k in kernel)


class FrozenBatchNorm(nn.Module):
  """Inference batch norm with the four torch tensors as params: (x - mean) / sqrt(var + eps) * scale + bias."""
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    inv = scale * jax.lax.rsqrt(var + self.eps)
    return x * inv + (bias - mean * inv)


class BasicConv2d(nn.Module):
  """Conv (no bias) + batch norm + ReLU, as torchvision's BasicConv2d."""
  features: int
  kernel: Sequence[int] = (1, 1)
  strides: Sequence[int] = (1, 1)
  padding: Any = "VALID"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, tuple(self.kernel), tuple(self.strides), padding=self.padding, use_bias=False,
                precision=self.precision, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _conv(features, kernel=(1, 1), strides=(1, 1), pad=False, precision=jax.lax.Precision.HIGHEST, name=None):
  return BasicConv2d(features, kernel, strides, _pad(kernel) if pad else "VALID", precision, name=name)


def _avg_pool_same(x):
  """3x3 average, stride 1, padding 1, padding not counted (the FID blocks' `count_include_pad=False`)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_down(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d (FIDInceptionA)."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    b1 = _conv(64, precision=p, name="branch1x1")(x)
    b5 = _conv(48, precision=p, name="branch5x5_1")(x)
    b5 = _conv(64, (5, 5), pad=True, precision=p, name="branch5x5_2")(b5)
    b3 = _conv(64, precision=p, name="branch3x3dbl_1")(x)
    b3 = _conv(96, (3, 3), pad=True, precision=p, name="branch3x3dbl_2")(b3)
    b3 = _conv(96, (3, 3), pad=True, precision=p, name="branch3x3dbl_3")(b3)
    bp = _conv(self.pool_features, precision=p, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision's InceptionB, unchanged)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    b3 = _conv(384, (3, 3), (2, 2), precision=p, name="branch3x3")(x)
    bd = _conv(64, precision=p, name="branch3x3dbl_1")(x)
    bd = _conv(96, (3, 3), pad=True, precision=p, name="branch3x3dbl_2")(bd)
    bd = _conv(96, (3, 3), (2, 2), precision=p, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_down(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..e (FIDInceptionC). Returns (output, branch1x1 output); the latter gives sFID's features."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p, c7 = self.precision, self.channels_7x7
    b1 = _conv(192, precision=p, name="branch1x1")(x)
    b7 = _conv(c7, precision=p, name="branch7x7_1")(x)
    b7 = _conv(c7, (1, 7), pad=True, precision=p, name="branch7x7_2")(b7)
    b7 = _conv(192, (7, 1), pad=True, precision=p, name="branch7x7_3")(b7)
    bd = _conv(c7, precision=p, name="branch7x7dbl_1")(x)
    bd = _conv(c7, (7, 1), pad=True, precision=p, name="branch7x7dbl_2")(bd)
    bd = _conv(c7, (1, 7), pad=True, precision=p, name="branch7x7dbl_3")(bd)
    bd = _conv(c7, (7, 1), pad=True, precision=p, name="branch7x7dbl_4")(bd)
    bd = _conv(192, (1, 7), pad=True, precision=p, name="branch7x7dbl_5")(bd)
    bp = _conv(192, precision=p, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """Mixed_7a (torchvision's InceptionD, unchanged)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    b3 = _conv(192, precision=p, name="branch3x3_1")(x)
    b3 = _conv(320, (3, 3), (2, 2), precision=p, name="branch3x3_2")(b3)
    b7 = _conv(192, precision=p, name="branch7x7x3_1")(x)
    b7 = _conv(192, (1, 7), pad=True, precision=p, name="branch7x7x3_2")(b7)
    b7 = _conv(192, (7, 1), pad=True, precision=p, name="branch7x7x3_3")(b7)
    b7 = _conv(192, (3, 3), (2, 2), precision=p, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  max_pool: bool
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    b1 = _conv(320, precision=p, name="branch1x1")(x)
    b3 = _conv(384, precision=p, name="branch3x3_1")(x)
    b3 = jnp.concatenate([_conv(384, (1, 3), pad=True, precision=p, name="branch3x3_2a")(b3),
                          _conv(384, (3, 1), pad=True, precision=p, name="branch3x3_2b")(b3)], axis=-1)
    bd = _conv(448, precision=p, name="branch3x3dbl_1")(x)
    bd = _conv(384, (3, 3), pad=True, precision=p, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([_conv(384, (1, 3), pad=True, precision=p, name="branch3x3dbl_3a")(bd),
                          _conv(384, (3, 1), pad=True, precision=p, name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = _conv(192, precision=p, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
  """The 1008-way `fc`; returns (pool @ kernel, pool @ kernel + bias)."""
  num_classes: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    unbiased = jnp.dot(x, kernel, precision=self.precision)
    return unbiased, unbiased + bias


def resize_bilinear(images, size: int = IMAGE_SIZE):
  """NHWC bilinear resize with half-pixel centers and no antialiasing, as torch's F.interpolate(bilinear)."""
  if images.shape[1:3] == (size, size):
    return images
  shape = (images.shape[0], size, size, images.shape[3])
  return jax.image.resize(images, shape, method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's InceptionV3 (FID weights). Input: NHWC images in [0, 1] (any size >= 75 px)."""
  resize_input: bool = True
  normalize_input: bool = True
  precision: Any = jax.lax.Precision.HIGHEST  # float32 convolutions on TPU / GPU, not bf16 or TF32 passes

  @nn.compact
  def __call__(self, images):
    p = self.precision
    x = images.astype(jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x)
    if self.normalize_input:
      x = 2.0 * x - 1.0
    x = _conv(32, (3, 3), (2, 2), precision=p, name="Conv2d_1a_3x3")(x)
    x = _conv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
    x = _conv(64, (3, 3), pad=True, precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool_down(x)
    x = _conv(80, precision=p, name="Conv2d_3b_1x1")(x)
    x = _conv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
    x = _max_pool_down(x)
    x = InceptionA(32, p, name="Mixed_5b")(x)
    x = InceptionA(64, p, name="Mixed_5c")(x)
    x = InceptionA(64, p, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x, _ = InceptionC(128, p, name="Mixed_6b")(x)
    x, _ = InceptionC(160, p, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, p, name="Mixed_6d")(x)
    x, _ = InceptionC(192, p, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(False, p, name="Mixed_7b")(x)
    x = InceptionE(True, p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits_unbiased, logits = Classifier(NUM_CLASSES, p, name="fc")(pool)
    return {"pool": pool, "logits": logits, "logits_unbiased": logits_unbiased,
            "spatial": mixed_6_conv[..., :SPATIAL_CHANNELS]}


def init_params(key, image_size: int = IMAGE_SIZE):
  """Random params (tests and benchmarks; real evaluations load the FID weights)."""
  model = FIDInceptionV3()
  return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]


@functools.lru_cache(maxsize=1)
def param_shapes():
  """Shapes of the params (traced once; the converter checks every array against them)."""
  return jax.eval_shape(lambda: init_params(jax.random.key(0)))


def _torch_key_to_path(key: str) -> tuple:
  """'Mixed_5b.branch1x1.conv.weight' -> ('Mixed_5b', 'branch1x1', 'conv', 'kernel')."""
  parts = key.split(".")
  if parts[-2] == "bn":
    if parts[-1] not in _BN_NAMES:
      raise KeyError(key)
    return tuple(parts[:-1]) + (_BN_NAMES[parts[-1]],)
  if parts[-2] in ("conv", "fc") and parts[-1] in ("weight", "bias"):
    return tuple(parts[:-1]) + ("kernel" if parts[-1] == "weight" else "bias",)
  raise KeyError(key)


def params_from_torch(state_dict: Mapping[str, Any]):
  """pytorch-fid state dict (numpy or torch arrays) -> Flax params of `FIDInceptionV3`.

  Conv weights (O, I, kh, kw) become (kh, kw, I, O); `fc.weight` (1008, 2048) becomes (2048, 1008). The
  auxiliary head and `num_batches_tracked` are ignored; any other unknown or missing name is an error.
  """
  shapes = param_shapes()
  flat_shapes = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  flat, unknown = {}, []
  for key, value in state_dict.items():
    if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES):
      continue
    try:
      path = _torch_key_to_path(key)
    except KeyError:
      unknown.append(key)
      continue
    if path not in flat_shapes:
      unknown.append(key)
      continue
    array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
    if path[-1] == "kernel":
      array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
    if array.shape != flat_shapes[path].shape:
      raise ValueError(f"{key}: shape {array.shape} after transposing; the FID Inception needs "
                       f"{flat_shapes[path].shape}")
    flat[path] = array
  missing = sorted("/".join(p) for p in flat_shapes if p not in flat)
  if unknown or missing:
    raise ValueError(f"not the FID Inception state dict ({WEIGHTS_FILE} layout): unknown keys {unknown[:8]}, "
                     f"missing params {missing[:8]} ({len(unknown)} unknown, {len(missing)} missing)")
  params: dict = {}
  for path, array in flat.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(array)
  return params


def load_params(path):
  """Reads the FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`, or the same names as .npz /
  .safetensors) and converts them to Flax params."""
  if not path:
    raise ValueError("no Inception weights given: set evaluation.inception_weights to the path of "
                     f"{WEIGHTS_FILE} (pytorch-fid's FID Inception weights, from its GitHub releases)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Inception weights {path!r} do not exist; download {WEIGHTS_FILE} (pytorch-fid's "
                            "GitHub releases) and point evaluation.inception_weights at it")
  return params_from_torch(convert_io.read_state_dict(path))
