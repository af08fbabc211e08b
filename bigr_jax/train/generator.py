"""Training of the BiGR generator: sharded init, jitted donated train step, EMA, checkpoints, metrics."""

import functools
import logging
import math
import pathlib
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigr_jax import parallel
from bigr_jax.convert import generator_weights
from bigr_jax.models import bigr
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.train import checkpoints, metrics as metrics_lib, state as state_lib


def generator_config(config: ml_collections.ConfigDict) -> GeneratorConfig:
  return GeneratorConfig(**config.model.to_dict())


class GeneratorTrainer:
  """Everything compiled for one config on one mesh: init, train step, shardings."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, total_steps: int):
    self.config = config
    self.mesh = mesh
    self.model_config = generator_config(config)
    self.model = bigr.BiGR(self.model_config)
    self.rules = parallel.rules_from_config(config)
    decay_mask = generator_weights.weight_decay_mask(self.model_config)
    self.optimizer = state_lib.make_optimizer(config.optim, total_steps, decay_mask)

    boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
    self.state_shardings = parallel.logical_shardings(boxed, mesh, self.rules)
    self.abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
        self.state_shardings)
    self.init = jax.jit(lambda key: nn.meta.unbox(self._init_boxed(key)), out_shardings=self.state_shardings)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, None, None),
                              out_shardings=(self.state_shardings, parallel.replicated(mesh)), donate_argnums=0)

  def _init_boxed(self, key):
    params = self.model.init({"params": key}, *bigr.init_inputs(self.model_config))["params"]
    # Optimizer state is built from unboxed params and inherits their logical axes below.
    state = state_lib.create_state(nn.meta.unbox(params), self.optimizer)
    return state.replace(params=params, ema_params=params,
                         opt_state=_box_like(state.opt_state, params))

  def _train_step(self, state: state_lib.TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    rngs = dict(zip(("mask", "diffusion", "label_drop", "dropout"), jax.random.split(key, 4)))

    def loss_fn(params):
      return self.model.apply({"params": params}, batch["bits"], batch["label"], deterministic=False,
                              rngs=rngs, method=bigr.BiGR.loss)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    ema = state_lib.ema_update(state.ema_params, params, self.config.ema_decay)
    metrics = dict(metrics, grad_norm=_global_norm(grads))
    return state_lib.TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def _box_like(opt_state, boxed_params):
  """Gives optimizer moments the logical axes of their params (scalars stay replicated)."""
  params_def = jax.tree_util.tree_structure(nn.meta.unbox(boxed_params))
  boxed_leaves = jax.tree_util.tree_leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

  def box(subtree):
    if jax.tree_util.tree_structure(subtree) == params_def:
      return jax.tree_util.tree_unflatten(
          params_def, [b.replace_boxed(v) if isinstance(b, nn.LogicallyPartitioned) else v
                       for b, v in zip(boxed_leaves, jax.tree_util.tree_leaves(subtree))])
    return subtree

  return jax.tree_util.tree_map(box, opt_state, is_leaf=lambda x: jax.tree_util.tree_structure(x) == params_def)


def total_steps(config, num_examples: Optional[int]) -> int:
  """Training length from `total_steps`, or from `num_epochs` and the dataset size."""
  if config.get("total_steps"):
    return int(config.total_steps)
  if config.get("num_epochs") and num_examples:
    return int(math.ceil(config.num_epochs * num_examples / config.batch_size))
  raise ValueError("set config.total_steps, or config.num_epochs with a dataset of known size")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, batches=None) -> state_lib.TrainState:
  """Trains (or resumes) a generator in `workdir`. `batches` overrides the configured data pipeline.

  A batch is a dict of host-local numpy arrays: bits (b, N, K) in {0, 1} and label (b,).
  """
  from bigr_jax.train import data_feed
  workdir = pathlib.Path(workdir)
  mesh = parallel.make_mesh(config.mesh)
  parallel.batch_size_per_process(config.batch_size, mesh)  # fails early on a batch the mesh cannot split
  feed = data_feed.generator_feed(config) if batches is None else data_feed.Feed(iter(batches), None, None)
  steps = total_steps(config, feed.num_examples)
  trainer = GeneratorTrainer(config, mesh, steps)
  ckpt = checkpoints.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                                  with_data=feed.checkpointable is not None)
  checkpoints.save_config(config, workdir)

  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(trainer.abstract_state, feed.checkpointable)
    logging.info("resumed from step %d in %s", start, ckpt.directory)
  else:
    state = trainer.init(jax.random.key(config.seed))
    if config.get("init_from"):
      state = _load_initial_params(config, trainer, state)
  start = int(jax.device_get(state.step))

  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.get("tensorboard", True))
  progress = metrics_lib.Progress(steps, config.batch_size, bigr.train_flops_per_image(trainer.model_config),
                                  config.get("peak_flops_per_device", 0.0))
  preempted = checkpoints.PreemptionFlag()
  train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  pending, history = None, []
  log_every, ckpt_every = config.log_every, config.checkpoint_every

  def check_finite(step, values):
    if not np.isfinite(values["loss"]):
      last = ckpt.latest_step()
      raise FloatingPointError(f"loss is {values['loss']} at step {step}; stopping. The last good checkpoint "
                               f"is step {last} in {ckpt.directory}. Lower the lr or check the data.")

  try:
    with jax.set_mesh(mesh):
      for step in range(start, steps):
        batch = parallel.to_global(next(feed.iterator), mesh)
        state, step_metrics = trainer.train_step(state, batch, train_key)
        # Metrics of the previous step are fetched now, so the host never waits on the device.
        if pending is not None:
          values = jax.device_get(pending[1])
          check_finite(pending[0], values)
          history.append(values)
        pending = (step + 1, step_metrics)
        done = step + 1
        if done % log_every == 0 or done == steps:
          values = jax.device_get(step_metrics)
          check_finite(done, values)
          history.append(values)
          pending = None
          scalars = {**metrics_lib.mean_metrics(history), **progress.measure(done)}
          history = []
          writer.write(done, scalars)
          if jax.process_index() == 0:
            logging.info(metrics_lib.format_line(done, steps, scalars))
            print(metrics_lib.format_line(done, steps, scalars), flush=True)
        stop = preempted.is_set() or ckpt.manager.reached_preemption(done)
        if done % ckpt_every == 0 or done == steps or stop:
          if pending is not None:  # never checkpoint a state whose loss was not finite
            check_finite(done, jax.device_get(pending[1]))
          ckpt.save(done, state, feed.checkpointable, force=stop)
        if stop:
          logging.warning("preempted: saved step %d, exiting", done)
          break
  finally:
    ckpt.close()
    writer.close()
    preempted.restore_handler()
  return state


def _load_initial_params(config, trainer: GeneratorTrainer, state):
  """Starts from converted weights (an orbax params checkpoint written by `python -m bigr_jax.convert`)."""
  from bigr_jax.convert import params_io
  params = params_io.load_params(config.init_from, trainer.abstract_state.params)
  return state.replace(params=params, ema_params=jax.tree_util.tree_map(jnp.copy, params))
