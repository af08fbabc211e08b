"""Image grids as PNG, and reading user images / masks with clear errors."""

import pathlib

import numpy as np
from PIL import Image

from bigr_jax.data.transforms import center_crop_arr


def to_uint8(images) -> np.ndarray:
  """Float images in [0, 1] (clipped, as the original does when saving) -> uint8."""
  return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def make_grid(images, nrow: int = 8, padding: int = 2) -> np.ndarray:
  """(B, H, W, C) float in [0, 1] or uint8 -> one (rows*H, nrow*W, C) uint8 image with padding."""
  images = np.asarray(images)
  images = images if images.dtype == np.uint8 else to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
  batch, height, width, channels = images.shape
  nrow = max(1, min(nrow, batch))
  rows = -(-batch // nrow)
  grid = np.zeros((rows * (height + padding) + padding, nrow * (width + padding) + padding, channels), np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, nrow)
    top, left = padding + r * (height + padding), padding + c * (width + padding)
    grid[top:top + height, left:left + width] = image
  return grid


def save_grid(images, path, nrow: int = 8) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  grid = make_grid(images, nrow)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def load_image(path, size: int) -> np.ndarray:
  """An RGB image center-cropped and resized to (size, size, 3), float32 in [0, 1] (ADM center crop)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no image at {path}")
  try:
    image = Image.open(path)
    image.load()
  except Exception as e:
    raise ValueError(f"{path} is not a readable image: {e}") from e
  if image.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "I;16", "I"):
    raise ValueError(f"{path} has image mode {image.mode}; use an RGB image")
  return np.asarray(center_crop_arr(image.convert("RGB"), size), np.float32) / 255.0
