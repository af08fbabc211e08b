"""Training of the BiGR generator: sharded init, jitted donated train step, EMA, checkpoints, metrics."""

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bigr_jax import artifacts, parallel
from bigr_jax.weights import generator_weights
from bigr_jax.models import bigr
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.train import data_feed, loop, state as state_lib


def weight_decay_mask(config: GeneratorConfig) -> dict:
  """True for the tensors the original decays: >= 2 dims (as PyTorch sees them), not biases, not the transcoder."""
  shapes = generator_weights.expected_torch_shapes(config)
  return traverse_util.unflatten_dict({
      e.flax_path: (len(shapes[e.torch_key]) >= 2 and not e.torch_key.endswith(".bias")
                    and not e.torch_key.startswith("denoise_mlp."))
      for e in generator_weights.entries(config)})


class GeneratorTrainer:
  """Everything compiled for one config on one mesh: init, train step, shardings."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, total_steps: int):
    self.config = config
    self.mesh = mesh
    self.model_config = GeneratorConfig.from_config(config.model)
    self.model = bigr.BiGR(self.model_config)
    self.rules = parallel.rules_from_config(config)
    decay_mask = weight_decay_mask(self.model_config)
    self.optimizer = state_lib.make_optimizer(config.optim, total_steps, decay_mask)

    self.init, self.state_shardings, self.abstract_state = state_lib.sharded_init(self._init_boxed, mesh, self.rules)
    self.train_step = parallel.MeshJit(self._train_step, mesh, in_shardings=(self.state_shardings, None, None),
                                       out_shardings=(self.state_shardings, parallel.replicated(mesh)),
                                       donate_argnums=0)
    # The same step with its draws given (the training-parity test injects the original's).
    self.train_step_with_draws = parallel.MeshJit(
        self.update, mesh, in_shardings=(self.state_shardings, None, None, None),
        out_shardings=(self.state_shardings, parallel.replicated(mesh)), donate_argnums=0)

  def abstract_batch(self, global_batch_size: int) -> dict:
    """ShapeDtypeStructs of a global batch, split over the batch axes: lowers the step without data."""
    cfg, mesh = self.model_config, self.mesh
    return {"bits": jax.ShapeDtypeStruct((global_batch_size, cfg.seq_len, cfg.binary_size), jnp.float32,
                                         sharding=parallel.batch_sharding(mesh, 3)),
            "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32, sharding=parallel.batch_sharding(mesh, 1))}

  def _init_boxed(self, key):
    params = self.model.init({"params": key}, *bigr.init_inputs(self.model_config))["params"]
    # Optimizer state is built from unboxed params and inherits their logical axes below.
    state = state_lib.create_state(nn.meta.unbox(params), self.optimizer)
    return state.replace(params=params, ema_params=params,
                         opt_state=state_lib.box_like_params(state.opt_state, params))

  def _train_step(self, state: state_lib.TrainState, batch, key):
    """One step: this step's random draws (`BiGR.loss_draws`, from `key` folded with the step), then `update`."""
    key = jax.random.fold_in(key, state.step)
    rngs = dict(zip(("mask", "diffusion", "label_drop", "dropout"), jax.random.split(key, 4)))
    with nn.logical_axis_rules(self.rules):
      draws = self.model.apply({"params": state.params}, batch["bits"], rngs=rngs, method=bigr.BiGR.loss_draws)
    return self.update(state, batch, draws, rngs["dropout"])

  def loss_and_grads(self, params, batch, draws: bigr.LossDraws, dropout_key):
    """((loss, metrics), gradients) of a batch under the given draws."""
    def loss_fn(params):
      with nn.logical_axis_rules(self.rules):  # activates the models' activation sharding constraints
        return self.model.apply({"params": params}, batch["bits"], batch["label"], draws, deterministic=False,
                                rngs={"dropout": dropout_key}, method=bigr.BiGR.loss)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def update(self, state: state_lib.TrainState, batch, draws: bigr.LossDraws, dropout_key):
    """The optimizer step (clipping, AdamW with its decay mask) and the EMA, given the step's draws."""
    (_, metrics), grads = self.loss_and_grads(state.params, batch, draws, dropout_key)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.ema_update(state.ema_params, params, self.config.ema_decay)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return state_lib.TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, batches=None) -> state_lib.TrainState:
  """Trains (or resumes) a generator in `workdir`. `batches` overrides the configured data pipeline.

  A batch is a dict of host-local numpy arrays: bits (b, N, K) in {0, 1} and label (b,).
  """
  mesh = parallel.make_mesh(config.mesh)
  parallel.batch_size_per_process(config.batch_size, mesh)  # fails early on a batch the mesh cannot split
  feed = data_feed.generator_feed(config) if batches is None else loop.Feed(iter(batches), None, None)
  steps = loop.total_steps(config, feed.num_examples)
  trainer = GeneratorTrainer(config, mesh, steps)

  def init():
    state = trainer.init(jax.random.key(config.seed))
    return _load_initial_params(config, trainer, state) if config.init_from else state

  return loop.train(config, workdir, mesh=mesh, feed=feed, steps=steps, init=init,
                  abstract_state=trainer.abstract_state, train_step=trainer.train_step,
                  flops_per_image=bigr.train_flops_per_image(trainer.model_config))


def _load_initial_params(config, trainer: GeneratorTrainer, state):
  """Starts from other weights: converted params, a released PyTorch file or another run's workdir (EMA)."""
  params = artifacts.generator_params(config.init_from, trainer.model_config, abstract=trainer.abstract_state.params)
  return state.replace(params=params, ema_params=jax.tree_util.tree_map(jnp.copy, params))
