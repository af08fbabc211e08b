"""The train-step benchmark runs end to end and reports what its docstring promises."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_train_step_benchmark_reports_time_and_flops():
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "train_step.py", "--configs=runlocal", "--repeats=2", "--turn_s=0"],
                       cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  run = result["runs"]["runlocal"]["jax"]
  assert run["config"]["scan_layers"] is False and run["config"]["seq_len"] == 16
  assert len(run["step_s_all"]) == 2 and run["step_s"] > 0
  flops = run["flops"]
  assert flops["terms_sum_matches"]
  # Compiled FLOPs of the timed step against the analytic count (elementwise work adds a little at this size).
  assert 1.0 <= flops["compiled_over_analytic"] <= 1.15, flops
  assert "speedup" not in result["runs"]["runlocal"]  # no original without --original


def test_compiler_estimate_benchmark_shows_what_the_readme_says():
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "compiler_estimate.py", "--attention_batches=1,2",
                        "--config=../configs/bigr_l.py:runlocal", "--per_chip=2", "--blocks=1"],
                       cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  xla_1, xla_2 = (result["attention"][f"xla, batch {b}"]["optimal_seconds"] for b in (1, 2))
  assert 0 < xla_1 and 1.8 < xla_2 / xla_1 < 2.2  # xla attention: positive, in step with the batch
  splash_2 = result["attention"]["splash, batch 2"]
  assert splash_2["optimal_seconds"] < -1 and 0 < splash_2["fraction_above_whole_seconds"] < 1e-3
  assert list(result["train_step"]) == ["1 blocks unrolled", "1 blocks scanned"]
  assert all(step["flops"] > 0 for step in result["train_step"].values())
