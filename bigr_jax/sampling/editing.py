"""Zero-shot applications on token grids: inpainting, outpainting, class editing, interpolation, enrichment.

They work on B-AE bits (B, N, K) and token masks; turning images into bits and back is the tokenizer's job.
As in the original, the known tokens condition the trunk and the masked ones are sampled by the entropy-
ordered sampler, with the original apps' settings (`EDIT_CONFIG`, ...). One difference: by default the
known tokens stay fixed. The original budgets its iterations by the number of *known* tokens, so when they
outnumber the masked ones it re-samples known tokens too, and when they do not it fills the leftovers in
one last pass; `SamplerConfig.resample_known=True` reproduces that.
"""

from typing import Sequence

import jax
import numpy as np
from PIL import Image

from bigr_jax.config_sections import EditConfig, SamplerConfig
from bigr_jax.data.transforms import center_crop_arr
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.sampling.sampler import SampleOutput, check_labels, complete, generate

# The original apps' settings: apps/inpaint.py (script/app_{inpaint,outpaint,edit}.sh), apps/interpolate.py,
# apps/enrich.py. Enrichment uses the null label, where CFG (scale 10 there) is a no-op, so it runs without
# the null half.
EDIT_CONFIG = SamplerConfig(num_iter=25, cfg_scale=2.5, gumbel_temp=0.0, mask_schedule="linear")
INTERPOLATE_CONFIG = SamplerConfig(num_iter=20, cfg_scale=2.5, gumbel_temp=0.0, mask_schedule="cosine")
ENRICH_CONFIG = SamplerConfig(num_iter=20, cfg_scale=1.0, gumbel_temp=0.0, mask_schedule="linear")
# Each `--mode=edit` task's settings, as its original app runs it (config.edit.sampler overrides them).
TASK_SAMPLERS = {"inpaint": EDIT_CONFIG, "outpaint": EDIT_CONFIG, "edit": EDIT_CONFIG,
                 "interpolate": INTERPOLATE_CONFIG, "enrich": ENRICH_CONFIG}


def task_sampler(edit: EditConfig) -> SamplerConfig:
  """An edit task's sampler: the original app's settings (`TASK_SAMPLERS`), with the fields `edit.sampler` sets."""
  overrides = {k: v for k, v in edit.sampler.items() if v is not None}
  return TASK_SAMPLERS[edit.task].replace(**overrides)


# apps/interpolate.py: weight of the first class; the second gets 1 - weight.
INTERPOLATION_WEIGHTS = tuple([0.0, 0.1, 0.2] + np.linspace(0.3, 0.7, 21).tolist() + [0.8, 0.9, 1.0])


def pixel_mask(image, image_size: int = 256) -> np.ndarray:
  """(image_size, image_size) bool mask from a mask image (a path, PIL image or array; white = True): as
  apps/inpaint.py, center-cropped to `image_size`, its first channel; any non-zero pixel counts as True."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  elif not isinstance(image, Image.Image):
    image = Image.open(image)
  if image.mode in ("1", "P"):  # bicubic needs 8 bits; palette indices are not brightness
    image = image.convert("L" if image.mode == "1" else "RGB")
  arr = center_crop_arr(image, image_size)
  return (arr[..., 0] if arr.ndim == 3 else arr) != 0


def mask_from_image(image, grid_size: int = 16, image_size: int = 256) -> np.ndarray:
  """(grid, grid) bool token mask from a mask image (white = regenerate): its `pixel_mask` on the token grid."""
  return pixel_mask_to_tokens(pixel_mask(image, image_size), grid_size)


def pixel_mask_to_tokens(pixels: np.ndarray, grid_size: int) -> np.ndarray:
  """A (H, W) pixel mask nearest-resized to the (grid, grid) token grid, as apps/inpaint.py resizes masks."""
  height, width = pixels.shape
  rows = np.minimum(np.floor(np.arange(grid_size) * (height / grid_size)).astype(int), height - 1)
  cols = np.minimum(np.floor(np.arange(grid_size) * (width / grid_size)).astype(int), width - 1)
  return pixels[rows][:, cols]


def token_mask(mask, batch: int, model_config: GeneratorConfig) -> np.ndarray:
  """A (B, N) bool mask from one of shape (B, N), (N,), (h, w) or (B, h, w), row-major over the grid."""
  mask = np.asarray(mask)
  num_tokens, grid = model_config.seq_len, model_config.grid_size
  if mask.dtype != bool:
    if not np.isin(mask, (0, 1)).all():
      raise ValueError("a token mask must be boolean (or 0/1)")
    mask = mask.astype(bool)
  if mask.shape in ((num_tokens,), (grid, grid)):
    mask = np.broadcast_to(mask.reshape(1, num_tokens), (batch, num_tokens))
  elif mask.shape in ((batch, num_tokens), (batch, grid, grid)):
    mask = mask.reshape(batch, num_tokens)
  else:
    raise ValueError(f"token mask of shape {mask.shape} does not fit the model's {grid}x{grid} token grid "
                     f"(N = {num_tokens}) and batch {batch}: expected (N,), ({grid}, {grid}), (B, N) or "
                     f"(B, {grid}, {grid}); resize image masks with mask_from_image")
  return np.ascontiguousarray(mask)


def _labels(model_config: GeneratorConfig, label, batch: int) -> np.ndarray:
  if label is None:
    label = model_config.null_class
  labels = np.broadcast_to(np.asarray(label), (batch,)) if np.ndim(label) == 0 else np.asarray(label)
  if labels.shape != (batch,):
    raise ValueError(f"labels must be one class id or one per image ({batch}), got shape {labels.shape}")
  check_labels(model_config, labels)
  return labels.astype(np.int32)


def _skip_null_half(config: SamplerConfig, model_config: GeneratorConfig, labels) -> SamplerConfig:
  # With every label the null class, both CFG halves are the same: l_u + cfg (l_c - l_u) = l_c.
  if config.guidance and np.all(labels == model_config.null_class):
    return config.replace(cfg_scale=1.0)
  return config


def inpaint(model_config: GeneratorConfig, params, bits, mask, rng, *, label=None,
            config: SamplerConfig = EDIT_CONFIG, **kwargs) -> SampleOutput:
  """Regenerates the tokens where `mask` is True (see `token_mask` for its shapes) given the others.

  label: one class id or (B,); None is the null class (the original's default, `--cond_edit 1000`).
  Extra keyword arguments (mesh, batch_axes) go to `sampler.complete`.
  """
  batch = np.shape(bits)[0]
  labels = _labels(model_config, label, batch)
  regenerate = token_mask(mask, batch, model_config)
  config = _skip_null_half(config, model_config, labels)
  return complete(model_config, params, labels, rng, bits, regenerate, config, **kwargs)


def outpaint(model_config: GeneratorConfig, params, bits, mask, rng, **kwargs) -> SampleOutput:
  """Regenerates everything outside `mask` (True = the region kept), as apps/inpaint.py --mode outpaint."""
  batch = np.shape(bits)[0]
  return inpaint(model_config, params, bits, ~token_mask(mask, batch, model_config), rng, **kwargs)


def edit_class(model_config: GeneratorConfig, params, bits, mask, target_class, rng, **kwargs) -> SampleOutput:
  """Regenerates the masked tokens conditioned on `target_class` with CFG (apps/inpaint.py --mode edit)."""
  if target_class is None:
    raise ValueError("edit_class needs a target class")
  return inpaint(model_config, params, bits, mask, rng, label=target_class, **kwargs)


def interpolate(model_config: GeneratorConfig, params, class_a: int, class_b: int, rng,
                weights: Sequence[float] = INTERPOLATION_WEIGHTS, config: SamplerConfig = INTERPOLATE_CONFIG,
                **kwargs) -> SampleOutput:
  """One sample per weight w, conditioned on w E[class_a] + (1 - w) E[class_b] (apps/interpolate.py).

  The null half mixes the null embedding with the same weights, as the original.
  """
  weights = np.asarray(weights, np.float32).reshape(-1)
  pair = np.broadcast_to(np.asarray([class_a, class_b], np.int32), (weights.shape[0], 2))
  check_labels(model_config, pair, np.zeros(pair.shape))
  label_weights = np.stack([weights, 1.0 - weights], axis=1)
  return generate(model_config, params, pair, rng, config, label_weights=label_weights, **kwargs)


def enrichment_masks(grid_size: int, ds_rate: int, order: Sequence[int], groups: int = 4) -> np.ndarray:
  """(groups, grid^2) masks of `supres_box`: token (r, c) has sub-position (r % ds) ds + (c % ds); the
  sub-positions, in the given order, are dealt into `groups` groups (order[g::groups])."""
  if grid_size % ds_rate:
    raise ValueError(f"the token grid ({grid_size}) is not divisible by ds_rate={ds_rate}")
  if sorted(order) != list(range(ds_rate ** 2)):
    raise ValueError(f"order must be a permutation of range({ds_rate ** 2}), got {list(order)}")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  sub_position = ((rows % ds_rate) * ds_rate + cols % ds_rate).reshape(-1)
  order = list(order)
  return np.stack([np.isin(sub_position, order[g::groups]) for g in range(groups)])


def enrich(model_config: GeneratorConfig, params, bits, rng, *, ds_rate: int = 2, repeats: int = 4,
           label=None, config: SamplerConfig = ENRICH_CONFIG, **kwargs):
  """Adds detail to the bits of an upsampled low-resolution image (apps/enrich.py, `supres_box`).

  Each repeat shuffles the ds^2 sub-positions of every ds x ds token block (independently per image) and
  regenerates the four groups of them in turn given all other tokens; each repeat starts from the last
  one's output. Returns the final bits (B, N, K).
  """
  batch = np.shape(bits)[0]
  labels = _labels(model_config, label, batch)
  config = _skip_null_half(config, model_config, labels)
  if np.shape(bits) != (batch, model_config.seq_len, model_config.binary_size):
    raise ValueError(f"bits must have shape (B, N, K) = {(batch, model_config.seq_len, model_config.binary_size)}"
                     f", got {np.shape(bits)}")
  for repeat in range(repeats):
    shuffle_key, sample_key = (jax.random.fold_in(jax.random.fold_in(rng, repeat), i) for i in range(2))
    orders = [np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, b), ds_rate ** 2))
              for b in range(batch)]
    masks = np.stack([enrichment_masks(model_config.grid_size, ds_rate, order) for order in orders], axis=1)
    for group, regenerate in enumerate(masks):  # (B, N) each
      if not regenerate.any():
        continue
      key = jax.random.fold_in(sample_key, group)
      bits = complete(model_config, params, labels, key, bits, regenerate, config, **kwargs).bits
  return bits
