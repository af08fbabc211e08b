"""Evaluation throughput: FID Inception and pooled-feature extraction; prints one JSON line.

  .venv/bin/python benchmarks/evaluation.py [--batch=8] [--repeats=3] [--image_size=256] [--models=small,L]

The Inception runs on uint8 images of `image_size` (resized to 299 inside, as for ADM batches) through
`adm_metrics.InceptionRunner`; features run `features.FeatureExtractor.host_batch` (host batch in, pooled
features out) for the middle block of each model: `small` is the `runlocal` size, `L` is BiGR-L (24 x 1024,
256 tokens, truncated to blocks 0..12). Weights are random (drawn with numpy: speed does not depend on them);
float32; times exclude compilation, reported separately. All devices form one data-parallel mesh.
"""

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from bigr_jax import parallel
from bigr_jax.evaluation import features, inception, adm_metrics
from bigr_jax.models import bigr
from bigr_jax.models.config import MODEL_SIZES, GeneratorConfig

MODELS = {
    "small": GeneratorConfig(dim=64, n_layer=2, n_head=4, denoise_hidden_dim=64, num_block_mlp=2, block_size=16,
                             seq_len=16, num_classes=10),
    "L": GeneratorConfig(binary_size=24, **MODEL_SIZES["L"]),
}


def _random_params(shapes, seed: int = 0):
  """Numpy draws of the right shapes (no init compile): ones for norm scales, small normals elsewhere."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "weight") or name.endswith("var"):
      return np.ones(leaf.shape, np.float32)
    return (rng.standard_normal(leaf.shape) * 0.02).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))


def _time(fn, repeats: int):
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return first, best


def bench_inception(mesh, batch: int, image_size: int, repeats: int) -> dict:
  runner = adm_metrics.InceptionRunner(_random_params(inception.param_shapes()), mesh, batch)
  images = np.random.default_rng(0).integers(0, 256, (runner.batch_size, image_size, image_size, 3), np.uint8)
  first, best = _time(lambda: runner(images), repeats)
  return {"image_size": image_size, "batch": runner.batch_size, "images_per_s": round(runner.batch_size / best, 3),
          "s_per_batch": round(best, 4), "first_call_s": round(first, 2)}


def bench_features(name: str, mesh, batch: int, repeats: int) -> dict:
  config = MODELS[name]
  layer = config.n_layer // 2
  params = _random_params(bigr.param_shapes(config))
  extractor = features.FeatureExtractor(config, params, [layer], mesh=mesh)
  shards = extractor.batch_shards
  batch = -(-batch // shards) * shards
  rng = np.random.default_rng(0)
  bits = (rng.random((batch, config.seq_len, config.binary_size)) < 0.5).astype(np.uint8)
  labels, valid = np.zeros(batch, np.int32), np.ones(batch, bool)
  first, best = _time(lambda: extractor.host_batch(bits, labels, valid), repeats)
  return {"layer": layer, "blocks_run": layer + 1, "dim": config.dim, "tokens": config.seq_len, "batch": batch,
          "images_per_s": round(batch / best, 3), "s_per_batch": round(best, 4), "first_call_s": round(first, 2)}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--models", default="small,L")
  return parser


def main():
  args = build_parser().parse_args()
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  result = {"inception": bench_inception(mesh, args.batch, args.image_size, args.repeats),
            "features": {name: bench_features(name, mesh, args.batch, args.repeats)
                         for name in args.models.split(",") if name}}
  print(json.dumps({
      "benchmark": "evaluation", "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
      "num_devices": jax.device_count(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "dtype": "float32", **result}))


if __name__ == "__main__":
  main()
