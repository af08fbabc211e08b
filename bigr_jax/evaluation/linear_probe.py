"""Linear probe on frozen features: MAE's protocol (`main_linprobe.py`, the default, for ImageNet-sized sets) or
multinomial logistic regression solved to convergence (`optimizer="lbfgs"`, for features that fit in memory).

The head is BatchNorm1d without affine parameters (eps 1e-6) and a linear layer (weights N(0, 0.01),
bias 0), trained with cross-entropy by LARS (momentum 0.9, trust coefficient 1e-3, biases excluded from
the trust ratio and from weight decay) for 90 epochs at batch 16384, lr = base_lr 0.1 x batch / 256,
no weight decay, a linear warmup of 10 epochs and then a half cosine to `min_lr`, the lr set every step
from the fractional epoch. Top-1 / top-5 come from the running BatchNorm statistics.

BatchNorm's running statistics start at mean 0 / variance 1 and move by 10% a step, as in torch; a probe
of fewer than ~100 steps evaluates with statistics that have not converged (tiny data sets: lower the
batch or raise the epochs).

Differences from MAE, all because the features are fixed and pre-extracted: no data augmentation
(MAE's probe re-encodes RandomResizedCrop + flip views each epoch), and optax's LARS puts the lr into the
momentum buffer (MAE multiplies the buffer by the current lr); the two agree for a constant lr.

MAE's recipe needs ImageNet's thousands of steps: LARS moves each weight matrix by about lr x trust (1e-3) of its
norm per step, so a few hundred steps on a small set leave the head at its initialisation (measured on the digits
demo: 16% top-1 where the same features hold 90%, docs/quality.md). `optimizer="lbfgs"` is the convex
alternative (as CLIP's and DINO's small-set evaluations): the features standardised (BatchNorm's statistics, without
affine), softmax regression with an L2 penalty on the weights, full batch, by L-BFGS until the gradient norm is
below `tol`; the penalty is the value of `l2_grid` that scores best on a held-out `val_fraction` of the training
split, then the head is fitted again on the whole split.

Every result carries `train_top1` and `final_loss` (the training cross-entropy) beside the test figures, and a
`fit_warning` (also logged) where the probe did not fit: a final loss above half of chance's ln(classes), or an
L-BFGS fit that stopped at `max_iter` before `tol`.
"""

import dataclasses
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigr_jax import console, parallel
from bigr_jax.config_sections import MeshConfig, ProbeConfig


class FeatureNorm(nn.Module):
  """torch's BatchNorm1d(affine=False): batch statistics in training (running variance unbiased)."""
  eps: float = 1e-6
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool):
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(x.shape[-1], jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones(x.shape[-1], jnp.float32))
    if train:
      batch_mean = jnp.mean(x, axis=0)
      batch_var = jnp.mean(jnp.square(x - batch_mean), axis=0)
      if not self.is_initializing():
        n = x.shape[0]
        mean.value = (1 - self.momentum) * mean.value + self.momentum * batch_mean
        var.value = (1 - self.momentum) * var.value + self.momentum * batch_var * n / max(n - 1, 1)
      return (x - batch_mean) * jax.lax.rsqrt(batch_var + self.eps)
    return (x - mean.value) * jax.lax.rsqrt(var.value + self.eps)


class LinearHead(nn.Module):
  num_classes: int
  bn_eps: float = 1e-6
  bn_momentum: float = 0.1
  init_std: float = 0.01

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = FeatureNorm(self.bn_eps, self.bn_momentum, name="norm")(x.astype(jnp.float32), train)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(self.init_std),
                    precision=jax.lax.Precision.HIGHEST, name="head")(x)


def lr_schedule(config: ProbeConfig, steps_per_epoch: int):
  """MAE's `adjust_learning_rate`, per step from the fractional epoch."""
  def schedule(step):
    epoch = step / steps_per_epoch
    warm = config.lr * epoch / config.warmup_epochs if config.warmup_epochs > 0 else config.lr
    span = max(config.epochs - config.warmup_epochs, 1e-9)
    cosine = config.min_lr + (config.lr - config.min_lr) * 0.5 * (
        1.0 + jnp.cos(jnp.pi * (epoch - config.warmup_epochs) / span))
    return jnp.where(epoch < config.warmup_epochs, warm, cosine)
  return schedule


def make_optimizer(config: ProbeConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  schedule = lr_schedule(config, steps_per_epoch)
  matrices = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731  (MAE: p.ndim > 1)
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay, matrices),
                       optax.sgd(schedule, momentum=config.momentum))
  return optax.lars(schedule, weight_decay=config.weight_decay, weight_decay_mask=matrices,
                    trust_coefficient=config.trust_coefficient, eps=0.0, trust_ratio_mask=matrices,
                    momentum=config.momentum)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
  """{'top1': %, 'top5': %}; k is capped at the number of classes."""
  order = np.argsort(-logits, axis=-1)
  out = {}
  for k in ks:
    hit = (order[:, :min(k, logits.shape[-1])] == labels[:, None]).any(axis=-1)
    out[f"top{k}"] = 100.0 * float(hit.mean()) if len(labels) else float("nan")
  return out


class _Compiled:
  """Jitted init / train step / predict for one (config, classes, mesh); reused across layers of equal dim."""

  def __init__(self, config: ProbeConfig, num_classes: int, steps_per_epoch: int, mesh):
    self.model = LinearHead(num_classes, config.bn_eps, config.bn_momentum, config.init_std)
    self.optimizer = make_optimizer(config, steps_per_epoch)
    self.mesh = mesh
    replicated = parallel.replicated(mesh)
    rows, matrix = parallel.batch_sharding(mesh, 1), parallel.batch_sharding(mesh, 2)
    self.init = jax.jit(self._init, static_argnums=1, out_shardings=replicated)
    self.step = jax.jit(self._step, in_shardings=(replicated, matrix, rows), out_shardings=(replicated, replicated),
                        donate_argnums=0)
    self.predict = jax.jit(self._predict, in_shardings=(replicated, matrix), out_shardings=matrix)

  def _init(self, key, dim: int):
    variables = self.model.init(key, jnp.zeros((2, dim), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "opt_state": self.optimizer.init(variables["params"])}

  def _step(self, state, x, y):
    def loss_fn(params):
      logits, updates = self.model.apply({"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                                         mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

  def _predict(self, state, x):
    return self.model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, x, train=False)


def _padded_rows(x: np.ndarray, size: int) -> np.ndarray:
  return x if len(x) == size else np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def predict_logits(compiled: _Compiled, state, features: np.ndarray, batch_size: int) -> np.ndarray:
  """Logits of every row, in padded batches of `batch_size` (a multiple of the batch shards)."""
  out = []
  for start in range(0, len(features), batch_size):
    chunk = features[start:start + batch_size]
    x = parallel.from_same_on_every_host(_padded_rows(np.asarray(chunk, np.float32), batch_size), compiled.mesh)
    out.append(parallel.to_host(compiled.predict(state, x))[:len(chunk)])
  return np.concatenate(out)


def _round_down(value: int, multiple: int) -> int:
  return max(multiple, value // multiple * multiple)


def train_probe(train_features: np.ndarray, train_labels: np.ndarray, eval_features: np.ndarray,
                eval_labels: np.ndarray, config: ProbeConfig = ProbeConfig(), *, num_classes: Optional[int] = None,
                mesh=None, log_every_epochs: int = 10, _cache: Optional[dict] = None) -> dict:
  """Trains one probe and reports top-1 / top-5 (percent) on the eval set.

  Features are (N, D) float arrays on the host; every step gathers one shuffled batch and shards it over
  the mesh's batch axes (on several processes, each holds the whole arrays and all fit the probe together). The
  last partial batch of an epoch is dropped, as MAE's loader does. A batch larger than the training set is cut to
  it (and to a multiple of the batch shards), which also lowers the scaled lr; the result records the batch used.

  Returns:
    dict(top1, top5, train_top1, final_loss, fit_warning, lr, batch_size, steps, epochs); with lbfgs,
    dict(top1, top5, train_top1, final_loss, fit_warning, l2, val_top1 (per l2), iterations, converged).
  """
  if mesh is None:
    mesh = parallel.make_mesh(_single_axis_mesh_config(), jax.devices())
  train_features = np.asarray(train_features, np.float32)
  eval_features = np.asarray(eval_features, np.float32)
  train_labels, eval_labels = np.asarray(train_labels, np.int32), np.asarray(eval_labels, np.int32)
  if train_features.ndim != 2 or len(train_features) != len(train_labels):
    raise ValueError(f"train features {train_features.shape} / labels {train_labels.shape} do not match")
  num_classes = int(num_classes or max(train_labels.max(), eval_labels.max(initial=0)) + 1)
  if config.optimizer == "lbfgs":
    result = fit_logistic_regression(train_features, train_labels, eval_features, eval_labels, config,
                                     num_classes=num_classes, mesh=mesh, _cache=_cache)
  else:
    result = _train_sgd_probe(train_features, train_labels, eval_features, eval_labels, config,
                              num_classes=num_classes, mesh=mesh, log_every_epochs=log_every_epochs, _cache=_cache)
  result["fit_warning"] = fit_warning(result)
  if result["fit_warning"]:
    console.warn(f"probe: {result['fit_warning']}")
  return result


def fit_warning(result: dict) -> str:
  """Why the probe did not fit its training split ('' when it did)."""
  chance_loss = float(np.log(result["num_classes"]))
  if not result["final_loss"] < 0.5 * chance_loss:  # NaN included
    return (f"the probe did not fit: training loss {result['final_loss']:.3f} is above half of chance's "
            f"{chance_loss:.3f} (train top-1 {result['train_top1']:.1f}%); raise its steps or lr, or use "
            "optimizer='lbfgs'")
  if result.get("converged") is False:
    return (f"L-BFGS stopped at max_iter={result['iterations']} before its gradient norm reached tol; raise "
            "max_iter or the L2 penalty")
  return ""


def _train_sgd_probe(train_features, train_labels, eval_features, eval_labels, config: ProbeConfig, *,
                     num_classes, mesh, log_every_epochs, _cache) -> dict:
  """MAE's probe (LARS, or momentum SGD): BatchNorm without affine and a linear head, in shuffled batches."""
  multiple = parallel.round_up_to_shards(1, mesh)
  batch = _round_down(min(config.batch_size, len(train_features)), multiple)
  if batch != config.batch_size:
    console.warn(f"probe: batch {config.batch_size} -> {batch} ({len(train_features)} training examples, "
                 f"{multiple} batch shards)")
    config = dataclasses.replace(config, batch_size=batch)
  eval_batch = parallel.round_up_to_shards(min(config.eval_batch_size, max(len(eval_features), 1)), mesh)
  steps_per_epoch = len(train_features) // batch
  if steps_per_epoch * config.epochs < 100:
    console.warn(f"probe: only {steps_per_epoch * config.epochs} steps; BatchNorm's running statistics may not "
                 "converge")
  key = (config, num_classes, steps_per_epoch, id(mesh))
  cache = _cache if _cache is not None else {}
  if key not in cache:
    cache[key] = _Compiled(config, num_classes, steps_per_epoch, mesh)
  compiled = cache[key]
  state = compiled.init(jax.random.key(config.seed), train_features.shape[1])
  rng = np.random.default_rng(config.seed)
  loss = jnp.nan
  for epoch in range(config.epochs):
    order = rng.permutation(len(train_features))
    for i in range(steps_per_epoch):
      index = np.sort(order[i * batch:(i + 1) * batch])  # sorted: faster gathers from large (mmap) arrays
      x = parallel.from_same_on_every_host(train_features[index], mesh)
      y = parallel.from_same_on_every_host(train_labels[index], mesh)
      state, loss = compiled.step(state, x, y)
      # One step in flight at a time: with steps queued back to back, XLA's CPU client can deadlock on fake
      # multi-device meshes (some devices enter a step's all-reduce while the rest wait on its execution
      # semaphore), which XLA ends by aborting the process. The probe's steps are small; waiting costs little.
      jax.block_until_ready(loss)
    if log_every_epochs and (epoch + 1) % log_every_epochs == 0:
      print(f"probe: epoch {epoch + 1}/{config.epochs} loss {float(loss):.4f}", flush=True)
  result = topk_accuracy(predict_logits(compiled, state, eval_features, eval_batch), eval_labels)
  train_eval = train_features[:eval_batch * 4]  # a bounded sample: enough to see over/under-fitting
  result["train_top1"] = topk_accuracy(predict_logits(compiled, state, train_eval, eval_batch),
                                       train_labels[:len(train_eval)])["top1"]
  result.update(final_loss=float(loss), lr=config.lr, batch_size=batch, steps=steps_per_epoch * config.epochs,
                epochs=config.epochs, num_classes=num_classes)
  return result


def _logistic_regression_program(config: ProbeConfig, num_classes: int, mesh):
  """jit(fit(x, y, weights, l2) -> (kernel, bias, iterations, gradient norm)): softmax regression on standardised
  rows x (weight 0: padding), mean cross-entropy + l2 / 2 |kernel|^2, by L-BFGS (optax's, zoom line search) from
  zero until the gradient norm is below `tol` or `max_iter` iterations."""
  solver = optax.lbfgs()

  def fit(x, y, weights, l2):
    def objective(params):
      logits = jnp.dot(x, params["kernel"], precision=jax.lax.Precision.HIGHEST) + params["bias"]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum(loss * weights) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(jnp.square(params["kernel"]))

    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
      return optax.apply_updates(params, updates), state

    def going(carry):
      count = optax.tree_utils.tree_get(carry[1], "count")
      grad_norm = optax.tree.norm(optax.tree_utils.tree_get(carry[1], "grad"))
      return (count == 0) | ((count < config.max_iter) & (grad_norm >= config.tol))

    params = {"kernel": jnp.zeros((x.shape[1], num_classes), jnp.float32),
              "bias": jnp.zeros((num_classes,), jnp.float32)}
    params, state = jax.lax.while_loop(going, step, (params, solver.init(params)))
    return (params["kernel"], params["bias"], optax.tree_utils.tree_get(state, "count"),
            optax.tree.norm(optax.tree_utils.tree_get(state, "grad")))

  rows, matrix = parallel.batch_sharding(mesh, 1), parallel.batch_sharding(mesh, 2)
  return jax.jit(fit, in_shardings=(matrix, rows, rows, None))


def fit_logistic_regression(train_features, train_labels, eval_features, eval_labels, config: ProbeConfig, *,
                            num_classes: int, mesh, _cache=None) -> dict:
  """The convex probe (`optimizer="lbfgs"`): standardise, choose the L2 penalty on a held-out part of the
  training split, fit on the whole split, score."""
  mean = train_features.mean(axis=0, dtype=np.float64)
  scale = 1.0 / np.sqrt(train_features.var(axis=0, dtype=np.float64) + config.bn_eps)
  standardise = lambda x: ((x - mean) * scale).astype(np.float32)  # noqa: E731
  train_x, eval_x = standardise(train_features), standardise(eval_features)
  cache = _cache if _cache is not None else {}
  key = ("lbfgs", config.max_iter, config.tol, num_classes, id(mesh))
  if key not in cache:
    cache[key] = _logistic_regression_program(config, num_classes, mesh)
  fit = cache[key]

  def fit_rows(x, y, l2):
    padded = parallel.round_up_to_shards(len(x), mesh)  # zero-weight rows fill the last shard
    weights = np.zeros(padded, np.float32)
    weights[:len(x)] = 1.0
    kernel, bias, iterations, grad_norm = fit(
        *(parallel.from_same_on_every_host(a, mesh) for a in (_padded_rows(x, padded), _padded_rows(y, padded),
                                                               weights)), np.float32(l2))
    return (parallel.to_host(kernel), parallel.to_host(bias), int(parallel.to_host(iterations)),
            float(parallel.to_host(grad_norm)))

  order = np.random.default_rng(config.seed).permutation(len(train_x))
  held = order[:max(1, int(round(config.val_fraction * len(train_x))))]
  kept = order[len(held):]
  val_top1 = {}
  for l2 in config.l2_grid:
    kernel, bias, _, _ = fit_rows(train_x[kept], train_labels[kept], l2)
    val_top1[float(l2)] = topk_accuracy(train_x[held] @ kernel + bias, train_labels[held], ks=(1,))["top1"]
  best_l2 = max(val_top1, key=lambda l2: (val_top1[l2], l2))  # ties: the stronger penalty
  kernel, bias, iterations, grad_norm = fit_rows(train_x, train_labels, best_l2)
  train_logits = train_x @ kernel + bias
  result = topk_accuracy(eval_x @ kernel + bias, eval_labels)
  result.update(train_top1=topk_accuracy(train_logits, train_labels, ks=(1,))["top1"],
                final_loss=float(np.mean(optax.softmax_cross_entropy_with_integer_labels(train_logits, train_labels))),
                l2=best_l2, val_top1=val_top1, iterations=iterations, gradient_norm=grad_norm,
                converged=grad_norm < config.tol, num_classes=num_classes)
  return result


def layer_sweep(train_features: Mapping[int, np.ndarray], train_labels: np.ndarray,
                eval_features: Mapping[int, np.ndarray], eval_labels: np.ndarray,
                config: ProbeConfig = ProbeConfig(), *, mesh=None, num_classes: Optional[int] = None) -> dict:
  """One probe per layer -> {layer: result of `train_probe`}, plus 'best': (layer, top1)."""
  missing = sorted(set(train_features) ^ set(eval_features))
  if missing:
    raise ValueError(f"layers {missing} are in only one of the train / eval feature sets")
  cache: dict = {}
  results = {}
  for layer in sorted(train_features):
    results[layer] = train_probe(train_features[layer], train_labels, eval_features[layer], eval_labels, config,
                                 mesh=mesh, num_classes=num_classes, _cache=cache)
    print(f"probe: layer {layer} top1 {results[layer]['top1']:.2f} top5 {results[layer]['top5']:.2f}", flush=True)
  best = max(results, key=lambda layer: results[layer]["top1"])
  return {"layers": results, "best_layer": best, "best_top1": results[best]["top1"],
          "best_top5": results[best]["top5"]}


def _single_axis_mesh_config():
  return MeshConfig(data=-1, fsdp=1, tensor=1)
