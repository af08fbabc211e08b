"""B-AE encode / decode throughput; prints one JSON line.

  .venv/bin/python benchmarks/tokenizer.py [--batch=1] [--repeats=3] [--models=d24,small]

`d24` is the released d24 architecture at 256 px (random weights, float32), `small` the `runlocal` size.
Encoding samples bits (the generator's training path); times exclude compilation, reported separately.
"""

import argparse
import json
import os
import platform
import time

import jax

from bigr_jax.models import tokenizer
from bigr_jax import trees

MODELS = {
    "d24": tokenizer.TokenizerConfig(codebook_size=24, img_size=256),
    "small": tokenizer.TokenizerConfig(codebook_size=24, img_size=32, nf=32, ch_mult=(1, 1, 2, 2), res_blocks=1,
                                       attn_resolutions=(4,), emb_dim=32),
}


def _time(fn, *args, repeats: int):
  """(first call seconds, which includes compilation; best of `repeats` later calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return first, best


def bench(config: tokenizer.TokenizerConfig, batch: int, repeats: int) -> dict:
  model = tokenizer.BinaryAutoEncoder(config)
  params = jax.jit(tokenizer.init_params, static_argnums=0)(config, jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (batch, config.img_size, config.img_size, config.n_channels))
  encode = jax.jit(lambda p, x, key: model.apply({"params": p}, x, method=model.encode, rngs={"sample": key})[1])
  decode = jax.jit(lambda p, bits: model.apply({"params": p}, bits, method=model.decode))
  encode_first, encode_best = _time(encode, params, images, jax.random.key(2), repeats=repeats)
  decode_first, decode_best = _time(decode, params, encode(params, images, jax.random.key(3)), repeats=repeats)
  return {
      "img_size": config.img_size, "bits": config.codebook_size, "batch": batch,
      "params": trees.count_params(params),
      "encode_images_per_s": round(batch / encode_best, 3), "decode_images_per_s": round(batch / decode_best, 3),
      "encode_s_per_batch": round(encode_best, 4), "decode_s_per_batch": round(decode_best, 4),
      "encode_first_call_s": round(encode_first, 2), "decode_first_call_s": round(decode_first, 2),
  }


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--models", default="d24,small")
  return parser


def main():
  args = build_parser().parse_args()
  results = {name: bench(MODELS[name], args.batch, args.repeats) for name in args.models.split(",")}
  print(json.dumps({
      "benchmark": "tokenizer", "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "dtype": "float32", "results": results,
  }))


if __name__ == "__main__":
  main()
