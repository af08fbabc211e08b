"""Generator training throughput (images/s) on this machine, the way the training loop feeds the step.

  .venv/bin/python benchmarks/train_throughput.py                        # demo generator and BiGR-L at 4 layers
  .venv/bin/python benchmarks/train_throughput.py --models=L --layers=8 --batch=16 --steps=5

`demo` is configs/demo.py's generator (its model, optimizer and batch); `L` is configs/bigr_l.py with
`--layers` blocks, `--dtype` compute (float32 by default: bf16 matmuls are slow on most CPUs) and `--batch`.
Each step gets a fresh host batch of random codes placed with `parallel.to_global`, as the loop does; the
time covers `--steps` steps after one warm-up step (compilation is reported apart). Prints one JSON line.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax

from bigr_jax import parallel
from bigr_jax.typed_config import load_config_file
from bigr_jax.models import bigr
from bigr_jax.train.generator_trainer import GeneratorTrainer
from bigr_jax import trees
from train_step import random_batch  # benchmarks/train_step.py (scripts run from their folder)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")


def log(*args):
  print("#", *args, file=sys.stderr, flush=True)


def train_config(name: str, args):
  if name == "demo":
    config = load_config_file(os.path.join(CONFIG_DIR, "demo.py")).generator
  elif name == "L":
    config = load_config_file(os.path.join(CONFIG_DIR, "bigr_l.py"))
    config.model.update(n_layer=args.layers, dtype=args.dtype)
    config.batch_size = args.batch
  else:
    raise ValueError(f"unknown model {name!r}: use demo or L")
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return config


def bench(name: str, args) -> dict:
  config = train_config(name, args)
  mesh = parallel.make_mesh(config.mesh)
  batch = parallel.batch_size_per_process(config.batch_size, mesh)
  trainer = GeneratorTrainer(config, mesh, total_steps=1000)
  batches = [random_batch(config.model, batch, seed) for seed in range(args.steps + 1)]
  start = time.perf_counter()
  compiled = trainer.train_step.lower(trainer.abstract_state, parallel.to_global(batches[0], mesh),
                                     jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  state = trainer.init(jax.random.key(0))
  key = jax.random.key(1)
  state, metrics = compiled(state, parallel.to_global(batches[0], mesh), key)
  jax.block_until_ready(metrics)
  steps = []
  start = time.perf_counter()
  for host in batches[1:]:
    tick = time.perf_counter()
    state, metrics = compiled(state, parallel.to_global(host, mesh), key)
    jax.block_until_ready(metrics["loss"])  # as the loop does when it logs; keeps per-step times honest
    steps.append(time.perf_counter() - tick)
  total = time.perf_counter() - start
  model = trainer.model_config
  result = dict(
      model={k: getattr(model, k) for k in ("dim", "n_layer", "n_head", "denoise_hidden_dim", "num_block_mlp",
                                            "binary_size", "seq_len", "dtype", "scan_layers", "remat_policy")},
      params=trees.count_params(state.params), batch=batch, steps=args.steps, compile_s=round(compile_s, 2),
      images_per_s=round(batch * args.steps / total, 3), step_s_median=round(statistics.median(steps), 4),
      step_s_all=[round(s, 4) for s in steps],
      train_gflops_per_s=round(bigr.train_flops_per_image(model) * batch * args.steps / total / 1e9, 2),
      final_loss=round(float(metrics["loss"]), 4), load_avg=os.getloadavg()[0])
  log(f"{name}: {result}")
  return result


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="demo,L", help="comma-separated, of demo, L")
  parser.add_argument("--layers", type=int, default=4, help="blocks of L")
  parser.add_argument("--batch", type=int, default=4, help="global batch of L (demo uses its config's)")
  parser.add_argument("--dtype", default="float32", help="compute dtype of L")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
  return parser


def main():
  args = build_parser().parse_args()
  result = dict(benchmark="train_throughput", backend=jax.default_backend(), devices=jax.device_count(),
                cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                load_avg_start=os.getloadavg()[0],
                note="wall-clock images/s on this (possibly shared) machine, compilation excluded", models={})
  for name in args.models.split(","):
    result["models"][name] = bench(name, args)
  result["load_avg_end"] = os.getloadavg()[0]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
