"""The TPU compiler's HBM counter and the project's estimate, on programs whose least HBM traffic is known.

  .venv/bin/python benchmarks/hbm_counter.py

Each toy is compiled for one chip of `v5e:2x2` by libtpu on this host (nothing runs). Per toy: its least traffic
(what it must read and write once), the raw counter (`cost_analysis()["bytes accessed"]`) and the estimate of the
bytes that cross HBM (`bigr_jax/compile/traffic.py`), each as a multiple of the least, and the estimate's parts by
kind. Compiler figures, not measured traffic. Prints one JSON line.
"""

import argparse
import json

import jax
import jax.numpy as jnp

from bigr_jax import chips, config_sections
from bigr_jax.compile import report

M = 2 ** 20
PREFETCHED_WEIGHT = 1024 * 2816 * 4
# name -> (function, argument (shape, dtype)s, bytes it must read and write)
TOYS = {
    "elementwise chain": (lambda x: jnp.sin(x) * 2 + 1, [((16 * M,), "float32")], 2 * 16 * M * 4),
    "adamw-style update": (lambda p, g, m, v: (p - 1e-3 * m / (jnp.sqrt(v) + 1e-8) - 1e-5 * p,
                                               0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g),
                           [((4 * M,), "float32")] * 4, 7 * 4 * M * 4),
    "a slice of a large array": (lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, 1024) * 2,
                                 [((65536, 1024), "bfloat16"), ((), "int32")], 2 * 1024 * 1024 * 2),
    "matmul": (lambda a, b: a @ b, [((4096, 4096), "bfloat16")] * 2, 3 * 4096 * 4096 * 2),
    # A float32 weight used twice: the compiler prefetches it into on-chip memory for the second use.
    "prefetched weight": (lambda w, x: (jnp.sum(jax.nn.gelu(x.astype("bfloat16") @ w.astype("bfloat16"))), w * 0.9),
                          [((1024, 2816), "float32"), ((2048, 1024), "float32")],
                          3 * PREFETCHED_WEIGHT + 2048 * 1024 * 4 + 2),  # + the bfloat16 sum
}


def measure(topology: str = "v5e:2x2") -> dict:
  """{toy: {least_bytes, counter, estimate (both over the least), estimate_by_kind}} on one chip of `topology`."""
  device = chips.target_devices(config_sections.CompileConfig(topology=topology))[0]
  one = jax.sharding.SingleDeviceSharding(device)
  out = {}
  for name, (function, shapes, least) in TOYS.items():
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=one) for shape, dtype in shapes]
    figures = report.Figures.of(jax.jit(function).lower(*args).compile(), 1)
    out[name] = dict(least_bytes=least, counter=round(figures.bytes_accessed / least, 3),
                     estimate=round(figures.hbm_traffic["hbm_bytes"] / least, 3),
                     estimate_by_kind=figures.hbm_traffic["by_kind"])
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x2", help="a TPU topology by libtpu's name; one chip of it")
  return parser


def main():
  args = build_parser().parse_args()
  print(json.dumps(dict(benchmark="hbm_counter", topology=args.topology, kind="TPU compiler figures, not measured",
                        toys=measure(args.topology))))


if __name__ == "__main__":
  main()
