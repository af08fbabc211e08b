"""Training parity: the project's own generator train step against three AdamW steps recorded from the original's
recipe (`train_ddp.py` made deterministic: dropout 0, every random draw recorded, float32), for any fixture set
of that form (`*generator_train_steps*.npz` in BIGR_PARITY_FIXTURES, default tests/fixtures/bigr_original).

What runs is `GeneratorTrainer`'s compiled update (torch-rule clipping, AdamW with the decay mask, EMA) on the
released key layout through the converter, with the fixture's draws injected as `bigr.LossDraws`.

Tolerance: 1e-5 of each tensor's scale (max(1, max |value|)), as the forward parity tests. On the public set the
losses and gradient norms agree to 3e-8, the step-0 gradients to 5e-9, the final parameters to 1e-6 and the EMA to
3e-7: Adam divides each gradient by its own running magnitude, so float32 rounding in a small gradient moves its
parameter by up to a few ulps of lr; 1e-5 leaves room for other shapes and hyperparameters.
"""

import ast
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigr_jax import config_lib, parallel, typed_config
from bigr_jax.weights import generator_weights
from bigr_jax.models import bigr, config as model_config_lib
from bigr_jax.train import generator_trainer, state as state_lib

TOL = 1e-5
NO_DROPOUT = dict(token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def _close(got, want, name):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape}, want {want.shape}"
  err = float(np.max(np.abs(got - want))) if want.size else 0.0
  assert err <= TOL * max(1.0, float(np.max(np.abs(want)))), f"{name}: max abs error {err:.3g}"


def _prefixed(fixture, prefix: str) -> dict:
  return {k[len(prefix):]: fixture[k] for k in fixture if k.startswith(prefix)}


def _trainer(fixture) -> tuple:
  """A trainer for the fixture's model and hyperparameters, on one device (the batch need not split)."""
  hparams = ast.literal_eval(str(fixture["hparams"]))
  model = model_config_lib.from_model_args(str(fixture["config"]), **NO_DROPOUT)
  config = config_lib.base_generator_config()
  config.model = typed_config.to_section(model)
  config.optim.update(lr=hparams["lr"], b1=hparams["betas"][0], b2=hparams["betas"][1], eps=hparams["eps"],
                      weight_decay=hparams["weight_decay"], grad_clip=hparams["max_grad_norm"])
  config.ema_decay = hparams["ema_decay"]
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  return generator_trainer.GeneratorTrainer(config, mesh, total_steps=3), model


def _step_inputs(fixture, step: int):
  batch = {"bits": fixture[f"step{step}/inp"].astype(np.float32),
           "label": fixture[f"step{step}/cond"].astype(np.int32)}
  draws = bigr.LossDraws(token_mask=fixture[f"step{step}/mask"].astype(bool),
                         drop_label=fixture[f"step{step}/drop"].astype(bool),
                         t=fixture[f"step{step}/t"].astype(np.int32), noise=fixture[f"step{step}/u"].astype(np.float32))
  return batch, draws


def _fixture_sets(parity_dir):
  paths = sorted(parity_dir.glob("*generator_train_steps*.npz"))
  if not paths:
    pytest.skip(f"no training-step fixtures in {parity_dir}")
  return [dict(np.load(path)) for path in paths]


def test_three_adamw_steps_equal_the_original(parity_dir):
  for fixture in _fixture_sets(parity_dir):
    trainer, model = _trainer(fixture)
    params = generator_weights.torch_to_flax(_prefixed(fixture, "init/"), model)
    state = state_lib.create_state(params, trainer.optimizer)
    key = jax.random.key(0)  # dropout's, unused at dropout 0

    batch, draws = _step_inputs(fixture, 0)
    (loss, _), grads = jax.jit(trainer.loss_and_grads)(state.params, batch, draws, key)
    _close(loss, fixture["step0/loss"], "step 0 loss")
    torch_grads = generator_weights.flax_to_torch(grads, model, with_aliases=False, with_buffers=False)
    recorded = _prefixed(fixture, "grad0/")
    assert set(recorded) <= set(torch_grads), sorted(set(recorded) - set(torch_grads))
    for name, want in recorded.items():
      _close(torch_grads[name], want, f"step 0 gradient of {name}")

    for step in range(3):
      batch, draws = _step_inputs(fixture, step)
      state, metrics = trainer.train_step_with_draws(state, batch, draws, key)
      _close(metrics["loss"], fixture[f"step{step}/loss"], f"step {step} loss")
      _close(metrics["grad_norm"], fixture[f"step{step}/grad_norm"], f"step {step} gradient norm")
    assert int(state.step) == 3

    for prefix, tree in (("final/", state.params), ("ema/", state.ema_params)):
      got = generator_weights.flax_to_torch(jax.device_get(tree), model)  # the aliased keys too, as saved
      want = _prefixed(fixture, prefix)
      assert set(want) <= set(got), sorted(set(want) - set(got))
      for name, value in want.items():
        _close(got[name], value, f"{prefix}{name}")


def test_weight_decay_mask_equals_the_original(parity_dir):
  for fixture in _fixture_sets(parity_dir):
    model = model_config_lib.from_model_args(str(fixture["config"]), **NO_DROPOUT)
    shapes = nn.meta.unbox(bigr.param_shapes(model))
    mask = jax.tree_util.tree_map(lambda decayed, shape: np.full(shape.shape, float(decayed), np.float32),
                                  generator_trainer.weight_decay_mask(model), shapes)
    as_torch = generator_weights.flax_to_torch(mask, model, with_aliases=False, with_buffers=False)
    recorded = _prefixed(fixture, "decay/")
    assert set(recorded) == set(as_torch), sorted(set(recorded) ^ set(as_torch))
    for name, want in recorded.items():
      assert np.all(as_torch[name] == float(np.asarray(want).max())), name
      assert np.unique(np.asarray(want)).size == 1, name  # one flag per tensor


def test_mask_counts_are_the_original_formula_at_every_step():
  for num_tokens in (16, 64, 256, 576, 768, 1024):
    want = [max(1, math.floor(num_tokens * math.cos(math.pi / 2 * s / num_tokens))) for s in range(num_tokens)]
    np.testing.assert_array_equal(bigr.mask_counts(num_tokens), want, err_msg=f"N={num_tokens}")


def test_drawn_randomness_follows_the_original_distributions():
  """Fixed seeds; each bound is about 5 standard errors of its estimate."""
  num_tokens, draws_n = 64, 20000
  table = bigr.mask_counts(num_tokens)
  counts = jax.vmap(lambda key: bigr.cosine_mask_count(key, num_tokens))(jax.random.split(jax.random.key(0), draws_n))
  # Every step is equally likely: each count's frequency is its share of the table.
  want = np.bincount(table, minlength=num_tokens + 1) / num_tokens
  got = np.bincount(np.asarray(counts), minlength=num_tokens + 1) / draws_n
  assert set(np.unique(np.asarray(counts))) <= set(table)
  np.testing.assert_allclose(got, want, atol=5 * np.sqrt(want.max() / draws_n))

  model = model_config_lib.GeneratorConfig(dim=32, n_layer=1, n_head=2, denoise_hidden_dim=32, num_block_mlp=1,
                                           binary_size=8, block_size=num_tokens, seq_len=num_tokens, num_classes=10,
                                           class_dropout_prob=0.1)
  batch = 4096
  bits = np.zeros((batch, num_tokens, model.binary_size), np.float32)
  params = bigr.init_params(model, jax.random.key(0))
  rngs = {name: jax.random.key(i) for i, name in enumerate(("mask", "diffusion", "label_drop"))}
  draws = jax.device_get(bigr.BiGR(model).apply({"params": params}, bits, rngs=rngs, method=bigr.BiGR.loss_draws))
  row_counts = draws.token_mask.sum(axis=1)
  assert np.all(row_counts == row_counts[0]) and row_counts[0] in table  # one count per batch
  place = draws.token_mask.mean(axis=0)  # each position equally likely to be masked
  expected = row_counts[0] / num_tokens
  assert np.max(np.abs(place - expected)) < 5 * np.sqrt(expected * (1 - expected) / batch) + 1e-9
  rate = draws.drop_label.mean()
  assert abs(rate - 0.1) < 5 * np.sqrt(0.1 * 0.9 / batch), rate
  t = draws.t
  assert t.min() == 1 and t.max() == model.n_sample_steps
  freq = np.bincount(t, minlength=model.n_sample_steps + 1)[1:] / len(t)
  assert np.max(np.abs(freq - 1 / model.n_sample_steps)) < 5 * np.sqrt(1 / model.n_sample_steps / len(t))
  noise = draws.noise.ravel()
  assert 0.0 <= noise.min() and noise.max() < 1.0
  quantiles = np.quantile(noise, [0.1, 0.25, 0.5, 0.75, 0.9])
  np.testing.assert_allclose(quantiles, [0.1, 0.25, 0.5, 0.75, 0.9], atol=0.002)
  # Deterministic draws drop no label.
  kept = bigr.BiGR(model).apply({"params": params}, bits, deterministic=True, rngs=rngs, method=bigr.BiGR.loss_draws)
  assert not np.asarray(kept.drop_label).any()


def test_the_original_warmup_grouping_is_an_option():
  """`optim.warmup_decayed=False`: the original's warmup reaches the undecayed group only."""
  params = {"kernel": np.ones((2, 2), np.float32), "bias": np.ones((2,), np.float32)}
  grads = {"kernel": np.full((2, 2), 0.5, np.float32), "bias": np.full((2,), 0.5, np.float32)}
  mask = {"kernel": True, "bias": False}
  moved = {}
  for warmup_decayed in (True, False):
    optimizer = state_lib.make_optimizer(dict(lr=1e-2, warmup_steps=10, grad_clip=0.0, weight_decay=0.1,
                                              warmup_decayed=warmup_decayed), 100, mask)
    opt_state = optimizer.init(params)
    for _ in range(2):  # the warmup's first rate is 0, its second 1e-3
      updates, opt_state = optimizer.update(grads, opt_state, params)
    moved[warmup_decayed] = {k: float(np.abs(updates[k]).max()) for k in params}
    assert jax.tree_util.tree_structure(opt_state) == jax.tree_util.tree_structure(
        state_lib.make_optimizer(dict(lr=1e-2, grad_clip=0.0), 100, mask).init(params))  # same checkpoint layout
  assert moved[True]["kernel"] == pytest.approx(1e-3 * (1 + 0.1), rel=1e-4)  # rate 1e-3 x (Adam's 1 + decay)
  assert moved[False]["kernel"] == pytest.approx(1e-2 * (1 + 0.1), rel=1e-4)  # the full rate
  assert moved[True]["bias"] == moved[False]["bias"] == pytest.approx(1e-3, rel=1e-4)
