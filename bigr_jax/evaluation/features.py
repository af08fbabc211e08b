"""Average-pooled BiGR features of intermediate layers, written to disk in resumable chunks.

The representation of the paper: the hidden state after one block (before the final norm, class token
dropped; `BiGR.features`) averaged over the image tokens. The condition is the null class by default
(the model sees no label, as a probe on unlabelled images must); `condition="label"` feeds the data's
labels instead.

On-disk layout of one split (`write_features`):

  progress.json          {"format": "bigr_jax_features", "version": 1, "layers": [...], "dim": D,
                          "condition": "null", "batch_size": B, "batches_per_chunk": C,
                          "chunks": k, "count": n, "done": bool}
  features_000000.npy    float32 (m, len(layers), D): the pooled features of chunk 0, layers in order
  labels_000000.npy      int32 (m,)
  ...

A chunk is `batches_per_chunk` batches. Its files are written first and then `progress.json` is
replaced atomically, so after a crash the recorded chunks are complete; a new `write_features` on the
same directory skips the batches they hold and goes on from there.
"""

import itertools
import json
import os
import time
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from bigr_jax import files, parallel
from bigr_jax.config_sections import CONDITIONS
from bigr_jax.models import bigr
from bigr_jax.models.config import GeneratorConfig

FORMAT_NAME = "bigr_jax_features"
FORMAT_VERSION = 1
PROGRESS_FILE = "progress.json"


def resolve_layers(layers: Sequence[int], n_layer: int) -> list[int]:
  """0-based block indices (negative counts from the end; empty: the middle block), sorted, unique."""
  if not layers:
    return [n_layer // 2]
  out = []
  for layer in layers:
    index = int(layer) + n_layer if int(layer) < 0 else int(layer)
    if not 0 <= index < n_layer:
      raise ValueError(f"layer {layer} is out of range for a {n_layer}-layer model (0..{n_layer - 1}, or "
                       "negative from the end)")
    out.append(index)
  return sorted(set(out))


class FeatureExtractor:
  """Jitted mean-pooled features of chosen blocks, batch-sharded over the mesh, params by logical rules.

  Only blocks 0..max(layers) are kept (`bigr.truncate_params`), so a shallow layer costs a shallow model.

  Args:
    model_config: the generator's architecture.
    params: its params (numpy or jax arrays, unboxed), e.g. the EMA params of a checkpoint.
    layers: 0-based blocks whose pooled output to return (see `resolve_layers`).
    mesh: the device mesh (`parallel.make_mesh`); batches are split over its data and fsdp axes.
    condition: "null" (the null class for every image) or "label" (the labels of the batch).
    rules: logical-axis rules (default `parallel.DEFAULT_RULES`).
  """

  def __init__(self, model_config: GeneratorConfig, params, layers: Sequence[int], *, mesh,
               condition: str = "null", rules=None):
    if condition not in CONDITIONS:
      raise ValueError(f"condition={condition!r}; expected one of {CONDITIONS}")
    self.layers = resolve_layers(layers, model_config.n_layer)
    self.condition = condition
    self.mesh = mesh
    self.null_class = model_config.null_class
    # Unboxed: params straight from `bigr.init_params` carry logical-axis boxes, checkpoints do not.
    params = nn.meta.unbox(params)
    self.model_config, params = bigr.truncate_params(model_config, params, max(self.layers))
    self.dim = self.model_config.dim
    self._pooled, shardings = pooled_program(self.model_config, self.layers, mesh, condition, rules)
    self.params = jax.device_put(params, shardings)

  @property
  def batch_shards(self) -> int:
    return parallel.batch_shards(self.mesh)

  def __call__(self, bits, labels) -> jax.Array:
    """Global batch (sharded, or host arrays on one process) -> (B, len(layers), dim) float32.

    With condition "null" the labels are replaced by the null class.
    """
    return self._pooled(self.params, bits, labels)

  def host_batch(self, bits: np.ndarray, labels: np.ndarray, valid: np.ndarray):
    """This host's batch -> (features (B, L, dim), labels (B,), valid (B,)) of every host, gathered.

    Labels and the padding mask travel the same host -> global -> host path as the features, so rows
    stay aligned whatever order the mesh puts the hosts in.
    """
    expected = (self.model_config.seq_len, self.model_config.binary_size)
    if np.shape(bits)[1:] != expected:
      raise ValueError(f"bits of shape {np.shape(bits)[1:]} per example; the model takes {expected} "
                       "(tokens x bits)")
    # Bits travel as uint8 (a quarter of float32's bytes) and become floats on the devices.
    batch = parallel.to_global({"bits": np.asarray(bits, np.uint8), "label": np.asarray(labels, np.int32),
                                "valid": np.asarray(valid, bool)}, self.mesh)
    out = self(batch["bits"], batch["label"])
    gathered = multihost_utils.process_allgather((out, batch["label"], batch["valid"]), tiled=True)
    return tuple(np.asarray(x) for x in gathered)


def pooled_program(model_config: GeneratorConfig, layers: Sequence[int], mesh, condition: str = "null",
                   rules=None):
  """(jitted pooled(params, bits, labels), the params' shardings) for a model already truncated to
  max(layers) + 1 blocks; `FeatureExtractor` runs it, and `--mode=compile` lowers it from shapes."""
  rules = rules if rules is not None else parallel.DEFAULT_RULES
  shardings = parallel.logical_shardings(bigr.param_shapes(model_config), mesh, rules)
  model, layer_list = bigr.BiGR(model_config), tuple(layers)
  null_class, use_null = model_config.null_class, condition == "null"

  def pooled(params, bits, labels):
    if use_null:
      labels = jnp.full_like(labels, null_class)
    with parallel.tracing_on(mesh, rules):
      hidden = model.apply({"params": params}, bits.astype(jnp.float32), labels, layer_list,
                           method=bigr.BiGR.features)
    return jnp.stack([hidden[layer].mean(axis=1) for layer in layer_list], axis=1)

  program = jax.jit(pooled, in_shardings=(shardings, parallel.batch_sharding(mesh, 3), parallel.batch_sharding(mesh, 1)),
                    out_shardings=parallel.batch_sharding(mesh, 3))
  return program, shardings


def batches_from_source(source, batch_size: int, *, start: int = 0, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> Iterator[dict]:
  """Host-local batches of a random-access code source from record `start`, in index order, the last partial.

  Records are `dict(codes=(T, K), label)` (`data.CodesSource`, `data.OriginalCodesSource`, ...). Global
  batch g holds records [start + g * batch_size, start + (g + 1) * batch_size); each host gets its
  contiguous slice.
  Batches are `dict(bits=uint8 (b, T, K), label=int32 (b,), valid=bool (b,))`, `b` the host batch size;
  padded rows of the last batch repeat record 0 and have `valid` False.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by {process_count} hosts")
  local = batch_size // process_count
  num = len(source)
  for batch_start in range(start, num, batch_size):
    first = batch_start + process_index * local
    index = np.arange(first, first + local)
    valid = index < num
    records = [source[int(i)] for i in np.where(valid, index, 0)]
    yield {"bits": np.stack([np.asarray(r["codes"]) for r in records]),
           "label": np.asarray([r["label"] for r in records], np.int32), "valid": valid}


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
  with files.atomic_path(path) as tmp:
    np.save(tmp, array)


def read_progress(directory: str) -> Optional[dict]:
  path = os.path.join(directory, PROGRESS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    progress = json.load(f)
  if progress.get("format") != FORMAT_NAME or progress.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} directory: {progress}")
  return progress


def _pad_batch(batch: Mapping[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(bits, labels, valid) padded to `size` rows (static shapes: one compiled step for every batch)."""
  bits = np.asarray(batch["bits"] if "bits" in batch else batch["codes"])
  if bits.dtype != np.uint8 and bits.dtype != np.bool_ and not np.all((bits == 0) | (bits == 1)):
    raise ValueError(f"bits must be 0 or 1; got values such as {np.unique(bits)[:6]}")
  labels = np.asarray(batch["label"], np.int32)
  valid = np.asarray(batch.get("valid", np.ones(len(labels), bool)), bool)
  n = len(labels)
  if n > size:
    raise ValueError(f"a batch of {n} exceeds the first batch's size {size}; only the last batch may differ")
  if n < size:
    pad = size - n
    bits = np.concatenate([bits, np.zeros((pad,) + bits.shape[1:], bits.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    valid = np.concatenate([valid, np.zeros(pad, bool)])
  return bits, labels, valid


def write_features(extractor: FeatureExtractor,
                   batches: Union[Iterable[Mapping[str, np.ndarray]], Callable[[int], Iterable]],
                   directory: str, *, batches_per_chunk: int = 1, num_examples: Optional[int] = None,
                   log_every_s: float = 30.0, overwrite: bool = False) -> dict:
  """Extracts pooled features of every batch into `directory`, resuming a run that stopped.

  Args:
    extractor: the jitted model (`FeatureExtractor`).
    batches: a callable `start -> iterable of batches` beginning at example `start` (the examples already
      written; e.g. `lambda start: batches_from_source(source, 256, start=start)`), or a plain iterable of
      batches, which a resumed run advances past the finished batches (so keep its batch size when
      resuming). Batches are host-local dicts with `bits` (or `codes`) (b, T, K) in {0, 1} and `label`
      (b,), optionally `valid` (b,) bool for padding rows; every batch but the last has the same size.
    directory: output directory (created); a local or mounted path.
    batches_per_chunk: batches per chunk file; a crash loses at most one chunk.
    num_examples: total examples, for the progress line only.
    log_every_s: seconds between progress lines.
    overwrite: start over even if the directory holds features of another run.

  Returns:
    The final progress record (see the module docstring), on every process once process 0 has written them.
  """
  os.makedirs(directory, exist_ok=True)
  layout = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": list(extractor.layers),
            "dim": extractor.dim, "condition": extractor.condition, "batches_per_chunk": int(batches_per_chunk)}
  progress = None if overwrite else read_progress(directory)
  if progress is not None:
    old = {k: progress.get(k) for k in layout}
    if old != layout:
      raise ValueError(f"{directory} holds features of another run {old}; asked for {layout}. Use another "
                       "directory or overwrite=True.")
    if progress["done"]:
      print(f"features in {directory} are complete ({progress['count']} examples)", flush=True)
      return progress
    print(f"resuming features in {directory} after {progress['chunks']} chunks ({progress['count']} examples)",
          flush=True)
  else:
    progress = {**layout, "batch_size": None, "chunks": 0, "count": 0, "done": False}
  if callable(batches):
    iterator = iter(batches(progress["count"]))
  else:
    iterator = itertools.islice(iter(batches), progress["chunks"] * batches_per_chunk, None)

  is_writer = jax.process_index() == 0
  if is_writer:
    files.write_json(os.path.join(directory, PROGRESS_FILE), progress)
  batch_size = progress["batch_size"]
  pending_features, pending_labels = [], []
  started, last_log, done_here = time.perf_counter(), time.perf_counter(), 0

  def flush(final: bool):
    nonlocal pending_features, pending_labels
    if pending_features:
      index = progress["chunks"]
      feats, labels = np.concatenate(pending_features), np.concatenate(pending_labels)
      if is_writer:
        _save_npy_atomic(os.path.join(directory, f"features_{index:06d}.npy"), feats)
        _save_npy_atomic(os.path.join(directory, f"labels_{index:06d}.npy"), labels)
      progress["chunks"] += 1
      progress["count"] += len(labels)
      pending_features, pending_labels = [], []
    progress["done"] = final
    if is_writer:
      files.write_json(os.path.join(directory, PROGRESS_FILE), progress)

  batches_in_chunk = 0
  for batch in iterator:
    if batch_size is None:
      batch_size = progress["batch_size"] = len(batch["label"])
    elif len(batch["label"]) > batch_size:
      raise ValueError(f"batches of {len(batch['label'])} in {directory}, begun with batches of {batch_size}; "
                       "resume with the same batch size")
    bits, labels, valid = _pad_batch(batch, batch_size)
    feats, all_labels, keep = extractor.host_batch(bits, labels, valid)
    pending_features.append(feats[keep])
    pending_labels.append(all_labels[keep])
    done_here += int(keep.sum())
    batches_in_chunk += 1
    if batches_in_chunk == batches_per_chunk:
      flush(final=False)
      batches_in_chunk = 0
    now = time.perf_counter()
    if now - last_log >= log_every_s:
      rate = done_here / (now - started)
      total = progress["count"] + sum(len(l) for l in pending_labels)
      eta = f", eta {(num_examples - total) / rate / 60:.1f} min" if num_examples and rate > 0 else ""
      print(f"features: {total}{f' / {num_examples}' if num_examples else ''} examples, {rate:.1f} examples/s{eta}",
            flush=True)
      last_log = now
  flush(final=True)
  parallel.wait_for_every_process(f"features written: {directory}")  # every process may read them next
  elapsed = time.perf_counter() - started
  print(f"features: done, {progress['count']} examples in {directory} "
        f"({done_here / max(elapsed, 1e-9):.1f} examples/s this run)", flush=True)
  return progress


def load_features(directory: str, allow_partial: bool = False) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """Reads a features directory -> ({layer: float32 (N, dim)}, labels int32 (N,))."""
  progress = read_progress(directory)
  if progress is None:
    raise FileNotFoundError(f"no features at {directory!r} ({PROGRESS_FILE} is missing); run extract_features")
  if not progress["done"] and not allow_partial:
    raise ValueError(f"{directory}: the extraction stopped after {progress['count']} examples; run it again "
                     "to resume, or pass allow_partial=True")
  chunks = range(progress["chunks"])
  feats = [np.load(os.path.join(directory, f"features_{i:06d}.npy")) for i in chunks]
  labels = [np.load(os.path.join(directory, f"labels_{i:06d}.npy")) for i in chunks]
  dim = progress["dim"]
  stacked = np.concatenate(feats) if feats else np.zeros((0, len(progress["layers"]), dim), np.float32)
  return ({layer: stacked[:, i] for i, layer in enumerate(progress["layers"])},
          np.concatenate(labels) if labels else np.zeros((0,), np.int32))
