"""Ahead-of-time compile plan of the generator train step: per-device memory and compile time on fake meshes.

  .venv/bin/python benchmarks/compile_plan.py                              # L, XL, XXL on 8 and 32 devices
  .venv/bin/python benchmarks/compile_plan.py --models=L,XL --devices=8,32 --per_device_batch=4

For each device count N one subprocess runs with XLA_FLAGS=--xla_force_host_platform_device_count=N (set
before jax is imported) and, for each model (configs/bigr_{l,xl,xxl}.py: bf16 compute, their remat policy),
lowers and compiles `GeneratorTrainer.train_step` on the mesh data=1, fsdp=N, tensor=1 from ShapeDtypeStructs
carrying the state and batch shardings: no parameter is allocated. Reports `compiled.memory_analysis()` per
device (arguments = params + EMA + AdamW moments + batch, outputs, temporaries), lower / compile seconds, and
the ratio of per-device argument bytes between the smallest and largest mesh (ideal: their device-count
ratio). The CPU compiler's temporaries and schedule differ from a TPU's or GPU's; argument and output sizes
do not. Prints one JSON line; per-model progress on stderr.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

MODEL_CONFIGS = {"L": "bigr_l.py", "XL": "bigr_xl.py", "XXL": "bigr_xxl.py", "L-512": "bigr_l_512.py"}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
GIB = 2.0 ** 30


def log(*args):
  print("#", *args, file=sys.stderr, flush=True)


_COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter|all-to-all)\(")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1, "f16": 2, "s8": 1, "u8": 1}


def collectives(hlo_text: str) -> dict:
  """Per kind: how many collectives the compiled HLO holds and the largest result shape (a loop body once).

  An all-reduce whose shape leads with the global batch is a sign that activations are not batch-sharded.
  """
  out = {}
  for dtype, dims, kind in _COLLECTIVE.findall(hlo_text):
    shape = [int(d) for d in dims.split(",") if d]
    size = _BYTES.get(dtype, 4)
    for d in shape:
      size *= d
    entry = out.setdefault(kind, dict(count=0, largest=None, largest_mib=0.0))
    entry["count"] += 1
    if size / 2.0 ** 20 > entry["largest_mib"]:
      entry.update(largest=f"{dtype}[{dims}]", largest_mib=round(size / 2.0 ** 20, 2))
  return out


def compile_one(name: str, num_devices: int, per_device_batch: int) -> dict:
  """Lowers and compiles one model's train step on the fake mesh; nothing is allocated."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bigr_jax import parallel  # pylint: disable=import-outside-toplevel
  from bigr_jax.config_lib import load_config_file  # pylint: disable=import-outside-toplevel
  from bigr_jax.train.generator import GeneratorTrainer  # pylint: disable=import-outside-toplevel

  config = load_config_file(os.path.join(CONFIG_DIR, MODEL_CONFIGS[name]))
  config.mesh.update(data=1, fsdp=num_devices, tensor=1)
  mesh = parallel.make_mesh(config.mesh)
  batch = per_device_batch * num_devices if per_device_batch > 0 else config.batch_size
  start = time.perf_counter()
  trainer = GeneratorTrainer(config, mesh, total_steps=1000)
  model = trainer.model_config
  lowered = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(batch), jax.random.key(0))
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  leaves = jax.tree_util.tree_leaves(trainer.abstract_state)
  state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  # What each device holds of the state under the shardings (replicated leaves count in full).
  held = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainer.abstract_state.params))
  result = dict(
      model=name, devices=num_devices, mesh=dict(mesh.shape), global_batch=batch, dtype=model.dtype,
      remat_policy=model.remat_policy, n_layer=model.n_layer, params=params,
      lower_s=round(lower_s, 2), compile_s=round(compile_s, 2),
      argument_gib=round(mem.argument_size_in_bytes / GIB, 4), output_gib=round(mem.output_size_in_bytes / GIB, 4),
      temp_gib=round(mem.temp_size_in_bytes / GIB, 4), alias_gib=round(mem.alias_size_in_bytes / GIB, 4),
      state_gib_total=round(state_bytes / GIB, 4), state_gib_per_device_ideal=round(state_bytes / num_devices / GIB, 4),
      state_gib_per_device_sharded=round(held / GIB, 4),
      peak_gib_estimate=round((mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                               + mem.temp_size_in_bytes) / GIB, 4),
      collectives=collectives(compiled.as_text()))
  return result


def worker(args) -> None:
  """Runs in a subprocess whose XLA_FLAGS fix the fake device count; one JSON line per model."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.device_count() != args.num_devices:
    raise SystemExit(f"expected {args.num_devices} devices, got {jax.device_count()}; is XLA_FLAGS overridden?")
  for name in args.models.split(","):
    try:
      result = compile_one(name, args.num_devices, args.per_device_batch)
    except Exception as e:  # pylint: disable=broad-except
      result = dict(model=name, devices=args.num_devices, error=f"{type(e).__name__}: {e}"[:500])
    log(json.dumps(result))
    print(json.dumps(result), flush=True)


def run_mesh(num_devices: int, args) -> list:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  command = [sys.executable, os.path.abspath(__file__), "--worker", f"--num_devices={num_devices}",
             f"--models={args.models}", f"--per_device_batch={args.per_device_batch}"]
  log(f"{num_devices} devices: {' '.join(command[1:])}")
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
                          timeout=args.timeout, check=False)
    out, status = proc.stdout, f"exit {proc.returncode}"
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    status = f"timed out after {args.timeout} s"
  results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  done = {r["model"] for r in results}
  for name in args.models.split(","):
    if name not in done:
      results.append(dict(model=name, devices=num_devices, error=f"not reached ({status})"))
  log(f"{num_devices} devices: {status} in {time.perf_counter() - start:.0f} s")
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="L,XL,XXL", help=f"comma-separated, of {sorted(MODEL_CONFIGS)}")
  parser.add_argument("--devices", default="8,32", help="comma-separated fake device counts (fsdp = all)")
  parser.add_argument("--per_device_batch", type=int, default=4, help="0: the config's global batch")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds per device count")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--num_devices", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  counts = [int(n) for n in args.devices.split(",")]
  runs = {n: run_mesh(n, args) for n in counts}
  result = dict(benchmark="compile_plan", host_cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                per_device_batch=args.per_device_batch, mesh="data=1,fsdp=N,tensor=1",
                load_avg=os.getloadavg()[0], runs={str(n): {r["model"]: r for r in rs} for n, rs in runs.items()})
  small, large = min(counts), max(counts)
  if small != large:
    scaling = {}
    for name in args.models.split(","):
      a, b = runs[small], runs[large]
      a = next(r for r in a if r["model"] == name)
      b = next(r for r in b if r["model"] == name)
      if "error" in a or "error" in b:
        continue
      scaling[name] = dict(
          argument_ratio=round(a["argument_gib"] / b["argument_gib"], 3),
          state_ratio=round(a["state_gib_per_device_sharded"] / b["state_gib_per_device_sharded"], 3),
          ideal_ratio=large / small,
          # At a fixed per-device batch, ~1 when activations are batch-sharded; ~large/small when replicated.
          temp_growth=round(b["temp_gib"] / a["temp_gib"], 3))
    result[f"scaling_{small}_to_{large}"] = scaling
  print(json.dumps(result))


if __name__ == "__main__":
  main()
