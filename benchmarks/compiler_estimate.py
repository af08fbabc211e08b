"""The TPU compiler's own time estimate (`cost_analysis()["optimal_seconds"]`), and why `--mode=compile` does
not report it.

  .venv/bin/python benchmarks/compiler_estimate.py             # attention, then BiGR-L's step at 1, 2, 4 blocks
  .venv/bin/python benchmarks/compiler_estimate.py --blocks=    # attention only (seconds)

Compiled by libtpu for a v5e topology from this host (nothing runs on a TPU). Two kinds of program:
- the model's attention (`bigr_jax.models.attention`, `xla` and Pallas `splash`: bfloat16, 16 heads of 64, 257
  tokens) on one chip, at several batch sizes;
- the generator's train step of `--config` at `--per_chip` images per chip on `--topology`, its blocks unrolled
  at each of `--blocks`, and scanned at the last.
For each it prints the estimate, its part above the whole seconds (`optimal_seconds - floor(optimal_seconds)`),
and the compiled FLOPs. The estimate falls by whole seconds, as if each op the compiler cannot cost counted
-1 s, and nothing says which ops those are; so neither the estimate nor a sum of parts' estimates by trip count
is a step time. Prints one JSON line; progress on stderr.
"""

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp

from bigr_jax import chips, config_sections, parallel
from bigr_jax.compile import report
from bigr_jax.families import generator
from bigr_jax.typed_config import load_config_file
from bigr_jax.models.attention import ATTENTION


def estimate(compiled) -> dict:
  cost = report.cost_analysis(compiled)
  seconds = float(cost["optimal_seconds"])
  return dict(optimal_seconds=seconds, fraction_above_whole_seconds=seconds - math.floor(seconds),
              flops=float(cost.get("flops", 0.0)))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--attention_batches", default="1,2,16,64")
  parser.add_argument("--config", default="configs/bigr_l.py:tpu=v5e")
  parser.add_argument("--per_chip", type=int, default=16)
  parser.add_argument("--blocks", default="1,2,4", help="comma-separated; empty: no train step")
  return parser


def main():
  args = build_parser().parse_args()
  devices = chips.target_devices(config_sections.CompileConfig(topology=args.topology))
  results = dict(attention={}, train_step={})
  one_chip = jax.sharding.SingleDeviceSharding(devices[0])
  for kind in ("xla", "splash"):
    for batch in (int(b) for b in args.attention_batches.split(",") if b):
      qkv = [jax.ShapeDtypeStruct((batch, 257, 16, 64), jnp.bfloat16, sharding=one_chip)] * 3
      name = f"{kind}, batch {batch}"
      results["attention"][name] = estimate(jax.jit(ATTENTION[kind]).lower(*qkv).compile())
      print("# attention,", name, results["attention"][name], file=sys.stderr, flush=True)
  config = load_config_file(args.config)
  blocks = [int(b) for b in args.blocks.split(",") if b]
  mesh = parallel.make_mesh(config.mesh, devices)
  runs = [(n, False) for n in blocks] + ([(blocks[-1], True)] if blocks else [])
  for n, scan in runs:
    lower = generator.generator_train_step(generator.with_model(config, n_layer=n, scan_layers=scan), mesh,
                                     args.per_chip * len(devices))
    name = f"{n} blocks {'scanned' if scan else 'unrolled'}"
    results["train_step"][name] = estimate(lower().compile())
    print("#", name, results["train_step"][name], file=sys.stderr, flush=True)
  print(json.dumps(dict(benchmark="compiler_estimate", topology=args.topology, config=args.config,
                        per_chip=args.per_chip, kind="TPU compiler figures, not measured", **results)))


if __name__ == "__main__":
  main()
