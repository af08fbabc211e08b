"""Generator training: sharded vs single device, resume, restore onto another mesh, faults, errors."""

import itertools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigr_jax import data, parallel, typed_config
from bigr_jax.compile import report
from bigr_jax.models import bigr
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.train import checkpoints, generator_trainer, metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**mesh):
  c = typed_config.load_config_file(os.path.join(ROOT, "configs", "bigr_l.py") + ":runlocal")
  c.mesh.update(data=mesh.get("data", 2), fsdp=mesh.get("fsdp", 2), tensor=mesh.get("tensor", 2))
  c.tensorboard = False
  return c


def synthetic_batches(config, start=0):
  source = data.SyntheticCodes(config.model.seq_len, config.model.binary_size, config.model.num_classes)
  for step in itertools.count(start):
    items = [source[step * config.batch_size + i] for i in range(config.batch_size)]
    yield {"bits": np.stack([x["codes"] for x in items]), "label": np.stack([x["label"] for x in items])}


def test_mesh_and_single_device_agree():
  config = tiny_config()
  runs = {}
  for name, devices in (("mesh", jax.devices()), ("single", jax.devices()[:1])):
    if name == "single":
      config.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = parallel.make_mesh(config.mesh, devices)
    trainer = generator_trainer.GeneratorTrainer(config, mesh, total_steps=3)
    state = trainer.init(jax.random.key(0))
    losses = []
    with jax.set_mesh(mesh):
      for batch in itertools.islice(synthetic_batches(config), 3):
        state, metrics = trainer.train_step(state, parallel.to_global(batch, mesh), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    runs[name] = (losses, jax.device_get(state.params))
  np.testing.assert_allclose(runs["mesh"][0], runs["single"][0], rtol=1e-5)
  # Adam divides by the gradient's own scale, so reduction-order noise in near-zero gradients shows up in the
  # params at ~1e-5 (the lr is 1e-3 a step); a real sharding bug moves them by the lr itself.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), runs["mesh"][1],
                         runs["single"][1])
  wqkv = jax.tree_util.tree_leaves(runs["mesh"][1]["trunk"])[0]
  assert wqkv.shape[0] == config.model.n_layer  # scanned layout: stacked over layers


def test_dense_gradients_match_autodiff():
  """`dense_matmul`'s own backward pass gives autodiff's gradients, for 3-D and 2-D inputs."""
  from bigr_jax.models.transformer import dense_matmul
  keys = jax.random.split(jax.random.key(0), 3)
  kernel = jax.random.normal(keys[0], (24, 40))
  for shape in ((3, 7, 24), (11, 24)):
    x = jax.random.normal(keys[1], shape)
    probe = jax.random.normal(keys[2], shape[:-1] + (40,))
    loss = lambda matmul: lambda x, k: jnp.sum(jnp.tanh(matmul(x, k)) * probe)  # noqa: E731
    ours = jax.grad(loss(dense_matmul), argnums=(0, 1))(x, kernel)
    reference = jax.grad(loss(lambda x, k: x @ k), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, reference):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# Unrolled blocks: the same remat policies on the same block (slow: the scanned case covers them).
@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_gradients_agree_under_every_remat_policy(scan_layers):
  """Same gradients under every remat policy; "dots" saves the dense outputs (no matmul is recomputed),
  "full" recomputes them."""
  config = tiny_config(data=1, fsdp=1, tensor=1)
  config.model.update(scan_layers=scan_layers)
  model_config = GeneratorConfig.from_config(config.model)
  params = bigr.init_params(model_config, jax.random.key(0))
  batch = next(synthetic_batches(config))
  rngs = {name: jax.random.key(i) for i, name in enumerate(("mask", "diffusion", "label_drop", "dropout"))}
  draws = bigr.BiGR(model_config).apply({"params": params}, batch["bits"], rngs=rngs, method=bigr.BiGR.loss_draws)
  grads, flops = {}, {}
  for policy in ("none", "dots", "dots_saveable", "full"):
    model = bigr.BiGR(model_config.replace(remat_policy=policy))
    loss = lambda p: model.apply({"params": p}, batch["bits"], batch["label"], draws, rngs=rngs,  # noqa: E731,B023
                                 method=bigr.BiGR.loss)[0]
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    flops[policy] = report.cost_analysis(compiled)["flops"]
    grads[policy] = compiled(params)
  for policy in ("dots", "dots_saveable", "full"):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           grads[policy], grads["none"])
  assert float(optax.tree.norm(grads["none"])) > 0
  # "dots" recomputes elementwise work only (a few %); a recomputed matmul would add about 20%.
  assert flops["dots"] < 1.05 * flops["none"] and flops["dots_saveable"] < 1.05 * flops["none"], flops
  assert flops["full"] > 1.1 * flops["none"], flops


def test_activations_stay_split_over_the_batch_axes():
  """The activation constraints hold however the step is lowered: without them (batch rule unsharded) every
  device would hold the whole batch's activations."""
  def temp_bytes(rules):
    config = tiny_config(data=1, fsdp=8, tensor=1)
    config.batch_size = 64
    config.logical_axis_rules = rules
    mesh = parallel.make_mesh(config.mesh)
    trainer = generator_trainer.GeneratorTrainer(config, mesh, total_steps=10)
    compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(64), jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  unsharded = [[name, None if name == "batch" else axes] for name, axes in parallel.DEFAULT_RULES]
  assert 3 * temp_bytes(()) < temp_bytes(unsharded)


def test_training_learns_the_classes():
  config = tiny_config(data=1, fsdp=1, tensor=1)
  config.optim.lr = 3e-3
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  trainer = generator_trainer.GeneratorTrainer(config, mesh, total_steps=60)
  state = trainer.init(jax.random.key(0))
  probe = next(synthetic_batches(config, start=1000))
  rngs = {name: jax.random.key(i) for i, name in enumerate(("mask", "diffusion", "label_drop", "dropout"))}
  draws = trainer.model.apply({"params": state.params}, probe["bits"], deterministic=True, rngs=rngs,
                              method=bigr.BiGR.loss_draws)
  fixed_loss = jax.jit(lambda params: trainer.model.apply(  # same masks, timesteps and noise every call
      {"params": params}, probe["bits"], probe["label"], draws, deterministic=True, method=bigr.BiGR.loss)[0])
  before = float(fixed_loss(state.params))
  accuracy = []
  with jax.set_mesh(mesh):
    for batch in itertools.islice(synthetic_batches(config), 60):
      state, metrics = trainer.train_step(state, parallel.to_global(batch, mesh), jax.random.key(1))
      accuracy.append(float(metrics["bit_accuracy"]))
  # Chance is 0.5 at the start (zero-initialised output layer).
  assert np.mean(accuracy[:5]) < 0.55 and np.mean(accuracy[-10:]) > 0.6
  assert float(fixed_loss(state.params)) < before


def test_resume_and_restore_onto_another_mesh(tmp_path):
  config = tiny_config()
  config.total_steps = 8
  config.checkpoint_every = 4
  full = generator_trainer.train_and_evaluate(config, str(tmp_path / "full"))
  logged = metric_writer.read_metrics(tmp_path / "full")
  assert [m["step"] for m in logged] == [5, 8] and all(np.isfinite(m["loss"]) for m in logged)

  config.total_steps = 4  # "interrupted" after 4 steps, then resumed to 8 on the same mesh
  generator_trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  config.total_steps = 8
  resumed = generator_trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full.params),
                         jax.device_get(resumed.params))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full.ema_params),
                         jax.device_get(resumed.ema_params))

  config.total_steps = 4
  generator_trainer.train_and_evaluate(config, str(tmp_path / "moved"))
  config.total_steps = 8
  config.mesh.update(data=8, fsdp=1, tensor=1)  # resumed on a different mesh shape
  moved = generator_trainer.train_and_evaluate(config, str(tmp_path / "moved"))
  # As in test_mesh_and_single_device_agree: reduction-order noise, amplified by Adam over 4 steps, stays far
  # below one step's movement (lr 1e-3).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), jax.device_get(full.params),
                         jax.device_get(moved.params))
  # The first run's config.json is kept; the resume's changes are printed and recorded.
  assert json.loads((tmp_path / "moved" / "config.json").read_text())["total_steps"] == 4
  record = json.loads((tmp_path / "moved" / checkpoints.RESUMES).read_text().splitlines()[-1])
  assert record["changes"]["total_steps"] == [4, 8] and record["changes"]["mesh.data"][1] == 8
  config.model.dim = 2 * config.model.dim  # another model: refused before any step
  with pytest.raises(checkpoints.ConfigChanged, match=rf"holds a run of another model \(model.dim: "
                                                      rf"{config.model.dim // 2} there, {config.model.dim} here"):
    generator_trainer.train_and_evaluate(config, str(tmp_path / "moved"))
  assert len((tmp_path / "moved" / checkpoints.RESUMES).read_text().splitlines()) == 1


def test_logged_metrics_average_the_steps_since_the_last_report():
  averages = metric_writer.ScalarAverages()
  rng = np.random.default_rng(0)
  steps = [{"loss": np.float32(rng.random()), "bit_accuracy": np.float32(rng.random())} for _ in range(5)]
  for values in steps:
    averages.add(values)
  assert averages.pop() == pytest.approx({k: np.mean([s[k] for s in steps]) for k in steps[0]}, rel=1e-6)
  averages.add(steps[0])
  assert averages.pop() == pytest.approx(steps[0])  # a new window after each report
  assert averages.pop() == {}
  averages.add(steps[0])
  with pytest.raises(ValueError, match=r"metrics \['loss'\] differ from this window's \['bit_accuracy', 'loss'\]"):
    averages.add({"loss": np.float32(1.0)})


def test_sigterm_checkpoints_and_stops(tmp_path):
  config = tiny_config()
  config.total_steps = 50

  def batches():
    for step, batch in enumerate(synthetic_batches(config)):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  with pytest.raises(checkpoints.Preempted) as preempted:
    generator_trainer.train_and_evaluate(config, str(tmp_path), batches=batches())
  stopped_at = preempted.value.step
  assert 3 < stopped_at < 50
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == stopped_at


def test_nan_loss_stops_with_clear_message(tmp_path):
  config = tiny_config()
  nan_bits = ({**batch, "bits": np.full(batch["bits"].shape, np.nan, np.float32)} for batch in
              synthetic_batches(config))  # (a NaN learning rate is refused before any work: test_config.py)
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    generator_trainer.train_and_evaluate(config, str(tmp_path), batches=nan_bits)
  assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_bad_configs_fail_before_compute(tmp_path):
  config = tiny_config()
  config.batch_size = 6  # not divisible by the 4 batch shards of a (2, 2, 2) mesh
  with pytest.raises(ValueError, match="not divisible"):
    generator_trainer.train_and_evaluate(config, str(tmp_path))
  config = tiny_config(data=3)
  with pytest.raises(ValueError, match="devices"):
    generator_trainer.train_and_evaluate(config, str(tmp_path))
  config = tiny_config()
  config.data.name = "digits"
  with pytest.raises(ValueError, match="codes"):
    generator_trainer.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(ValueError, match="unknown config argument"):
    typed_config.load_config_file(os.path.join(ROOT, "configs", "bigr_l.py") + ":bitz=24")


def test_a_save_writes_small_replicated_arrays_whole_and_large_ones_in_replica_slices(tmp_path):
  """A replicated array is written by one replica below `MIN_REPLICA_SLICE_BYTES` a slice (no slicing program:
  orbax sliced every array, 2,500 slices a save of the runlocal model on 8 devices) and by every replica above it;
  either way the checkpoint restores bit for bit."""
  mesh = jax.make_mesh((8,), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  large_rows = 8 * checkpoints.MIN_REPLICA_SLICE_BYTES // (4 * 1024)  # 8 slices of the least size, float32
  states = {"small": {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)},
            "large": {"w": jnp.arange(large_rows * 1024, dtype=jnp.float32).reshape(large_rows, 1024)}}
  lowered = []
  listener = lambda event, duration, **kw: lowered.append(event) if event.endswith("jaxpr_to_mlir_module_duration") \
      else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for name, state in states.items():
      state = jax.device_put(state, replicated)
      lowered.clear()
      writer = checkpoints.Checkpointer(tmp_path / name, async_save=False, with_data=False)
      writer.save(1, state)
      writer.close()
      assert (len(lowered) > 0) == (name == "large"), (name, lowered)
      abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
      reader = checkpoints.Checkpointer(tmp_path / name, with_data=False)
      jax.tree_util.tree_map(np.testing.assert_array_equal, reader.restore(abstract, None, 1), state)
      reader.close()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
