"""Train state (params, EMA, optimizer), the optimizer as the original builds it, and the EMA update."""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Constant (the original), or linear warmup then constant / cosine decay."""
  lr, warmup = optim_config.lr, int(optim_config.get("warmup_steps", 0))
  kind = optim_config.get("schedule", "constant")
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup), alpha=optim_config.get("min_lr_ratio", 0.0))
  else:
    raise ValueError(f"unknown lr schedule {kind!r}: use 'constant' or 'cosine'")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim_config, total_steps: int, decay_mask: Any) -> optax.GradientTransformation:
  """AdamW(b1, b2) with global-norm clipping and a decay mask; optional gradient accumulation."""
  kind = optim_config.get("name", "adamw")
  schedule = learning_rate_schedule(optim_config, total_steps)
  if kind == "adamw":
    opt = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.get("eps", 1e-8),
                      weight_decay=optim_config.weight_decay, mask=decay_mask)
  elif kind == "adam":
    opt = optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.get("eps", 1e-8))
  else:
    raise ValueError(f"unknown optimizer {kind!r}: use 'adamw' or 'adam'")
  if optim_config.get("grad_clip", 0.0):
    opt = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), opt)
  accum = int(optim_config.get("grad_accum_steps", 1))
  if accum > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=accum)
  return opt


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
  from bigr_jax import parallel
  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    nn.meta.unbox(boxed), shardings)
  init = jax.jit(lambda key: nn.meta.unbox(init_boxed(key)), out_shardings=shardings)
  return init, shardings, abstract
