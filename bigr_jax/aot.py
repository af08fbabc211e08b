"""`--mode=compile`: every program a run would execute, compiled ahead of time for its chips; nothing allocated.

The run's own config decides the programs and their shapes (mesh, batch, remat, dtype, image and code sizes);
`config.compile` (`config_sections.CompileConfig`) the chips: a TPU topology by name, compiled on any host with libtpu
(a CPU host included: the TPU compiler and its memory planner run here), or this host's devices.

Programs: the family's train step; for a generator also the sampler at `config.sample` (its `batch_size`, or
one image per class) and the feature extractor at `config.evaluation` (layers, condition, batch_size). Per
program and per chip the report gives:
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
import math
import pathlib
import re
import time
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigr_jax import chips, config_sections, files, parallel
from bigr_jax.evaluation import features as features_lib, run as evaluation_run
from bigr_jax.models import bigr
from bigr_jax.models.config import GeneratorConfig, TokenizerConfig
from bigr_jax.models.lpips import LPIPS
from bigr_jax.sampling import run_sample, sampler
from bigr_jax.train import generator, tokenizer

GiB = 2.0 ** 30
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\((.*)$")
_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}
PALLAS_TPU_CALL = "tpu_custom_call"  # a Pallas (Mosaic) kernel in TPU HLO; the compiler counts no FLOPs inside


class DoesNotFit(RuntimeError):
  """A compiled program needs more HBM than its chip has."""


def _shape_bytes(dtype: str, dims: str) -> int:
  size = _BYTES.get(dtype) or max(1, int(dtype[1:]) // 8)
  return size * math.prod(int(d) for d in dims.split(",") if d)


def _group_size(attributes: str, num_devices: int) -> int:
  """Devices in each replica group: from the mesh form (`mesh['axis_0'=2,...] ... {'axis_0'}`) or the list
  form (`{{0,1},{2,3}}`)."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]", attributes)
  if mesh:
    sizes = dict((name, int(size)) for name, size in re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    chosen = re.search(r"\{('[^}]*)\}", attributes[mesh.end():])  # the group's axes: {'axis_0'}
    axes = re.findall(r"'(\w+)'", chosen.group(1)) if chosen else list(sizes)
    return math.prod(sizes.get(a, 1) for a in axes) or 1
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
  if groups:
    return len([g for g in groups.group(1).split(",") if g])
  return num_devices


def collectives(hlo_text: str, num_devices: int) -> dict:
  """{kind: {count, bytes}}: the collectives of a compiled HLO module (a loop body once) and the bytes each
  chip sends for them."""
  out = {}
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    result_type, kind, started, attributes = match.groups()
    shapes = _SHAPE.findall(result_type)
    if started and len(shapes) > 1:  # an async start returns (operands, results): the results
      shapes = shapes[len(shapes) // 2:]
    result = sum(_shape_bytes(*s) for s in shapes)
    g = _group_size(attributes, num_devices)
    sent = {"all-gather": result * (g - 1) / g, "reduce-scatter": result * (g - 1),
            "all-reduce": 2 * result * (g - 1) / g, "all-to-all": result * (g - 1) / g,
            "collective-permute": result}[kind]
    entry = out.setdefault(kind, {"count": 0, "bytes": 0.0})
    entry["count"] += 1
    entry["bytes"] += sent
  return out


def cost_analysis(compiled) -> dict:
  """The compiler's cost figures of one compiled program (jax gives a dict, or a one-element list of it)."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


@dataclasses.dataclass
class Figures:
  """What the compiler says of one program, per chip."""
  flops: float
  bytes_accessed: float
  collectives: dict

  @classmethod
  def of(cls, compiled, num_devices: int) -> "Figures":
    cost = cost_analysis(compiled)
    return cls(float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
               collectives(compiled.as_text(), num_devices))

  def extrapolated(self, two: "Figures", blocks: int) -> "Figures":
    """From this program at 1 block and `two` at 2 blocks: the figures at `blocks` blocks."""
    scale = lambda a, b: a + (blocks - 1) * (b - a)
    kinds = set(self.collectives) | set(two.collectives)
    zero = {"count": 0, "bytes": 0.0}
    return Figures(scale(self.flops, two.flops), scale(self.bytes_accessed, two.bytes_accessed),
                   {k: {f: scale(self.collectives.get(k, zero)[f], two.collectives.get(k, zero)[f]) for f in zero}
                    for k in kinds})


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
  if chip is None:
    return {}
  sent = sum(entry["bytes"] for entry in figures.collectives.values())
  bounds = {"compute_s": flops / chip.peak_bf16_flops, "hbm_s": figures.bytes_accessed / chip.hbm_bytes_per_s,
            "interconnect_s": sent / chip.interconnect_bytes_per_s if chip.interconnect_bytes_per_s else None}
  step = max(v for v in bounds.values() if v is not None)
  bounds.update(step_s=step, mfu_upper_bound=bounds["compute_s"] / step if step > 0 else None)
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
  kernels = compiled.as_text().count(f'custom_call_target="{PALLAS_TPU_CALL}"')
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
      bytes_accessed_per_chip=figures.bytes_accessed, pallas_kernels=kernels,
      collectives={k: {"count": int(round(v["count"])), "bytes": v["bytes"]} for k, v in sorted(figures.collectives.items())},
      bounds=_bounds(figures, flops, chip))


# --- the programs of each family ---------------------------------------------------------------------------


def _key():
  return jax.ShapeDtypeStruct((), jax.random.key(0).dtype)


def with_model(config, **model_changes):
  """A copy of the config with `model` fields changed (e.g. the depth the per-block figures compile at)."""
  variant = config.copy_and_resolve_references()
  variant.model.update(model_changes)
  return variant


def generator_train_step(config, mesh, batch: int) -> Callable[[], "jax.stages.Lowered"]:
  """What lowers the generator's train step of `config` at a global `batch` on `mesh` (abstract: nothing allocated)."""
  trainer = generator.GeneratorTrainer(config, mesh, total_steps=max(1, int(config.total_steps or 1000)))
  return lambda: trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(batch), _key())


def _param_shapes(model: GeneratorConfig, sharding_of) -> dict:
  """The generator's params as ShapeDtypeStructs, each with `sharding_of(path, shape)`."""
  shapes = nn.meta.unbox(bigr.param_shapes(model))
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                sharding_of(shapes))


def generator_programs(config, mesh) -> list:
  model = GeneratorConfig.from_config(config.model)
  n = mesh.devices.size
  batch = config.batch_size

  per_block = None
  if model.scan_layers and model.n_layer > 1:  # the scanned stack's FLOPs, bytes and collectives, by trip count
    per_block = (generator_train_step(with_model(config, n_layer=1, scan_layers=False), mesh, batch),
                 generator_train_step(with_model(config, n_layer=2, scan_layers=False), mesh, batch), model.n_layer)
  programs = [Program("train_step", generator_train_step(config, mesh, batch), batch,
                      bigr.train_flops_per_image(model) * batch / n, per_block)]

  # Sampling as --mode=sample runs it: checkpoint params (float32) on every chip, the batch split.
  sampler_config, run = run_sample.sample_settings(config.sample)
  sample_batch = parallel.round_up_to_shards(run.batch_size or model.num_classes, mesh)
  replicated = lambda shapes: jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), shapes)
  sample_params = _param_shapes(model, replicated)
  programs.append(Program(
      "sample", lambda: sampler.lower_generate(model, sample_params, sample_batch, sampler_config, mesh,
                                               parallel.BATCH_AXES),
      sample_batch, sampler.flops_per_image(model, sampler_config) * sample_batch / n, loop_bodies_once=True))

  # Features as --mode=features extracts them: the model cut after the deepest probed block.
  ev = evaluation_run.evaluation_config(config)
  layers = features_lib.resolve_layers(tuple(ev.layers), model.n_layer)
  truncated = model.replace(n_layer=max(layers) + 1)
  feature_batch = parallel.round_up_to_shards(ev.batch_size, mesh)
  bits = jax.ShapeDtypeStruct((feature_batch, model.seq_len, model.binary_size), jnp.float32,
                              sharding=parallel.batch_sharding(mesh, 3))
  labels = jax.ShapeDtypeStruct((feature_batch,), jnp.int32, sharding=parallel.batch_sharding(mesh, 1))

  def features(variant, variant_layers):
    pooled, shardings = features_lib.pooled_program(variant, variant_layers, mesh, ev.condition)
    return lambda: pooled.lower(_param_shapes(variant, lambda _: shardings), bits, labels)

  per_block = None
  if truncated.scan_layers and truncated.n_layer > 1:
    per_block = (features(truncated.replace(n_layer=1, scan_layers=False), [0]),
                 features(truncated.replace(n_layer=2, scan_layers=False), [1]), truncated.n_layer)
  f = bigr.forward_flops(truncated)
  programs.append(Program("features", features(truncated, layers), feature_batch,
                          (f.embed + truncated.n_layer * f.block) * feature_batch / n, per_block))
  return programs


def tokenizer_programs(config, mesh) -> list:
  """The B-AE's train step (encoder, decoder, PatchGAN, LPIPS: no loops, so the compiled FLOPs are whole)."""
  model = TokenizerConfig.from_config(config.model)
  lpips = None
  if config.loss.perceptual_weight > 0:  # its shapes matter, not its values: no weights file is read
    lpips = jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                jnp.zeros((1, 64, 64, 3))))["params"]
    lpips = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), lpips)
  trainer = tokenizer.TokenizerTrainer(config, mesh, max(1, int(config.total_steps or 1000)), lpips)
  batch = config.batch_size
  images = {"image": jax.ShapeDtypeStruct((batch, model.img_size, model.img_size, model.n_channels), jnp.float32,
                                          sharding=parallel.batch_sharding(mesh, 4))}
  return [Program("train_step", lambda: trainer.train_step.lower(trainer.abstract_state, images, _key()), batch)]


PROGRAMS = {"generator": generator_programs, "tokenizer": tokenizer_programs}


def suggestions(config, family: str, mesh) -> list:
  """What would make a program fit, from the config's own settings."""
  out = []
  if family == "generator" and config.model.remat_policy != "full":
    out.append(f"--config.model.remat_policy=full (now {config.model.remat_policy!r}): recompute activations")
  if family == "tokenizer" and not config.model.remat:
    out.append("--config.model.remat=True: recompute each residual and attention block's activations")
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


def compile_family(config, family: str, compile_config: config_sections.CompileConfig) -> dict:
  devices = chips.target_devices(compile_config)
  mesh = parallel.make_mesh(config.mesh, devices)
  shards = parallel.batch_shards(mesh)
  if config.batch_size % shards:  # before any compile: no program of this run could be built
    raise ValueError(f"batch_size={config.batch_size} does not split over the {shards} batch shards of "
                     f"{len(devices)} chips (mesh {dict(mesh.shape)}): use a multiple of {shards}"
                     + (f" (the B-AE configs' `:chips={shards}`)" if family == "tokenizer" else "")
                     + ", or a slice whose batch shards divide it")
  chip = chips.chip_of(devices[0])
  results = [analyse(program, devices) for program in PROGRAMS[family](config, mesh)]
  return dict(family=family, topology=compile_config.topology or "local", num_slices=compile_config.num_slices,
              device_kind=devices[0].device_kind, chip=chip.name if chip else None, chips=len(devices),
              mesh=dict(mesh.shape), programs=results,
              suggestions=[] if all(r["fits"] for r in results) else suggestions(config, family, mesh))


def table(report: dict) -> str:
  """The report, readable: one row per program."""
  rows = [f"{report['family']} on {report['topology']} ({report['chips']} x {report['device_kind']}), "
          f"mesh {report['mesh']}"]
  rows.append(f"{'program':<11} {'batch':>6} {'peak GiB':>9} {'of':>6} {'fits':>5} {'TFLOP/chip':>11} "
              f"{'compute s':>10} {'HBM s':>9} {'ICI s':>9} {'MFU <=':>7}")
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
                f"{fmt(b.get('hbm_s'), '9.3g'):>9} {fmt(b.get('interconnect_s'), '9.3g'):>9} "
                f"{fmt(b.get('mfu_upper_bound'), '7.2f'):>7}")
  rows.extend(f"  to fit: {s}" for s in report["suggestions"])
  return "\n".join(rows)


def run(config, workdir, family: Optional[str] = None) -> dict:
  """`--mode=compile` for a generator or tokenizer config: prints the table and the JSON line, writes
  <workdir>/compile.json, and raises DoesNotFit if a program needs more HBM than its chips have."""
  family = family or config.family
  report = compile_family(config, family, config_sections.CompileConfig.from_config(config.compile))
  print(table(report), flush=True)
  print(json.dumps(report), flush=True)
  if jax.process_index() == 0:
    files.write_json(pathlib.Path(workdir) / "compile.json", report)
  misfits = [r["program"] for r in report["programs"] if not r["fits"]]
  if misfits:
    raise DoesNotFit(f"{' and '.join(misfits)} {'does' if len(misfits) == 1 else 'do'} not fit "
                     f"{report['chips']} x {report['device_kind']}; to fit: " + "; or ".join(report["suggestions"]))
  return report
