"""Train state (params, EMA, optimizer), the optimizer as the original builds it, and the EMA update."""

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bigr_jax import parallel
from bigr_jax.config_sections import OptimConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup, then constant, cosine or step decay."""
  lr, warmup = optim.lr, optim.warmup_steps
  if optim.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup), alpha=optim.min_lr_ratio)
  else:
    after = optax.piecewise_constant_schedule(lr, {optim.decay_step - warmup: optim.decay_factor})
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim_config, total_steps: int, decay_mask: Any = None) -> optax.GradientTransformation:
  """Adam(W) on the configured schedule, with global-norm clipping, a decay mask (AdamW) and gradient
  accumulation; `optim_config` is an `OptimConfig` or a section it is built from."""
  optim = OptimConfig.from_config(optim_config)
  schedule = learning_rate_schedule(optim, total_steps)
  if optim.name == "adamw" and not optim.warmup_decayed and decay_mask is not None:
    # adamw's own chain, with a per-group rate: the decayed tensors skip the warmup (the original's grouping).
    full_rate = learning_rate_schedule(dataclasses.replace(optim, warmup_steps=0), total_steps)
    rates = jax.tree_util.tree_map(lambda decayed: full_rate if decayed else schedule, decay_mask)
    opt = optax.chain(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
                      optax.add_decayed_weights(optim.weight_decay, decay_mask), scale_by_group_rates(rates))
  elif optim.name == "adamw":
    opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                      mask=decay_mask)
  else:
    opt = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  if optim.grad_clip:
    opt = optax.chain(clip_by_global_norm(optim.grad_clip), opt)
  if optim.grad_accum_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=optim.grad_accum_steps)
  return opt


def scale_by_group_rates(rates) -> optax.GradientTransformation:
  """Scales each update by minus its own schedule (`rates`: a schedule per parameter), counting steps as
  `optax.scale_by_learning_rate` does, so the optimizer state keeps adamw's layout."""
  def update(updates, state, params=None):
    del params
    updates = jax.tree_util.tree_map(lambda u, rate: -rate(state.count) * u, updates, rates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
  return optax.GradientTransformation(lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)),
                                      update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales gradients by min(1, max_norm / (norm + 1e-6)), torch's `clip_grad_norm_`, as the originals clip.
  (optax's rule has no 1e-6 and differs in the last digits.)"""
  def update(grads, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(grads) + 1e-6))
    return jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def ema_update(ema_params, params, decay: float):
  return jax.tree_util.tree_map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema_params, params)


def create_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  # The EMA starts as a copy of the model, as in the original.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=optimizer.init(params))


def box_like_params(opt_state, boxed_params):
  """Gives optimizer moments the logical axes of their params (scalars such as counts stay replicated)."""
  params_def = jax.tree_util.tree_structure(nn.meta.unbox(boxed_params))
  boxed_leaves = jax.tree_util.tree_leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  is_params_like = lambda x: jax.tree_util.tree_structure(x) == params_def  # noqa: E731

  def box(subtree):
    if not is_params_like(subtree):
      return subtree
    return jax.tree_util.tree_unflatten(
        params_def, [b.replace_boxed(v) if isinstance(b, nn.LogicallyPartitioned) else v
                     for b, v in zip(boxed_leaves, jax.tree_util.tree_leaves(subtree))])

  return jax.tree_util.tree_map(box, opt_state, is_leaf=is_params_like)


def sharded_init(init_boxed: Callable, mesh, rules):
  """eval_shape -> shardings from logical axes -> jit(init, out_shardings): nothing is built unsharded.

  `init_boxed(key)` returns a state whose leaves may carry logical axis names. Returns the jitted
  init(key), the state shardings and the abstract state (ShapeDtypeStructs with shardings, for restores).
  """
  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    nn.meta.unbox(boxed), shardings)
  init = jax.jit(lambda key: nn.meta.unbox(init_boxed(key)), out_shardings=shardings)
  return init, shardings, abstract
