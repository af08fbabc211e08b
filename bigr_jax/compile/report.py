"""`--mode=compile`: every program a run would execute, compiled ahead of time for its chips; nothing allocated.

Each family hands its programs (`Program`: a name, what lowers it, its batch and analytic FLOPs) to
`compile_programs`; nothing here builds a model, a trainer or a sampler.

The run's own config decides the programs and their shapes (mesh, batch, remat, dtype, image and code sizes);
`config.compile` (`config_sections.CompileConfig`) the chips: a TPU topology by name, compiled on any host with libtpu
(a CPU host included: the TPU compiler and its memory planner run here), or this host's devices.

Programs (`bigr_jax.families`): the family's train step; for a generator also the sampler at `config.sample` (its
`batch_size`, or one image per class) and the feature extractor at `config.evaluation` (layers, condition,
batch_size). Per program and per chip the report gives:
- HBM: arguments, outputs, temporaries, aliased bytes and their peak (arguments + outputs - aliased +
  temporaries), against the chip's HBM;
- FLOPs: the compiled program's, and the analytic count. The compiler counts a loop body once, so for a
  scanned trunk (train step, features) the compiled figure is composed by trip count: the program is compiled
  unrolled at 1 and 2 blocks, and the per-block difference scales to the model's blocks (its bytes and
  collectives likewise).
  The sampler's loops are not composed: its compiled figures are marked `loop_bodies_once`. The compiler
  counts no FLOPs inside Pallas kernels (splash attention: `pallas_kernels` counts their calls), so the
  compute bounds use the analytic count.
- collectives: per kind, how many and the bytes each chip sends (ring algorithms: an all-gather sends (g-1)/g
  of its result, a reduce-scatter g-1 times its result, an all-reduce twice (g-1)/g, g the group size);
- time bounds: compute (FLOPs / peak), HBM traffic (bytes accessed / HBM bandwidth) and interconnect
  (collective bytes / ICI bandwidth), from `chips.CHIPS`; their maximum bounds the step time from below, and
  compute over that bound is an upper bound on MFU. These are compiler figures and bounds, not measured times.

Prints a table and one JSON line, and writes `<workdir>/compile.json`. A program that does not fit its chips'
HBM ends the run with `DoesNotFit`, naming what would make it fit.
"""

import dataclasses
import json
import pathlib
import time
from typing import Callable, Optional

import jax

from bigr_jax import chips, files, parallel
from bigr_jax.compile import hlo, traffic
from bigr_jax.config_sections import CompileConfig

GiB = 2.0 ** 30
TOP_GROUPS = 4  # HBM traffic groups per program in the table (compile.json has them all)


class DoesNotFit(RuntimeError):
  """A compiled program needs more HBM than its chip has."""


def abstract_key() -> jax.ShapeDtypeStruct:
  """A PRNG key's shape, for lowering a program that takes one."""
  return jax.ShapeDtypeStruct((), jax.random.key(0).dtype)


def cost_analysis(compiled) -> dict:
  """The compiler's cost figures of one compiled program (jax gives a dict, or a one-element list of it)."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


@dataclasses.dataclass
class Figures:
  """What the compiler says of one program, per chip: its counters, its collectives and where its HBM traffic
  goes (`traffic.breakdown`)."""
  flops: float
  bytes_accessed: float
  collectives: dict
  hbm_traffic: dict

  @classmethod
  def of(cls, compiled, num_devices: int) -> "Figures":
    cost = cost_analysis(compiled)
    text = compiled.as_text()
    return cls(float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
               hlo.collectives(text, num_devices), traffic.breakdown(text))

  def extrapolated(self, two: "Figures", blocks: int) -> "Figures":
    """From this program at 1 block and `two` at 2 blocks: the figures at `blocks` blocks."""
    scale = lambda a, b: a + (blocks - 1) * (b - a)
    kinds = set(self.collectives) | set(two.collectives)
    zero = {"count": 0, "bytes": 0.0}
    return Figures(scale(self.flops, two.flops), scale(self.bytes_accessed, two.bytes_accessed),
                   {k: {f: scale(self.collectives.get(k, zero)[f], two.collectives.get(k, zero)[f]) for f in zero}
                    for k in kinds},
                   traffic.extrapolated(self.hbm_traffic, two.hbm_traffic, blocks))


@dataclasses.dataclass
class Program:
  name: str
  lower: Callable[[], "jax.stages.Lowered"]
  global_batch: int
  analytic_flops: Optional[float] = None  # per chip
  per_block: Optional[tuple] = None  # (lower at 1 block, lower at 2 blocks, blocks): compose the loop by trip count
  loop_bodies_once: bool = False


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
              temporaries=m.temp_size_in_bytes, peak=peak)


def _bounds(figures: Figures, flops: float, chip: Optional[chips.Chip]) -> dict:
  """Lower bounds on the step time, with the raw counter's HBM bound (`hbm_s`, `step_s`, `mfu_upper_bound`) and the
  estimate's (`hbm_estimate_s`, `step_estimate_s`, `mfu_upper_bound_by_estimate`) side by side."""
  if chip is None:
    return {}
  sent = sum(entry["bytes"] for entry in figures.collectives.values())
  bounds = {"compute_s": flops / chip.peak_bf16_flops, "hbm_s": figures.bytes_accessed / chip.hbm_bytes_per_s,
            "interconnect_s": sent / chip.interconnect_bytes_per_s if chip.interconnect_bytes_per_s else None}
  step = max(v for v in bounds.values() if v is not None)
  bounds.update(step_s=step, mfu_upper_bound=bounds["compute_s"] / step if step > 0 else None)
  estimate = figures.hbm_traffic["hbm_bytes"] / chip.hbm_bytes_per_s
  step = max(v for v in (bounds["compute_s"], estimate, bounds["interconnect_s"]) if v is not None)
  bounds.update(hbm_estimate_s=estimate, step_estimate_s=step,
                mfu_upper_bound_by_estimate=bounds["compute_s"] / step if step > 0 else None)
  return bounds


def analyse(program: Program, devices: list) -> dict:
  """Compiles one program and reports its memory, FLOPs, collectives and bounds per chip."""
  chip = chips.chip_of(devices[0])
  start = time.perf_counter()
  try:
    compiled = program.lower().compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return dict(program=program.name, global_batch=program.global_batch, fits=False,
                compiler_error=str(e).strip().splitlines()[0][:500], compile_s=round(time.perf_counter() - start, 1))
  compile_s = time.perf_counter() - start
  memory = _memory(compiled)
  kernels = hlo.pallas_kernels(compiled.as_text())
  figures = Figures.of(compiled, len(devices))
  if program.per_block is not None:
    one, two, blocks = program.per_block
    figures = Figures.of(one().compile(), len(devices)).extrapolated(Figures.of(two().compile(), len(devices)), blocks)
  flops = program.analytic_flops if program.analytic_flops else figures.flops
  capacity = chip.hbm_bytes if chip else None
  return dict(
      program=program.name, global_batch=program.global_batch, compile_s=round(compile_s, 1),
      hbm_bytes=memory, hbm_capacity_bytes=capacity,
      fits=capacity is None or memory["peak"] <= capacity,
      flops_per_chip={"compiled": figures.flops, "analytic": program.analytic_flops,
                      "compiled_over_analytic": (round(figures.flops / program.analytic_flops, 4)
                                                 if program.analytic_flops else None),
                      "loop_bodies_once": program.loop_bodies_once},
      bytes_accessed_per_chip=figures.bytes_accessed, hbm_traffic_per_chip=figures.hbm_traffic,
      pallas_kernels=kernels,
      collectives={k: {"count": int(round(v["count"])), "bytes": v["bytes"]} for k, v in sorted(figures.collectives.items())},
      bounds=_bounds(figures, flops, chip))


def fit_suggestions(config, mesh) -> list:
  """What would make any family's program fit, from the config's own settings (a family puts its own first)."""
  out = []
  shards = parallel.batch_shards(mesh)
  if config.batch_size // shards > 1 and (config.batch_size // 2) % shards == 0:
    out.append(f"--config.batch_size={config.batch_size // 2} --config.optim.grad_accum_steps="
               f"{2 * config.optim.grad_accum_steps}: half the images per step, as many per update "
               f"({config.batch_size // shards} per chip now)")
  if mesh.shape["fsdp"] < mesh.devices.size:
    out.append(f"--config.mesh.fsdp={mesh.devices.size} --config.mesh.data=1 (now fsdp={mesh.shape['fsdp']}): "
               "shard params, EMA and optimizer state over every chip")
  out.append("more chips (a larger --config.compile.topology), or a chip with more HBM")
  return out


def compile_programs(config, compile_config: CompileConfig, family: str,
                     programs: Callable[..., list], suggestions: Callable[..., list], batch_hint: str = "") -> dict:
  """Compiles `programs(config, mesh)` for `compile_config`'s chips; `suggestions(config, mesh)` says what would
  make a misfit fit, `batch_hint` what makes the batch split. The report, as a dict."""
  devices = chips.target_devices(compile_config)
  mesh = parallel.make_mesh(config.mesh, devices)
  shards = parallel.batch_shards(mesh)
  if config.batch_size % shards:  # before any compile: no program of this run could be built
    raise ValueError(f"batch_size={config.batch_size} does not split over the {shards} batch shards of "
                     f"{len(devices)} chips (mesh {dict(mesh.shape)}): use a multiple of {shards}"
                     + (f" ({batch_hint.format(shards=shards)})" if batch_hint else "")
                     + ", or a slice whose batch shards divide it")
  chip = chips.chip_of(devices[0])
  results = [analyse(program, devices) for program in programs(config, mesh)]
  return dict(family=family, topology=compile_config.topology or "local", num_slices=compile_config.num_slices,
              device_kind=devices[0].device_kind, chip=chip.name if chip else None, chips=len(devices),
              mesh=dict(mesh.shape), programs=results,
              suggestions=[] if all(r["fits"] for r in results) else suggestions(config, mesh))


def table(report: dict) -> str:
  """The report, readable: one row per program."""
  rows = [f"{report['family']} on {report['topology']} ({report['chips']} x {report['device_kind']}), "
          f"mesh {report['mesh']}"]
  rows.append(f"{'program':<11} {'batch':>6} {'peak GiB':>9} {'of':>6} {'fits':>5} {'TFLOP/chip':>11} "
              f"{'compute s':>10} {'HBM s':>9} {'HBM est s':>9} {'ICI s':>9} {'MFU <=':>7} {'(est)':>6}")
  for r in report["programs"]:
    if "hbm_bytes" not in r:
      rows.append(f"{r['program']:<11} {r['global_batch']:>6} {'':>9} {'':>6} {'no':>5}  {r['compiler_error']}")
      continue
    b, flops = r["bounds"], r["flops_per_chip"]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"
    capacity = r["hbm_capacity_bytes"] / GiB if r["hbm_capacity_bytes"] else None
    rows.append(f"{r['program']:<11} {r['global_batch']:>6} {r['hbm_bytes']['peak'] / GiB:>9.3f} "
                f"{fmt(capacity, '6.2f'):>6} {'yes' if r['fits'] else 'no':>5} "
                f"{(flops['analytic'] or flops['compiled']) / 1e12:>11.4f} {fmt(b.get('compute_s'), '10.4g'):>10} "
                f"{fmt(b.get('hbm_s'), '9.3g'):>9} {fmt(b.get('hbm_estimate_s'), '9.3g'):>9} "
                f"{fmt(b.get('interconnect_s'), '9.3g'):>9} {fmt(b.get('mfu_upper_bound'), '7.2f'):>7} "
                f"{fmt(b.get('mfu_upper_bound_by_estimate'), '6.2f'):>6}")
  for r in report["programs"]:  # where each program's estimated HBM traffic goes: its largest groups
    top = list(r.get("hbm_traffic_per_chip", {}).get("by_source", {}).items())[:TOP_GROUPS]
    if top:
      rows.append(f"  {r['program']} HBM (estimate, GB): " + "; ".join(f"{g} {b / 1e9:.3g}" for g, b in top))
  rows.extend(f"  to fit: {s}" for s in report["suggestions"])
  return "\n".join(rows)


def publish(report: dict, workdir) -> dict:
  """Prints the table and the JSON line, writes <workdir>/compile.json, and raises DoesNotFit if a program needs
  more HBM than its chips have."""
  print(table(report), flush=True)
  print(json.dumps(report), flush=True)
  if jax.process_index() == 0:
    files.write_json(pathlib.Path(workdir) / "compile.json", report)
  misfits = [r["program"] for r in report["programs"] if not r["fits"]]
  if misfits:
    raise DoesNotFit(f"{' and '.join(misfits)} {'does' if len(misfits) == 1 else 'do'} not fit "
                     f"{report['chips']} x {report['device_kind']}; to fit: " + "; or ".join(report["suggestions"]))
  return report
