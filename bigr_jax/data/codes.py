"""Pre-extracted binary codes: a resumable writer, its reader, and a reader of the original's files.

Our format, one directory per split:

  meta.json            {"format": "bigr_jax_codes", "version": 1, "num_records": N, "num_tokens": T,
                        "bits": K, "packed": bool, "with_flipped": bool, "count": n}
  codes.npy            uint8 (N, T, K) bits in {0, 1}, or (N, T, ceil(K/8)) packed with
                       np.packbits(axis=-1) (big bit order) when "packed"; tokens row-major over the
                       h x w latent grid, as the trainer flattens them.
  codes_flipped.npy    (optional) the same for the horizontally mirrored images, for flip augmentation.
  labels.npy           int32 (N,).

The arrays are standard .npy files (np.load(..., mmap_mode="r") reads them), allocated at full size up
front; "count" says how many leading records are written. Each append flushes the arrays and then
replaces meta.json atomically, so after a crash the recorded count never covers unwritten data and a new
writer resumes from it. Encoding ImageNet takes hours; `encode_to_codes` drives such a run.

The original's format (`data.py`, `--use_prepared_data`): `{split}_ids.bin`, uint8 of shape
(N, K, 16, 16) (channel-first bit planes), and `{split}_lbs.bin`, uint16 labels; `OriginalCodesSource`
reads it as (T, K) tokens, the same transpose the original trainer applies.
"""

import json
import os
from typing import Any, Callable, Optional

import grain
import numpy as np

from bigr_jax import console, files
from bigr_jax.data import transforms as transforms_lib

FORMAT_NAME = "bigr_jax_codes"
FORMAT_VERSION = 1
META_FILE = "meta.json"
CODES_FILE = "codes.npy"
CODES_FLIPPED_FILE = "codes_flipped.npy"
LABELS_FILE = "labels.npy"


def _read_meta(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no codes at {directory!r}: {META_FILE} is missing (write codes with CodesWriter or "
        "encode_to_codes; for the original's *_ids.bin files use name='original_codes')")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} directory: {meta}")
  return meta


def _check_bits(codes: np.ndarray, what: str) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.dtype == np.bool_:
    return codes.astype(np.uint8)
  if np.issubdtype(codes.dtype, np.floating) or np.issubdtype(codes.dtype, np.integer):
    if codes.size and not np.all((codes == 0) | (codes == 1)):
      raise ValueError(f"{what}: bits must be 0 or 1; got values {np.unique(codes)[:8]}")
    return codes.astype(np.uint8)
  raise TypeError(f"{what}: expected bool, integer or float bits; got dtype {codes.dtype}")


class CodesWriter:
  """Chunked, resumable writer of a codes directory.

  Opening a directory that already holds codes with the same layout resumes at `count`; a different
  layout is an error (pass `overwrite=True` to start over).

  Usage:
    with CodesWriter(d, num_records=n, num_tokens=256, bits=32, with_flipped=True) as w:
      for start in range(w.count, n, batch): w.append(codes, labels, codes_flipped)
  """

  def __init__(self, directory: str, *, num_records: int, num_tokens: int, bits: int,
               packed: bool = True, with_flipped: bool = False, overwrite: bool = False):
    if min(num_records, num_tokens, bits) < 1:
      raise ValueError(f"num_records={num_records}, num_tokens={num_tokens}, bits={bits} must be >= 1")
    self.directory = os.fspath(directory)
    layout = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_records": int(num_records),
              "num_tokens": int(num_tokens), "bits": int(bits), "packed": bool(packed),
              "with_flipped": bool(with_flipped)}
    self.num_records, self.num_tokens, self.bits = int(num_records), int(num_tokens), int(bits)
    self.packed, self.with_flipped = bool(packed), bool(with_flipped)
    self._width = -(-self.bits // 8) if self.packed else self.bits
    self._meta = layout
    meta_path = os.path.join(self.directory, META_FILE)
    names = [CODES_FILE, LABELS_FILE] + ([CODES_FLIPPED_FILE] if self.with_flipped else [])
    if os.path.isfile(meta_path) and not overwrite:
      meta = _read_meta(self.directory)
      old = {k: meta.get(k) for k in layout}
      if old != layout:
        raise ValueError(
            f"{self.directory} already holds codes with another layout {old}; asked for {layout}. "
            "Use another directory or overwrite=True.")
      self.count = int(meta["count"])
      self._arrays = {n: np.load(os.path.join(self.directory, n), mmap_mode="r+") for n in names}
      if self.count:
        print(f"resuming codes in {self.directory} at record {self.count} / {self.num_records}", flush=True)
    else:
      os.makedirs(self.directory, exist_ok=True)
      if os.path.exists(meta_path):
        os.remove(meta_path)  # first, so a crash below never leaves stale meta beside new arrays
      code_shape = (self.num_records, self.num_tokens, self._width)
      self._arrays = {}
      for n in names:
        shape, dtype = ((self.num_records,), np.int32) if n == LABELS_FILE else (code_shape, np.uint8)
        # Full size at once; the file system keeps the unwritten tail sparse.
        self._arrays[n] = np.lib.format.open_memmap(
            os.path.join(self.directory, n), mode="w+", dtype=dtype, shape=shape)
      self.count = 0
      self._commit()

  @property
  def complete(self) -> bool:
    return self.count == self.num_records

  def _commit(self) -> None:
    for arr in self._arrays.values():
      arr.flush()
    files.write_json(os.path.join(self.directory, META_FILE), {**self._meta, "count": self.count})

  def _encode(self, codes: np.ndarray, what: str) -> np.ndarray:
    codes = _check_bits(codes, what)
    if codes.shape[1:] != (self.num_tokens, self.bits):
      raise ValueError(f"{what}: shape {codes.shape}; expected (batch, {self.num_tokens}, {self.bits})")
    return np.packbits(codes, axis=-1) if self.packed else codes

  def append(self, codes: np.ndarray, labels: np.ndarray,
             codes_flipped: Optional[np.ndarray] = None) -> None:
    """Writes the next records and commits the new count.

    Args:
      codes: (B, T, K) bits in {0, 1} (bool, integer or float).
      labels: (B,) integer labels.
      codes_flipped: (B, T, K) codes of the mirrored images; required iff `with_flipped`.
    """
    labels = np.asarray(labels)
    batch = len(labels)
    if labels.ndim != 1 or len(codes) != batch:
      raise ValueError(f"labels shape {labels.shape} does not match codes shape {np.shape(codes)}")
    if (codes_flipped is not None) != self.with_flipped:
      raise ValueError(f"codes_flipped must be {'given' if self.with_flipped else 'None'} "
                       f"(writer with_flipped={self.with_flipped})")
    if self.count + batch > self.num_records:
      raise ValueError(f"appending {batch} records at {self.count} exceeds num_records={self.num_records}")
    if batch and labels.min() < 0:
      raise ValueError(f"negative labels: {labels[labels < 0][:8]}")
    sl = slice(self.count, self.count + batch)
    self._arrays[CODES_FILE][sl] = self._encode(codes, "codes")
    if self.with_flipped:
      if np.shape(codes_flipped)[0] != batch:
        raise ValueError(f"codes_flipped shape {np.shape(codes_flipped)} does not match {batch} records")
      self._arrays[CODES_FLIPPED_FILE][sl] = self._encode(codes_flipped, "codes_flipped")
    self._arrays[LABELS_FILE][sl] = labels.astype(np.int32)
    self.count += batch
    self._commit()

  def close(self) -> None:
    if self._arrays:
      self._commit()
      self._arrays = {}

  def __enter__(self) -> "CodesWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _LazyArrays:
  """Opens memmaps on first use, so sources pickle as paths to grain workers, not as array data."""

  _arrays: Optional[dict[str, np.ndarray]] = None

  def _open(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  @property
  def arrays(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      self._arrays = self._open()
    return self._arrays

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}


class CodesSource(_LazyArrays):
  """Reads a codes directory: records `dict(codes=uint8 (T, K) in {0,1}, label=int32)`.

  With `flip=True` records also carry `codes_flipped`; `transforms.RandomFlipCodes` then keeps one
  of the two with probability 1/2 each.
  """

  def __init__(self, directory: str, *, flip: bool = False, allow_partial: bool = False):
    self.directory = os.fspath(directory)
    meta = _read_meta(self.directory)
    self.num_tokens, self.bits, self.packed = meta["num_tokens"], meta["bits"], meta["packed"]
    self.flip = bool(flip)
    if self.flip and not meta["with_flipped"]:
      raise ValueError(f"{self.directory} holds no codes_flipped (written with with_flipped=False); "
                       "set data.flip=False or re-encode with flipped codes")
    self._len = int(meta["count"])
    if self._len < meta["num_records"] and not allow_partial:
      raise ValueError(
          f"{self.directory} holds {self._len} of {meta['num_records']} records: the encoding did not "
          "finish. Resume it (encode_to_codes / CodesWriter on the same directory) or pass "
          "allow_partial=True.")
    if self._len == 0:
      raise ValueError(f"{self.directory} holds no records")
    self.num_classes = int(self.arrays[LABELS_FILE][:self._len].max()) + 1

  def _open(self) -> dict[str, np.ndarray]:
    names = [CODES_FILE, LABELS_FILE] + ([CODES_FLIPPED_FILE] if self.flip else [])
    return {n: np.load(os.path.join(self.directory, n), mmap_mode="r") for n in names}

  def __len__(self) -> int:
    return self._len

  def _decode(self, row: np.ndarray) -> np.ndarray:
    if self.packed:
      return np.unpackbits(row, axis=-1, count=self.bits)
    return np.array(row)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"record {index} out of range [0, {self._len})")
    arrays = self.arrays
    record = {"codes": self._decode(arrays[CODES_FILE][index]),
              "label": np.int32(arrays[LABELS_FILE][index])}
    if self.flip:
      record["codes_flipped"] = self._decode(arrays[CODES_FLIPPED_FILE][index])
    return record

  def __repr__(self) -> str:
    return f"CodesSource(records={self._len}, tokens={self.num_tokens}, bits={self.bits})"


class OriginalCodesSource(_LazyArrays):
  """Reads the original's `{split}_ids.bin` / `{split}_lbs.bin` as `dict(codes=(T, K), label)`.

  Args:
    directory: the `bin_dir` of the original's `ImageNetPrepareBAEDataset`.
    split: file prefix ("train").
    bits: K, the B-AE codebook size; 0 infers it from the file sizes.
    grid: latent side (16 for 256 px).
  """

  def __init__(self, directory: str, split: str = "train", *, bits: int = 0, grid: int = 16):
    self.directory, self.split, self.grid = os.fspath(directory), split, int(grid)
    self.ids_path = os.path.join(self.directory, f"{split}_ids.bin")
    self.labels_path = os.path.join(self.directory, f"{split}_lbs.bin")
    for path in (self.ids_path, self.labels_path):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"original codes file {path!r} does not exist")
    labels_bytes, ids_bytes = os.path.getsize(self.labels_path), os.path.getsize(self.ids_path)
    if labels_bytes % 2 or not labels_bytes:
      raise ValueError(f"{self.labels_path}: {labels_bytes} bytes is not a non-empty uint16 array")
    self._len = labels_bytes // 2
    per_bit_plane = self._len * self.grid * self.grid
    if not bits:
      if ids_bytes % per_bit_plane:
        raise ValueError(f"{self.ids_path}: {ids_bytes} bytes is not {self._len} records of "
                         f"K x {self.grid} x {self.grid}; check grid")
      bits = ids_bytes // per_bit_plane
    self.bits = int(bits)
    if ids_bytes != per_bit_plane * self.bits:
      raise ValueError(f"{self.ids_path}: {ids_bytes} bytes; {self._len} records of {self.bits} x "
                       f"{self.grid} x {self.grid} need {per_bit_plane * self.bits}")
    self.num_tokens = self.grid * self.grid
    self.num_classes = int(self.arrays["labels"].max()) + 1

  def _open(self) -> dict[str, np.ndarray]:
    ids = np.memmap(self.ids_path, dtype=np.uint8, mode="r",
                    shape=(self._len, self.bits, self.num_tokens))
    return {"ids": ids, "labels": np.memmap(self.labels_path, dtype=np.uint16, mode="r")}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"record {index} out of range [0, {self._len})")
    planes = self.arrays["ids"][index]  # (K, h*w): channel-first, as the B-AE wrote it
    if planes.max() > 1:
      raise ValueError(f"{self.ids_path} record {index}: values above 1; not binary codes")
    # The original trainer's x.reshape(bs, K, -1).transpose(1, 2): (K, h*w) -> (h*w, K) tokens.
    return {"codes": np.ascontiguousarray(planes.T), "label": np.int32(self.arrays["labels"][index])}

  def __repr__(self) -> str:
    return f"OriginalCodesSource(split={self.split!r}, records={self._len}, bits={self.bits})"


IF_COMPLETE = ("keep", "refuse", "overwrite")


def complete_codes(directory: str, num_records: int) -> bool:
  """Whether `directory` holds finished codes of `num_records` records."""
  return os.path.isfile(os.path.join(directory, META_FILE)) and _read_meta(directory)["count"] >= num_records


def refuse_complete(directory: str, num_records: int) -> None:
  if complete_codes(directory, num_records):
    raise FileExistsError(f"{directory} holds finished codes of all {num_records} records; pass --overwrite to "
                          "encode them again")


def encode_to_codes(source, encode_fn: Callable[[np.ndarray], np.ndarray], directory: str, *,
                    image_size: int, batch_size: int, with_flipped: bool = True, packed: bool = True,
                    num_read_threads: int = 16, if_complete: str = "keep",
                    write: bool = True) -> Optional[CodesWriter]:
  """Encodes every image of `source` into a codes directory, resuming where a previous run stopped.

  Records are encoded in source order (center crop, float32 in [0, 1], no flip); with
  `with_flipped` the mirrored images are encoded too.

  Args:
    source: an image source (records `image` uint8, `label`).
    encode_fn: float32 images (B, S, S, 3) in [0, 1] -> bits (B, T, K) in {0, 1}, e.g. the B-AE
      encoder's sampled bits flattened row-major over the latent grid.
    directory: output; created, or resumed if it holds a partial run with the same layout.
    image_size: S.
    batch_size: images per `encode_fn` call (the last batch may be smaller).
    with_flipped: also store codes of the mirrored images (keeps flip augmentation).
    packed: store 8 bits a byte.
    num_read_threads: threads reading and decoding images.
    if_complete: what finished codes in `directory` get: "keep" (return them), "refuse" (FileExistsError) or
      "overwrite" (encode again). Unfinished ones always resume.
    write: False on the other processes of a multi-host encode: they read and encode every batch with process 0
      (the encoder is one program over all hosts) and write nothing; process 0 writes.

  Returns:
    The closed writer (`count`, `complete`); None where `write` is False.
  """
  if if_complete not in IF_COMPLETE:
    raise ValueError(f"if_complete={if_complete!r}; expected one of {IF_COMPLETE}")
  n = len(source)
  if if_complete == "refuse":
    refuse_complete(directory, n)
  overwrite = if_complete == "overwrite" and complete_codes(directory, n)
  writer = None
  meta = _read_meta(directory) if os.path.isfile(os.path.join(directory, META_FILE)) and not overwrite else None
  if meta is not None and write:
    writer = CodesWriter(directory, num_records=n, num_tokens=meta["num_tokens"], bits=meta["bits"],
                         packed=packed, with_flipped=with_flipped)
  start = int(meta["count"]) if meta is not None else 0
  if start >= n:
    print(f"codes in {directory} are complete ({n} records)", flush=True)
    if writer is not None:
      writer.close()
    return writer
  dataset = (grain.MapDataset.source(source)[start:]
             .map(transforms_lib.CenterCrop(image_size))
             .map(transforms_lib.ToFloat())
             .batch(batch_size, drop_remainder=False)
             .to_iter_dataset(grain.ReadOptions(num_threads=num_read_threads)))
  skipped = 0
  try:
    for step, batch in enumerate(dataset):
      codes = np.asarray(encode_fn(batch["image"]))
      flipped = np.asarray(encode_fn(batch["image"][:, :, ::-1])) if with_flipped else None
      if not write:
        continue
      if writer is None:  # a fresh directory: the layout comes from the encoder's first output
        if codes.ndim != 3:
          raise ValueError(f"encode_fn returned shape {codes.shape}; expected (batch, tokens, bits)")
        writer = CodesWriter(directory, num_records=n, num_tokens=codes.shape[1], bits=codes.shape[2],
                             packed=packed, with_flipped=with_flipped, overwrite=overwrite)
      writer.append(codes, batch["label"], flipped)
      skipped += int(np.sum(batch.get("skipped", 0)))
      if step % 100 == 0:
        print(f"encoded {writer.count} / {n} records into {directory}", flush=True)
  finally:
    if writer is not None:
      writer.close()
  if skipped:
    console.warn(f"{skipped} bad images were replaced by the next good one while encoding")
  return writer


class SyntheticCodes:
  """Learnable stand-in codes: each class has a fixed bit pattern; samples flip each bit with p = `noise`.

  A random-access source (grain-compatible), deterministic per (seed, index). For tests and benchmarks only.
  """

  def __init__(self, num_tokens: int, bits: int, num_classes: int, size: int = 4096, noise: float = 0.05,
               seed: int = 0):
    self.num_tokens, self.bits, self.num_classes = num_tokens, bits, num_classes
    self.size, self.noise, self.seed = size, noise, seed
    rng = np.random.default_rng(seed)
    self.patterns = rng.random((num_classes, num_tokens, bits)) < 0.5

  def __len__(self):
    return self.size

  def __repr__(self):  # grain checks the source by repr when restoring an iterator
    return (f"SyntheticCodes(num_tokens={self.num_tokens}, bits={self.bits}, num_classes={self.num_classes}, "
            f"size={self.size}, noise={self.noise}, seed={self.seed})")

  def __getitem__(self, index):
    rng = np.random.default_rng((self.seed, int(index)))
    label = int(index) % self.num_classes
    flips = rng.random((self.num_tokens, self.bits)) < self.noise
    return {"codes": np.logical_xor(self.patterns[label], flips).astype(np.uint8), "label": np.int32(label)}
