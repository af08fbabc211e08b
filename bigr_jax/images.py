"""Image grids as PNG, reading user images with clear errors, seamless cloning of edits, decoding-order strips."""

import pathlib

import numpy as np
from PIL import Image

from bigr_jax.config_sections import CLONE_CENTERS
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


def open_image(path, name: str) -> Image.Image:
  """The image file at `path`, decoded; a file PIL cannot read (no image, truncated, damaged) is a ValueError
  naming it as `name`."""
  try:
    image = Image.open(path)
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{name} is not an image PIL can read ({type(e).__name__}); give a PNG or JPEG") from e
  return image


def load_image(path, size: int) -> np.ndarray:
  """An RGB image center-cropped and resized to (size, size, 3), float32 in [0, 1] (ADM center crop)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no image at {path}")
  image = open_image(path, str(path))
  if image.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "I;16", "I"):
    raise ValueError(f"{path} has image mode {image.mode}; use an RGB image")
  return np.asarray(center_crop_arr(image.convert("RGB"), size), np.float32) / 255.0


def check_rgb(image: Image.Image, where: str = "the image") -> Image.Image:
  """An RGB PIL image as is, or an opaque RGBA one as RGB; anything else (grayscale, palette, transparency) is
  a ValueError naming its mode, for inputs that must be colour pictures (the app's uploads)."""
  if image.mode == "RGBA" and np.asarray(image.getchannel("A")).min() == 255:
    return image.convert("RGB")
  if image.mode != "RGB":
    what = "has transparent pixels" if "A" in image.getbands() else f"is {image.mode}, not RGB"
    raise ValueError(f"{where} {what} (mode {image.mode}); give a colour picture without transparency")
  return image




def seamless_clone(source, destination, mask, center: str = "box") -> np.ndarray:
  """OpenCV's Poisson blending (`cv2.seamlessClone`, NORMAL_CLONE), as the original's apps/inpaint.py applies
  it after an edit: the pixels of `destination` inside `mask` take the gradients of `source`, blended into the
  border; outside the mask `destination` is unchanged. Images (H, W, 3) in [0, 1], mask (H, W) bool.

  center: "box" centres the region on the bounding box OpenCV itself clones (the mask without its outermost
  pixel ring, which OpenCV clears), so that it lands exactly where it was cut, for any mask. "mean" is the
  original's: its `adjust_mask` (one more column / row where the box's extent is odd), then the mean of the
  mask's pixels, which puts regions touching the image border (the top half, say) a pixel off; for boxes away
  from the border the two agree. Images go to 8 bits as saved (the original min-max
  stretches each image first)."""
  try:
    import cv2  # pylint: disable=import-outside-toplevel  (optional: the app extra)
  except ImportError as e:
    raise ImportError("seamless cloning needs OpenCV: pip install 'bigr_jax[app]' (opencv-python-headless)") from e
  if center not in CLONE_CENTERS:
    raise ValueError(f"unknown clone center {center!r}; expected one of {CLONE_CENTERS}")
  mask = np.asarray(mask, bool)
  inner = np.zeros_like(mask)
  inner[1:-1, 1:-1] = mask[1:-1, 1:-1]
  left, top, width, height = cv2.boundingRect(inner.astype(np.uint8))
  if width < 3 or height < 3:
    raise ValueError("the mask is too thin to clone seamlessly (less than 3 pixels across, once the image's "
                     "outermost pixels are left out); draw a larger region or turn seamless cloning off")
  if center == "box":
    point = (left + width // 2, top + height // 2)
  else:
    mask = _original_adjust_mask(mask)
    rows, cols = np.nonzero(mask)
    point = (int(cols.mean()), int(rows.mean()))
  cloned = cv2.seamlessClone(to_uint8(source), to_uint8(destination), mask.astype(np.uint8) * 255, point,
                             cv2.NORMAL_CLONE)
  return cloned.astype(np.float32) / 255.0


def _original_adjust_mask(mask: np.ndarray) -> np.ndarray:
  """apps/inpaint.py's `adjust_mask`, index for index (at the left or top edge it writes the last column / row,
  as its negative index does)."""
  mask = mask.copy()
  rows, cols = np.nonzero(mask)
  top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
  if (right - left) % 2 == 1:
    mask[top:bottom + 1, left - 1 if right == mask.shape[1] - 1 else right + 1] = True
  if (bottom - top) % 2 == 1:
    mask[top - 1 if bottom == mask.shape[0] - 1 else bottom + 1, left:right + 1] = True
  return mask


def decoding_strip(images, decoded_at, num_iter: int, padding: int = 2) -> np.ndarray:
  """The order in which the sampler decoded each image's tokens: one row per image, one column per iteration,
  showing the tokens decoded by then (the rest grey). images (B, H, W, 3) in [0, 1]; decoded_at (B, N), the
  iteration that decoded each row-major token (-1: given, shown from the start). Returns a uint8 grid."""
  images = np.asarray(images, np.float32)
  batch, height, width, _ = images.shape
  grid = int(round(np.shape(decoded_at)[1] ** 0.5))
  order = np.asarray(decoded_at).reshape(batch, grid, grid)
  order = order.repeat(height // grid, axis=1).repeat(width // grid, axis=2)  # token -> its pixels
  frames = [np.where((order <= t)[..., None], images, 0.5) for t in range(num_iter)]
  return make_grid(np.stack(frames, axis=1).reshape(batch * num_iter, height, width, -1), nrow=num_iter,
                   padding=padding)
