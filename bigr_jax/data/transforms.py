"""Per-record grain transforms: the original's image pipeline and flip augmentation of codes.

The original trains on `center_crop_arr(image_size) -> RandomHorizontalFlip -> ToTensor`, i.e. images in
[0, 1] with no normalisation. Here images stay NHWC (the JAX layout). Random choices come from grain's
per-record generator, seeded by the loader seed and the record's position in the stream, so a flip is
the same for the same seed and record and differs between epochs.
"""

from typing import Any

import grain
import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """ADM's center crop: halve with BOX while the short side >= 2*size, BICUBIC to size, crop the center.

  Args:
    pil_image: the image.
    image_size: side of the square output.

  Returns:
    uint8 array (image_size, image_size, channels).
  """
  # Repeated 2x box downsampling first: bicubic alone would alias on large images.
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.asarray(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


class CenterCrop(grain.transforms.Map):
  """`image` (uint8 HxWx3, any size) -> uint8 (size, size, 3) by `center_crop_arr`."""

  def __init__(self, image_size: int):
    if image_size < 1:
      raise ValueError(f"image_size={image_size} must be positive")
    self.image_size = int(image_size)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = element["image"]
    if image.shape[:2] != (self.image_size, self.image_size):
      image = center_crop_arr(Image.fromarray(image), self.image_size)
    return {**element, "image": np.ascontiguousarray(image)}


class RandomFlip(grain.transforms.RandomMap):
  """Mirrors `image` left-right with probability 1/2 (torchvision's RandomHorizontalFlip)."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
      return {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}
    return element


class ToFloat(grain.transforms.Map):
  """`image` uint8 -> float32 in [0, 1], as torchvision's ToTensor (x / 255, no normalisation)."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {**element, "image": element["image"].astype(np.float32) / np.float32(255.0)}


class RandomFlipCodes(grain.transforms.RandomMap):
  """Picks `codes_flipped` (codes of the mirrored image) over `codes` with probability 1/2.

  Flip augmentation for pre-extracted codes: mirroring the image does not mirror its binary code
  (the encoder is not equivariant), so the flipped image's codes are extracted and stored too.
  """

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "codes_flipped" not in element:
      raise ValueError("records carry no codes_flipped: build the codes source with flip=True "
                       "(data.flip) or leave RandomFlipCodes out")
    element = dict(element)
    flipped = element.pop("codes_flipped")
    if rng.random() < 0.5:
      element["codes"] = flipped
    return element


def image_transforms(image_size: int, flip: bool = True) -> list[grain.transforms.Transformation]:
  """The original's training pipeline: center crop, optional random flip, float32 in [0, 1]."""
  ops = [CenterCrop(image_size)]
  if flip:
    ops.append(RandomFlip())
  ops.append(ToFloat())
  return ops


def codes_transforms(flip: bool = True) -> list[grain.transforms.Transformation]:
  """For `CodesSource(..., flip=True)` records: choose original or flipped codes per record."""
  return [RandomFlipCodes()] if flip else []
