"""Scalability at small scale: generators of several widths trained for equal steps on one demo workdir's codes,
each scored for generation (FD, recall, class accuracy against the real digits, with the B-AE ceiling and the real
floor) and for representation (the linear probe of every block; the best). Prints one JSON line.

  .venv/bin/python benchmarks/scaling.py --config=configs/demo.py --workdir=workdir/demo
  .venv/bin/python benchmarks/scaling.py --config=configs/mnist.py --workdir=workdir/mnist --dims=64,128,256 --seeds=0,1

The workdir must hold a finished demo (its tokenizer and codes: `python -m bigr_jax.main --config=... --workdir=...`).
Each generator trains in <workdir>/scaling/dim<D>_seed<S> with the config's generator settings but `model.dim` = D,
`n_head` = D / 32 and the transcoder's width = D, for `--steps` (default: the config's); a rerun resumes or reuses
finished ones. Sampling is the config's (`generator.sample`). Samples and features come from the EMA weights: with
the demo's EMA decay of 0.999, fewer than ~3,000 steps leave much of the initialisation in them (0.999^1500 = 22%).
"""

import argparse
import json
import pathlib
import platform
import sys
import time

import jax

from bigr_jax import evaluation, typed_config
from bigr_jax.families import demo
from bigr_jax.sampling import drawing
from bigr_jax.train import generator_trainer

HEAD_DIM = 32


def log(*args):
  print("#", *args, file=sys.stderr, flush=True)


def scale(config, workdir: pathlib.Path, dim: int, seed: int, steps: int):
  """The demo's generator stage at width `dim`, trained with `seed` (for `steps` steps; 0: the config's), in its
  own directory."""
  gen, _ = demo.generator_stage(config, workdir)
  gen.total_steps = steps or gen.total_steps
  gen.model.update(dim=dim, n_head=dim // HEAD_DIM, denoise_hidden_dim=dim)
  gen.seed = seed
  gen.sample.seed = seed
  gen.evaluation.layers = tuple(range(gen.model.n_layer))
  return gen, workdir / "scaling" / f"dim{dim}_seed{seed}"


def measure(config, workdir: pathlib.Path, report, dim: int, seed: int, steps: int) -> dict:
  gen, run_dir = scale(config, workdir, dim, seed, steps)
  start = time.perf_counter()
  state = generator_trainer.train_and_evaluate(gen, str(run_dir))
  train_s = time.perf_counter() - start
  params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  drawn = drawing.draw_samples(gen, str(run_dir))
  samples = report.samples(drawn.images, drawn.labels)
  probe = evaluation.features_and_probe(gen, str(run_dir))
  return {"dim": dim, "seed": seed, "params": params, "steps": int(gen.total_steps), "train_s": round(train_s, 1),
          "fd": samples["fd"], "recall": samples["recall"], "precision": samples["precision"],
          "class_accuracy": samples["class_accuracy"], "best_block": int(probe["best_layer"]),
          "best_probe_top1": probe["best_top1"],
          "probe_top1_by_block": {str(k): v["top1"] for k, v in probe["layers"].items()}}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dims", default="64,128,256")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--steps", type=int, default=0, help="training steps of each size (0: the config's)")
  return parser


def main():
  args = build_parser().parse_args()
  config = typed_config.load_config_file(args.config)
  workdir = pathlib.Path(args.workdir)
  if not (workdir / "tokenizer" / "codes" / "test").is_dir():
    raise SystemExit(f"{workdir} holds no finished demo (tokenizer/codes/test): run the demo there first")
  dims = [int(d) for d in args.dims.split(",")]
  bad = [d for d in dims if d % HEAD_DIM]
  if bad:
    raise SystemExit(f"--dims {bad}: each width must be a multiple of {HEAD_DIM} (the head size)")
  report = demo.quality_report(config, workdir)
  labels = drawing.sample_settings(config.generator.sample)[1].class_labels(config.generator.model.num_classes)
  rows = []
  for seed in (int(s) for s in args.seeds.split(",")):
    for dim in dims:
      log(f"dim {dim}, seed {seed}")
      rows.append(measure(config, workdir, report, dim, seed, args.steps))
      log(json.dumps(rows[-1]))
  print(json.dumps({"benchmark": "scaling", "config": args.config, "workdir": str(workdir), "rows": rows,
                    "ceiling": report.ceiling(labels), "floor": report.floor(labels),
                    "host": platform.node(), "machine": platform.machine()}))


if __name__ == "__main__":
  main()
