"""FID, sFID, Inception Score and precision / recall, computed as OpenAI's ADM evaluation suite does.

ADM (`guided-diffusion/evaluations/evaluator.py`) runs the TF Inception graph on uint8 NHWC batches and
takes `pool_3` (2048-d) for FID and precision / recall, `mixed_6/conv[..., :7]` flattened (17*17*7 = 2023-d)
for sFID, and the softmax over `pool_3 @ W` (no bias) for the Inception Score. Here the network is the Flax
port of pytorch-fid's FID Inception (`inception.py`), which resizes with torch's bilinear and scales to
[-1, 1]; the TF graph resizes with TF1's bilinear. Expect numbers within the usual pytorch-fid vs TF gap
(a few hundredths of FID), not bit-equality with the TF evaluator.

The formulas are ADM's:
* FID / sFID: `mu, sigma = mean, np.cov(rowvar=False)` (float64) and the Frechet distance with scipy's
  `sqrtm`, adding eps * I to both covariances when the product is singular.
* IS: splits of 5000 consecutive samples (the last one may be shorter), exp(mean KL(p(y|x) || p(y))),
  averaged over splits.
* Precision / recall (the improved P&R of Kynkaanniemi et al., ADM's `ManifoldEstimator`, k = 3):
  each set's radii are the squared distance to its k-th nearest neighbour (itself excluded);
  precision = fraction of samples inside some reference ball, recall = fraction of references inside some
  sample ball (`<=`, squared distances). ADM computes distances in float16 and falls back to float32 when
  they overflow; we use float32 (or float16 on request, with the same fallback).

Files: reference batches in ADM's layout (`VIRTUAL_imagenet256_labeled.npz`: `arr_0` uint8 NHWC images,
and optionally the precomputed `mu`, `sigma`, `mu_s`, `sigma_s`), and sample batches in the same layout
(`arr_0` uint8 NHWC, `arr_1` int labels), read and written in batches without loading whole files.
"""

import dataclasses
import functools
import os
import warnings
import zipfile
from typing import Iterable, Iterator, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from bigr_jax import parallel
from bigr_jax.config_sections import PR_K
from bigr_jax.evaluation import inception as inception_lib

IS_SPLIT_SIZE = 5000
PR_BLOCK = 10000  # ADM's row / column batch sizes


# --- Frechet distance ------------------------------------------------------------------------------------

@dataclasses.dataclass
class FIDStatistics:
  """Mean and covariance of a set of activations."""
  mu: np.ndarray
  sigma: np.ndarray

  @classmethod
  def from_activations(cls, activations: np.ndarray) -> "FIDStatistics":
    activations = np.asarray(activations)
    if activations.ndim != 2 or len(activations) < 2:
      raise ValueError(f"need (N >= 2, D) activations for statistics, got shape {activations.shape}")
    return cls(np.mean(activations, axis=0), np.cov(activations, rowvar=False))

  def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
    return frechet_distance(self, other, eps)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  """scipy's sqrtm without its accuracy warnings (ADM passes disp=False, which newer SciPy deprecates)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    warnings.simplefilter("ignore", RuntimeWarning)
    return linalg.sqrtm(matrix)


def frechet_distance(stats1: FIDStatistics, stats2: FIDStatistics, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), as ADM's `FIDStatistics.frechet_distance`."""
  mu1, mu2 = np.atleast_1d(stats1.mu), np.atleast_1d(stats2.mu)
  sigma1, sigma2 = np.atleast_2d(stats1.sigma), np.atleast_2d(stats2.sigma)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the Frechet distance")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# --- Inception Score -------------------------------------------------------------------------------------

def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's IS: class probabilities (N, C) in consecutive splits of `split_size`, mean of exp(E[KL])."""
  probs = np.asarray(probs, np.float64)
  scores = []
  for i in range(0, len(probs), split_size):
    part = probs[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return float(np.mean(scores))


# --- Precision / recall ----------------------------------------------------------------------------------

def _squared_distances(u, v, dtype):
  """max(|u|^2 - 2 u.v + |v|^2, 0) in `dtype` (ADM's `_batch_pairwise_distances`), returned in float32."""
  u, v = u.astype(dtype), v.astype(dtype)
  norm_u = jnp.sum(jnp.square(u), axis=1)[:, None]
  norm_v = jnp.sum(jnp.square(v), axis=1)[None, :]
  d = jnp.maximum(norm_u - 2 * jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST) + norm_v, 0.0)
  return d.astype(jnp.float32)


def _distances(u, v, dtype):
  """Distances in `dtype`, falling back to float32 when any is not finite (as ADM does for float16)."""
  d = _squared_distances(u, v, dtype)
  if dtype == "float32":
    return d
  return jnp.where(jnp.all(jnp.isfinite(d)), d, _squared_distances(u, v, "float32"))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _knn_block(rows, cols, cols_valid, best, k: int, dtype):
  """Merges one column block into the running k+1 smallest distances of each row."""
  d = jnp.where(cols_valid[None, :], _distances(rows, cols, dtype), jnp.inf)
  merged = jnp.concatenate([best, d], axis=1)
  return -jax.lax.top_k(-merged, k + 1)[0]


@functools.partial(jax.jit, static_argnames=("dtype",))
def _inside_block(rows, rows_radii, cols, cols_radii, dtype):
  """(row i inside some column ball, column j inside some row ball) for one block pair."""
  d = _distances(rows, cols, dtype)
  return jnp.any(d <= cols_radii[None, :], axis=1), jnp.any(d <= rows_radii[:, None], axis=0)


def _blocks(x: np.ndarray, block: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(start, padded block, valid mask) over rows; blocks have one static shape."""
  for start in range(0, len(x), block):
    part = x[start:start + block]
    valid = np.ones(block, bool)
    valid[len(part):] = False
    if len(part) < block:
      part = np.concatenate([part, np.zeros((block - len(part),) + part.shape[1:], part.dtype)])
    yield start, part, valid


def _block_size(n: int, block: int) -> int:
  return int(min(block, -(-n // 8) * 8))


def manifold_radii(features: np.ndarray, k: int = PR_K, block: int = PR_BLOCK, dtype="float32") -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in the set (the point itself excluded)."""
  dtype = np.dtype(dtype).name
  features = np.asarray(features, np.float32)
  if len(features) <= k:
    raise ValueError(f"{len(features)} points cannot have a {k}-th nearest neighbour")
  size = _block_size(len(features), block)
  radii = np.zeros(len(features), np.float32)
  for start, rows, rows_valid in _blocks(features, size):
    best = jnp.full((size, k + 1), jnp.inf, jnp.float32)
    for _, cols, cols_valid in _blocks(features, size):
      best = _knn_block(rows, cols, cols_valid, best, k=k, dtype=dtype)
    # Index k of the k+1 smallest: position 0 is the point itself (distance 0), as in ADM.
    radii[start:start + int(rows_valid.sum())] = np.asarray(best[:, k])[rows_valid]
  return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = PR_K, block: int = PR_BLOCK,
                     dtype="float32") -> tuple[float, float]:
  """ADM's improved precision / recall of `samples` against `reference` features (pool_3).

  Returns (precision, recall). `dtype` of the distances: "float32", or "float16" as ADM (float32 fallback).
  """
  dtype = np.dtype(dtype).name
  reference, samples = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
  radii_ref = manifold_radii(reference, k, block, dtype)
  radii_samples = manifold_radii(samples, k, block, dtype)
  size = _block_size(max(len(reference), len(samples)), block)
  ref_inside = np.zeros(len(reference), bool)  # reference point inside some sample ball (recall)
  sample_inside = np.zeros(len(samples), bool)  # sample inside some reference ball (precision)
  # Padded points get radius -1, so no distance (>= 0) is ever within their ball.

  def pad_radii(radii, start):
    return np.concatenate([radii[start:start + size], -np.ones(max(0, start + size - len(radii)), np.float32)])

  for start_r, ref_block, ref_valid in _blocks(reference, size):
    for start_s, sample_block, sample_valid in _blocks(samples, size):
      r_in, s_in = _inside_block(ref_block, pad_radii(radii_ref, start_r), sample_block,
                                 pad_radii(radii_samples, start_s), dtype=dtype)
      ref_inside[start_r:start_r + int(ref_valid.sum())] |= np.asarray(r_in)[ref_valid]
      sample_inside[start_s:start_s + int(sample_valid.sum())] |= np.asarray(s_in)[sample_valid]
  return float(np.mean(sample_inside)), float(np.mean(ref_inside))


# --- ADM .npz batches ------------------------------------------------------------------------------------

def _read_npy_header(f):
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"unsupported .npy version {version}")


def npz_keys(path: str) -> list[str]:
  with zipfile.ZipFile(path) as zf:
    return [name[:-4] for name in zf.namelist() if name.endswith(".npy")]


def npz_array_shape(path: str, key: str = "arr_0") -> tuple[tuple, np.dtype]:
  with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
    shape, _, dtype = _read_npy_header(f)
  return shape, dtype


def iterate_npz_array(path: str, key: str = "arr_0", batch_size: int = 256,
                      limit: Optional[int] = None) -> Iterator[np.ndarray]:
  """Batches of the first axis of `key` in an .npz, streamed (the file is never loaded whole)."""
  with zipfile.ZipFile(path) as zf:
    if f"{key}.npy" not in zf.namelist():
      raise KeyError(f"{path} has no array {key!r}; it holds {npz_keys(path)}")
    with zf.open(f"{key}.npy") as f:
      shape, fortran, dtype = _read_npy_header(f)
      if fortran:
        raise ValueError(f"{path}:{key} is Fortran-ordered; save it C-ordered")
      total = shape[0] if limit is None else min(shape[0], limit)
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      for start in range(0, total, batch_size):
        n = min(batch_size, total - start)
        data = f.read(n * row_bytes)
        if len(data) != n * row_bytes:
          raise ValueError(f"{path}:{key} is truncated at row {start}")
        yield np.frombuffer(data, dtype).reshape((n,) + tuple(shape[1:]))


def check_images(shape, dtype, path: str) -> None:
  if len(shape) != 4 or shape[-1] != 3 or np.dtype(dtype) != np.uint8:
    raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, 3) (ADM layout); got {np.dtype(dtype)} "
                     f"{tuple(shape)}")
  if min(shape[1:3]) < 75:
    raise ValueError(f"{path}: {shape[1]}x{shape[2]} images are too small for Inception (>= 75 px)")


def images_to_uint8(images, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """Float images in `value_range` -> uint8 (rounded, clipped), the layout of ADM sample batches."""
  low, high = value_range
  scaled = (np.asarray(images, np.float32) - low) * (255.0 / (high - low))
  return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def write_sample_batch(path: str, images: np.ndarray, labels: Optional[np.ndarray] = None) -> str:
  """Writes samples in ADM's layout: `arr_0` uint8 (N, H, W, 3) and `arr_1` labels (if given)."""
  with SampleBatchWriter(path, len(images), images.shape[1:3], with_labels=labels is not None) as writer:
    writer.append(images, labels)
  return path


class SampleBatchWriter:
  """Streams a sample batch to an ADM-layout .npz (uint8 images first, labels at close), atomically.

  The total count and image size are fixed up front (they go into the .npy header). Usage:
    with SampleBatchWriter(path, 50000, (256, 256)) as w:
      for images, labels in batches: w.append(images, labels)
  """

  def __init__(self, path: str, num_images: int, image_size, with_labels: bool = True):
    self.path = os.fspath(path)
    self.num_images = int(num_images)
    self.image_size = tuple(image_size) if np.ndim(image_size) else (int(image_size), int(image_size))
    self.with_labels = with_labels
    self.count = 0
    self._labels = []
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._tmp = f"{self.path}.tmp.{os.getpid()}"
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (self.num_images,) + self.image_size + (3,)}
    np.lib.format.write_array_header_2_0(self._member, header)

  def append(self, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (see images_to_uint8), got {images.dtype}")
    if images.shape[1:] != self.image_size + (3,):
      raise ValueError(f"images of shape {images.shape[1:]}; this batch holds {self.image_size + (3,)}")
    if self.count + len(images) > self.num_images:
      raise ValueError(f"{self.count} + {len(images)} images exceed num_images={self.num_images}")
    if self.with_labels != (labels is not None) or (labels is not None and len(labels) != len(images)):
      raise ValueError("labels must be given with every batch (and match it) iff with_labels")
    self._member.write(np.ascontiguousarray(images).tobytes())
    if labels is not None:
      self._labels.append(np.asarray(labels, np.int64))
    self.count += len(images)

  def close(self) -> None:
    if self._zip is None:
      return
    if self.count != self.num_images:
      self._member.close()
      self._zip.close()
      self._zip = None
      os.remove(self._tmp)
      raise ValueError(f"{self.path}: {self.count} of {self.num_images} images written; nothing was saved")
    self._member.close()
    if self.with_labels:
      with self._zip.open("arr_1.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64))
    self._zip.close()
    self._zip = None
    os.replace(self._tmp, self.path)

  def __enter__(self) -> "SampleBatchWriter":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is not None and self._zip is not None:
      self._member.close()
      self._zip.close()
      self._zip = None
      os.remove(self._tmp)
      return
    self.close()


def read_reference_statistics(path: str) -> Optional[tuple[FIDStatistics, FIDStatistics]]:
  """The precomputed (pool, spatial) statistics of an ADM reference batch, or None if it has none."""
  keys = set(npz_keys(path))
  if not {"mu", "sigma"} <= keys:
    return None
  with np.load(path) as data:
    pool = FIDStatistics(data["mu"], data["sigma"])
    spatial = FIDStatistics(data["mu_s"], data["sigma_s"]) if {"mu_s", "sigma_s"} <= keys else None
  return pool, spatial


# --- Inception activations -------------------------------------------------------------------------------

@dataclasses.dataclass
class Activations:
  """Per-image Inception outputs: pool (N, 2048), spatial (N, 2023) and probs (N, 1008), float32."""
  pool: np.ndarray
  spatial: Optional[np.ndarray]
  probs: Optional[np.ndarray]

  def __len__(self) -> int:
    return len(self.pool)


class InceptionRunner:
  """The FID Inception, jitted and batch-sharded over a mesh, on uint8 NHWC image batches.

  Every process passes the same global batches (e.g. read from one .npz); each feeds its own slice.
  """

  def __init__(self, params, mesh, batch_size: int = 200):
    self.mesh = mesh
    self.batch_size = parallel.round_up_to_shards(batch_size, mesh)
    self.params = jax.device_put(params, parallel.replicated(mesh))
    model = inception_lib.FIDInceptionV3()

    def run(params, images):
      out = model.apply({"params": params}, images.astype(jnp.float32) / 255.0)
      return {"pool": out["pool"], "spatial": out["spatial"].reshape(out["spatial"].shape[0], -1),
              "probs": jax.nn.softmax(out["logits_unbiased"], axis=-1)}

    self._run = jax.jit(run, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh, 4)),
                        out_shardings=parallel.batch_sharding(mesh, 2))

  def __call__(self, images: np.ndarray) -> dict:
    """One global batch (n <= batch_size, uint8 NHWC) -> numpy outputs for its n images."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    n = len(images)
    if n > self.batch_size:
      raise ValueError(f"batch of {n} exceeds batch_size={self.batch_size}")
    if n < self.batch_size:
      images = np.concatenate([images, np.zeros((self.batch_size - n,) + images.shape[1:], np.uint8)])
    local = self.batch_size // jax.process_count()
    mine = images[jax.process_index() * local:(jax.process_index() + 1) * local]
    batch = parallel.to_global({"images": mine}, self.mesh)["images"]
    out = multihost_utils.process_allgather(self._run(self.params, batch), tiled=True)
    return {k: np.asarray(v)[:n] for k, v in out.items()}

  def activations(self, batches: Iterable[np.ndarray], *, total: Optional[int] = None, spatial: bool = True,
                  probs: bool = True, log_every: int = 20, name: str = "images") -> Activations:
    """Runs every batch (each at most `batch_size` images) and concatenates the outputs."""
    pool, spatial_out, probs_out, done = [], [], [], 0
    for i, images in enumerate(batches):
      out = self(images)
      pool.append(out["pool"])
      if spatial:
        spatial_out.append(out["spatial"])
      if probs:
        probs_out.append(out["probs"])
      done += len(images)
      if log_every and (i + 1) % log_every == 0:
        print(f"inception: {done}{f' / {total}' if total else ''} {name}", flush=True)
    if not pool:
      raise ValueError(f"no {name} to evaluate")
    return Activations(np.concatenate(pool), np.concatenate(spatial_out) if spatial else None,
                       np.concatenate(probs_out) if probs else None)

  def npz_activations(self, path: str, limit: Optional[int] = None, **kwargs) -> Activations:
    """Activations of `arr_0` of an ADM-layout .npz (the first `limit` images)."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no image batch at {path!r}")
    shape, dtype = npz_array_shape(path, "arr_0")
    check_images(shape, dtype, path)
    total = shape[0] if limit is None else min(limit, shape[0])
    return self.activations(iterate_npz_array(path, "arr_0", self.batch_size, total), total=total,
                            name=os.path.basename(path), **kwargs)


# --- All metrics ---------------------------------------------------------------------------------------

def compute_metrics(reference: Activations, samples: Activations, *,
                    reference_stats: Optional[tuple[FIDStatistics, Optional[FIDStatistics]]] = None,
                    k: int = PR_K, is_split_size: int = IS_SPLIT_SIZE, distance_dtype="float32") -> dict:
  """FID, sFID, IS, precision and recall of `samples` against `reference`, as ADM reports them.

  `reference_stats` replaces the statistics computed from the reference activations (e.g. the file's
  precomputed `mu`/`sigma`); precision / recall always use the reference pool activations.
  """
  pool_ref = FIDStatistics.from_activations(reference.pool)
  spatial_ref = FIDStatistics.from_activations(reference.spatial) if reference.spatial is not None else None
  if reference_stats is not None:
    pool_ref = reference_stats[0]
    spatial_ref = reference_stats[1] if reference_stats[1] is not None else spatial_ref
  out = {"num_samples": len(samples), "num_reference": len(reference)}
  out["fid"] = FIDStatistics.from_activations(samples.pool).frechet_distance(pool_ref)
  if samples.spatial is not None and spatial_ref is not None:
    out["sfid"] = FIDStatistics.from_activations(samples.spatial).frechet_distance(spatial_ref)
  if samples.probs is not None:
    out["inception_score"] = inception_score(samples.probs, is_split_size)
  out["precision"], out["recall"] = precision_recall(reference.pool, samples.pool, k, dtype=distance_dtype)
  return out
