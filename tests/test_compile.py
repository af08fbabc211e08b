"""`--mode=compile`: the run's programs compiled for real TPU topologies by libtpu's compiler, on this CPU host."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bigr_jax import chips, config_sections, parallel, typed_config
from bigr_jax.compile import hlo, report
from bigr_jax.families import generator as generator_family, tokenizer as tokenizer_family
from bigr_jax.train import generator_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATOR, TOKENIZER = "configs/bigr_l.py:runlocal", "configs/bae_d24.py:runlocal"


def _needs_libtpu():
  try:
    import libtpu  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.fail("libtpu is not installed, so no TPU topology can be compiled for: pip install -e '.[tpu]' (the "
                "README's test command does)")


def _compile(config: str, topology: str, workdir, *overrides):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "bigr_jax.main", f"--config={config}", f"--workdir={workdir}",
                         "--mode=compile", f"--config.compile.topology={topology}", *overrides],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("config,topology,programs,attention", [
    (GENERATOR, "v5e:2x2", ["train_step", "sample", "features"], "xla"),
    pytest.param(GENERATOR, "v5p:2x2x1", ["train_step", "sample", "features"], "splash", marks=pytest.mark.slow),
    pytest.param(TOKENIZER, "v5e:2x2", ["train_step"], None, marks=pytest.mark.slow),  # no chip-specific kernel
], ids=["generator-v5e", "generator-splash-v5p", "tokenizer-v5e"])
def test_every_program_compiles_for_a_tpu_topology_and_fits(tmp_path, config, topology, programs, attention):
  _needs_libtpu()
  result = _compile(config, topology, tmp_path, *([f"--config.model.attention={attention}"] if attention else []))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads((tmp_path / "compile.json").read_text())
  assert json.loads(result.stdout.strip().splitlines()[-1]) == report  # the JSON line
  assert report["topology"] == topology and report["chips"] == 4
  assert report["chip"] == topology.split(":")[0] and report["device_kind"].startswith("TPU v5")
  assert [p["program"] for p in report["programs"]] == programs
  for program in report["programs"]:
    memory = program["hbm_bytes"]
    assert program["fits"] and 0 < memory["peak"] <= program["hbm_capacity_bytes"]
    assert memory["peak"] == memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    bounds = program["bounds"]
    assert bounds["step_s"] == max(bounds["compute_s"], bounds["hbm_s"], bounds["interconnect_s"]) > 0
    assert 0 < bounds["mfu_upper_bound"] <= 1
    traffic_estimate = program["hbm_traffic_per_chip"]
    for grouping in ("by_source", "by_kind"):  # the parts sum to the whole
      assert sum(traffic_estimate[grouping].values()) == pytest.approx(traffic_estimate["hbm_bytes"], rel=1e-9)
    assert 0 < traffic_estimate["hbm_bytes"] <= program["bytes_accessed_per_chip"]
    assert bounds["step_estimate_s"] <= bounds["step_s"] and bounds["mfu_upper_bound_by_estimate"] <= 1
  train = report["programs"][0]
  if programs[0] == "train_step" and config == GENERATOR:  # the step's parts, named by the model's modules
    groups = set(train["hbm_traffic_per_chip"]["by_source"])
    assert {"outside the model (the optimizer, EMA and clipping; the sampler's own loop)",
            "backward: trunk block: feed-forward", "forward: trunk block: attention"} <= groups, groups
    assert any(group.endswith(": transcoder") for group in groups), groups
  assert train["collectives"], "a data-parallel step reduces its gradients over the chips"
  # Splash attention is the Pallas kernel on TPU, once in the scanned block: forward, in training dq and dkv too.
  kernels = {p["program"]: p["pallas_kernels"] for p in report["programs"]}
  assert kernels == ({"train_step": 3, "sample": 1, "features": 1} if attention == "splash" else
                     dict.fromkeys(programs, 0)), kernels
  if config == GENERATOR:  # composed over the blocks, the compiler's FLOPs meet the analytic count
    assert 0.9 < train["flops_per_chip"]["compiled_over_analytic"] < 1.6, train["flops_per_chip"]
  table = "\n".join(result.stdout.strip().splitlines()[:-1])
  assert f"on {topology} (4 x {report['device_kind']})" in table and all(p in table for p in programs)


def test_a_program_that_does_not_fit_exits_non_zero_with_the_numbers_and_what_would_fit(tmp_path):
  _needs_libtpu()
  result = _compile(GENERATOR, "v5e:2x2", tmp_path, "--config.batch_size=524288", "--config.model.n_layer=1")
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith("error: train_step does not fit 4 x TPU v5 lite; to fit: --config.model.remat_policy=full")
  assert "--config.batch_size=262144 --config.optim.grad_accum_steps=2" in last and "--config.mesh.fsdp=4" in last
  report = json.loads((tmp_path / "compile.json").read_text())
  train = report["programs"][0]
  assert not train["fits"] and "RESOURCE_EXHAUSTED" in train["compiler_error"] and "exceeds available HBM" in \
      train["compiler_error"]
  assert all(p["fits"] for p in report["programs"][1:])  # the sampler and the features still fit


def test_a_batch_the_chips_cannot_split_is_a_usage_error_before_any_compile(tmp_path):
  _needs_libtpu()
  result = _compile(TOKENIZER, "v5e:2x2", tmp_path, "--config.batch_size=6")
  assert result.returncode != 0 and not (tmp_path / "compile.json").exists()
  assert "batch_size=6 does not split over the 4 batch shards of 4 chips" in result.stdout + result.stderr


def test_the_b_ae_batch_spans_the_16_and_32_chip_slices_through_its_chips_argument():
  _needs_libtpu()
  shipped = typed_config.load_config_file(os.path.join(ROOT, "configs/bae_d24.py"))
  with pytest.raises(ValueError, match=r"batch_size=24 does not split over the 32 batch shards of 32 chips .*"
                                       r"\(the B-AE configs' `:chips=32`\)"):
    tokenizer_family.compile_report(shipped, config_sections.CompileConfig(topology="v5e:4x8"))  # refused before compiling
  for name in ("bae_d24", "bae_d32", "bae_d32_512"):
    for topology in ("v5e:4x8", "v4:2x2x4", "v5p:2x2x4", "v6e:4x4"):  # 32 chips, then 16 of each
      devices = chips.target_devices(config_sections.CompileConfig(topology=topology))
      config = typed_config.load_config_file(os.path.join(ROOT, f"configs/{name}.py:chips={len(devices)}"))
      shards = parallel.batch_shards(parallel.make_mesh(config.mesh, devices))
      assert config.batch_size == 3 * shards == 3 * len(devices)  # BLD's 3 images per GPU, on every chip
      assert config.optim.lr == shipped.optim.lr  # BLD's rate follows the per-GPU batch
  with pytest.raises(ValueError, match="chips=0: the number of chips"):
    typed_config.load_config_file(os.path.join(ROOT, "configs/bae_d24.py:chips=0"))
  with pytest.raises(ValueError, match="runlocal has its own"):
    typed_config.load_config_file(os.path.join(ROOT, "configs/bae_d24.py:runlocal,chips=16"))


def test_argument_bytes_are_the_sharded_state_and_batch():
  """On this host's 8 devices (no tile padding): the train step's arguments per device are exactly the
  state (params, EMA, optimizer moments) as its shardings split it, plus the batch shard and the key."""
  config = typed_config.load_config_file(os.path.join(ROOT, GENERATOR))
  config.mesh.update(data=2, fsdp=4, tensor=1)
  devices = chips.target_devices(config_sections.CompileConfig())
  mesh = parallel.make_mesh(config.mesh, devices)
  train = dataclasses.replace(generator_family.programs(config, mesh)[0], per_block=None)  # its memory alone
  result = report.analyse(train, devices)
  trainer = generator_trainer.GeneratorTrainer(config, mesh, total_steps=1000)

  def per_device(leaf):
    return math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize

  state = sum(per_device(leaf) for leaf in jax.tree_util.tree_leaves(trainer.abstract_state))
  whole = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(trainer.abstract_state))
  batch = sum(per_device(leaf) for leaf in jax.tree_util.tree_leaves(trainer.abstract_batch(config.batch_size)))
  key = np.dtype(np.uint32).itemsize * 2
  assert state < whole / 2  # fsdp=4 splits most of it
  assert result["hbm_bytes"]["arguments"] == state + batch + key


def test_collectives_are_read_from_the_compiled_hlo_with_the_bytes_each_chip_sends():
  text = "\n".join([
      # TPU form: the group is the mesh axes named after device_ids (axis_0, of size 2).
      "%all-gather.1 = bf16[1,64,256]{2,1,0:T(8,128)(2,1)} all-gather(%p), channel_id=1, "
      "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_0'}, dimensions={1}",
      "%all-reduce.2 = (f32[64]{0}, f32[64]{0}) all-reduce(%a, %b), channel_id=2, "
      "replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_0','axis_1'}, to_apply=%add",
      # List form, and an async start whose tuple holds (operand, result).
      "%reduce-scatter.3 = f32[8]{0} reduce-scatter(%g), replica_groups={{0,1,2,3}}, dimensions={0}",
      "%all-gather-start.4 = (f32[8]{0}, f32[32]{0}) all-gather-start(%h), replica_groups={{0,1,2,3}}",
      "%add.5 = f32[8]{0} add(%x, %y)",
  ])
  found = hlo.collectives(text, num_devices=4)
  assert found["all-gather"] == {"count": 2, "bytes": 1 * 64 * 256 * 2 / 2 + 32 * 4 * 3 / 4}
  assert found["all-reduce"] == {"count": 1, "bytes": 2 * (2 * 64 * 4) * 3 / 4}
  assert found["reduce-scatter"] == {"count": 1, "bytes": 8 * 4 * 3}
  assert "add" not in found


def test_a_tokenizer_that_does_not_fit_is_told_to_remat_its_blocks():
  config = typed_config.load_config_file(os.path.join(ROOT, "configs", "bae_d32_512.py"))
  mesh = parallel.make_mesh(config.mesh)
  assert tokenizer_family.fit_suggestions(config, mesh)[0].startswith("--config.model.remat=True")
  config.model.remat = True
  assert not any("remat" in s for s in tokenizer_family.fit_suggestions(config, mesh))



def test_the_hbm_estimate_meets_the_least_traffic_of_known_programs_where_the_raw_counter_exceeds_it():
  """benchmarks/hbm_counter.py's toys on one chip of v5e:2x2. The raw counter charges the matmul's tiles and the
  prefetched weight's on-chip copies (over twice their least traffic); the estimate meets the least traffic of
  every toy, and its parts name what each moves."""
  _needs_libtpu()
  spec = importlib.util.spec_from_file_location("hbm_counter", os.path.join(ROOT, "benchmarks", "hbm_counter.py"))
  hbm_counter = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hbm_counter)
  toys = hbm_counter.measure()
  assert {name: toy["estimate"] for name, toy in toys.items()} == dict.fromkeys(hbm_counter.TOYS, 1.0), toys
  assert toys["matmul"]["counter"] > 2 and toys["prefetched weight"]["counter"] > 2, toys
  assert all(toy["counter"] >= 1.0 for toy in toys.values()), toys
  for name, toy in toys.items():  # the parts sum to the whole
    assert sum(toy["estimate_by_kind"].values()) == pytest.approx(toy["estimate"] * toy["least_bytes"], rel=1e-3)
  weight, least = hbm_counter.PREFETCHED_WEIGHT, toys["prefetched weight"]["least_bytes"]
  assert toys["prefetched weight"]["estimate_by_kind"] == {  # the weight's one read into on-chip memory, and the rest
      "arithmetic (fusions and unfused ops)": least - weight, "data movement: copy": weight}
