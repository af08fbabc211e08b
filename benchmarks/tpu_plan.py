"""The shipped configs on the README's TPU slices, by the TPU compiler: HBM per chip, time bounds, chip-hours.

  .venv/bin/python benchmarks/tpu_plan.py                                 # every config on every slice (hours)
  .venv/bin/python benchmarks/tpu_plan.py --configs=bigr_l.py,bigr_xxl.py --slices=v5e-32
  .venv/bin/python benchmarks/tpu_plan.py --configs=bae_d32.py:chips=16 --slices=v5p-32  # a B-AE on 16 chips

Each (config, slice) is one `python -m bigr_jax.main --mode=compile` in a subprocess (libtpu's compiler on this
host, nothing allocated), at the config's own batch and mesh (`--set` adds overrides to every run, e.g.
--set=--config.mesh.fsdp=-1,--config.mesh.data=1). From its report, per slice:
- per-chip HBM peak and whether it fits; the compute, HBM and interconnect bounds of one train step, and the
  resulting upper bound on MFU, with the HBM bound both from the compiler's raw counter and from the estimate of
  the bytes that cross HBM (`bigr_jax/compile/traffic.py`), and where that estimate goes;
- chip-hours per ImageNet epoch (1,281,167 images) at that bound;
- for generators, the sampler at the config's sample settings (BiGR-L: 20 iterations, cfg 2.5, 100
  diffusion steps): images/s per chip at its bound, and chip-hours for FID-50k.
These are compiler figures and lower bounds on time (so upper bounds on speed), not measured times. Prints a
progress line per run on stderr and one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
SLICES = {"v5e-32": "v5e:4x8", "v4-32": "v4:2x2x4", "v5p-32": "v5p:2x2x4", "v6e-16": "v6e:4x4", "v5e-8": "v5e:2x4",
          "v5p-8": "v5p:2x2x1"}
CONFIGS = ("bigr_l.py", "bigr_xl.py", "bigr_xxl.py", "bigr_l_512.py", "bae_d24.py", "bae_d32.py", "bae_d32_512.py")
IMAGENET_TRAIN = 1_281_167
FID_SAMPLES = 50_000


def log(*args):
  print("#", *args, file=sys.stderr, flush=True)


def plan(report: dict) -> dict:
  """The per-slice figures from one `--mode=compile` report."""
  chips = report["chips"]
  out = dict(chips=chips, chip=report["chip"], mesh=report["mesh"], suggestions=report["suggestions"])
  for program in report["programs"]:
    name = program["program"]
    if "hbm_bytes" not in program:
      out[name] = dict(fits=False, compiler_error=program["compiler_error"])
      continue
    bounds = program["bounds"]
    entry = dict(fits=program["fits"], hbm_peak_gib=round(program["hbm_bytes"]["peak"] / 2 ** 30, 3),
                 **{k: bounds[k] for k in ("compute_s", "hbm_s", "interconnect_s", "step_s", "mfu_upper_bound",
                                           "hbm_estimate_s", "step_estimate_s", "mfu_upper_bound_by_estimate")},
                 hbm_estimate_gb_by_source={g: round(b / 1e9, 3) for g, b in
                                            program["hbm_traffic_per_chip"]["by_source"].items()})
    if name == "train_step":
      entry["chip_hours_per_imagenet_epoch"] = IMAGENET_TRAIN / program["global_batch"] * bounds["step_s"] * chips / 3600
    if name == "sample":
      per_chip = program["global_batch"] / bounds["step_s"] / chips
      entry.update(images_per_s_per_chip=per_chip, chip_hours_fid50k=FID_SAMPLES / per_chip / 3600)
    out[name] = entry
  return out


def compile_one(config: str, slice_name: str, extra: list, timeout: int) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, "-m", "bigr_jax.main", f"--config=configs/{config}", f"--workdir={workdir}",
               "--mode=compile", f"--config.compile.topology={SLICES[slice_name]}", *extra]
    start = time.perf_counter()
    try:
      proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
      return dict(error=f"timed out after {timeout} s")
    seconds = round(time.perf_counter() - start)
    path = os.path.join(workdir, "compile.json")
    if not os.path.exists(path):
      return dict(error=(proc.stdout + proc.stderr).strip().splitlines()[-1][:500], seconds=seconds)
    with open(path) as f:
      return dict(plan(json.load(f)), seconds=seconds)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated files in configs/ (with :args)")
  parser.add_argument("--slices", default=",".join(SLICES), help=f"comma-separated, of {list(SLICES)}")
  parser.add_argument("--set", default="", help="comma-separated --config.* overrides for every run")
  parser.add_argument("--timeout", type=int, default=7200, help="seconds per compile run")
  return parser


def main():
  args = build_parser().parse_args()
  extra = [s for s in args.set.split(",") if s]
  results = {}
  for config in args.configs.split(","):
    for slice_name in args.slices.split(","):
      log(f"{config} on {slice_name} ({SLICES[slice_name]}) ...")
      results.setdefault(config, {})[slice_name] = result = compile_one(config, slice_name, extra, args.timeout)
      log(json.dumps(result))
  print(json.dumps(dict(benchmark="tpu_plan", overrides=extra, kind="TPU compiler figures and bounds, not measured",
                        results=results)))


if __name__ == "__main__":
  main()
