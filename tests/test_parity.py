"""Parity with outputs recorded from the original PyTorch code, for any fixture config of that form.

Fixture sets: `*generator_io*.npz` beside a `*generator_state_dict*.npz` twin, and `*schedules*.npz`, in the
directory given by BIGR_PARITY_FIXTURES (default tests/fixtures/bigr_original).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigr_jax.weights import generator_weights
from bigr_jax.models import bigr, config as config_lib, transcoder
from bigr_jax.sampling import schedules

TOL = 1e-5


def _generator_sets(parity_dir):
  sets = []
  for io_path in sorted(parity_dir.glob("*generator_io*.npz")):
    sd_path = io_path.with_name(io_path.name.replace("generator_io", "generator_state_dict"))
    if sd_path.exists():
      sets.append((io_path, sd_path))
  return sets


def _close(got, want, name):
  err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
  scale = max(1.0, float(np.max(np.abs(want))))
  assert err <= TOL * scale, f"{name}: max abs error {err:.3g}"
  return err


@pytest.fixture(scope="module", params=[(True, "xla"), (False, "xla"), (True, "splash")],
                ids=["scanned", "unrolled", "scanned-splash"])
def loaded(request, parity_dir):
  sets = _generator_sets(parity_dir)
  if not sets:
    pytest.skip(f"no generator fixtures in {parity_dir}")
  out = []
  for io_path, sd_path in sets:
    io = dict(np.load(io_path))
    state_dict = dict(np.load(sd_path))
    scan_layers, attention = request.param
    cfg = config_lib.from_model_args(str(io["config"]), scan_layers=scan_layers, attention=attention)
    out.append((io, state_dict, cfg, generator_weights.torch_to_flax(state_dict, cfg)))
  return out


def test_trunk_outputs(loaded):
  for io, _, cfg, params in loaded:
    model = bigr.BiGR(cfg)
    cond = model.apply({"params": params}, io["cfg_x"], io["cfg_cond"], io["cfg_mask"],
                       method=bigr.BiGR.condition)
    _close(cond.reshape(-1, cfg.dim), io["transcoder_cond"], "transcoder_cond")
    pos = params["diffusion_pos_embed_learned"]
    _close(np.asarray(cond) - pos, io["norm_out"][:, cfg.cls_token_num:], "norm_out")


def test_features(loaded):
  for io, _, cfg, params in loaded:
    layers = sorted(int(k[len("feat_layer"):]) for k in io if k.startswith("feat_layer"))
    feats = bigr.BiGR(cfg).apply({"params": params}, io["inp"], io["cond"], layers, method=bigr.BiGR.features)
    for layer in layers:
      _close(feats[layer], io[f"feat_layer{layer}"], f"feat_layer{layer}")
      # Truncated params (only the blocks needed) give the same features.
      small_cfg, small_params = bigr.truncate_params(cfg, params, layer)
      small = bigr.BiGR(small_cfg).apply({"params": small_params}, io["inp"], io["cond"], [layer],
                                         method=bigr.BiGR.features)
      _close(small[layer], io[f"feat_layer{layer}"], f"truncated feat_layer{layer}")
    pooled = bigr.BiGR(cfg).apply({"params": params}, io["inp"], io["cond"], layers,
                                  method=bigr.BiGR.pooled_features)
    for layer in layers:
      _close(pooled[layer], io[f"feat_layer{layer}"].mean(axis=1), f"pooled feat_layer{layer}")


def test_denoiser_and_loss(loaded):
  for io, _, cfg, params in loaded:
    logits = bigr.BiGR(cfg).apply({"params": params}, io["xt"], io["t_minus_1"], io["transcoder_cond"],
                                  method=bigr.BiGR.denoise)
    _close(logits, io["denoise_logits"], "denoise_logits")
    z0 = io["cfg_x"].reshape(-1, cfg.binary_size)
    target = np.logical_xor(z0 > 0.5, io["xt"] > 0.5).astype(np.float32)
    np.testing.assert_array_equal(target, io["flip_target"])
    wbce = transcoder.weighted_bce(jnp.asarray(io["denoise_logits"]), jnp.asarray(target), cfg.focal, cfg.alpha)
    _close(wbce, io["wbce"], "wbce")
    _close(transcoder.masked_token_mean(wbce, jnp.asarray(io["cfg_mask"])), io["wbce_masked_mean"],
           "wbce_masked_mean")


def test_training_loss_same_in_both_layouts(parity_dir):
  sets = _generator_sets(parity_dir)
  if not sets:
    pytest.skip(f"no generator fixtures in {parity_dir}")
  io_path, sd_path = sets[0]
  io, state_dict = dict(np.load(io_path)), dict(np.load(sd_path))
  rngs = {name: jax.random.key(i) for i, name in enumerate(("mask", "diffusion", "label_drop", "dropout"))}
  losses = []
  for scan in (True, False):
    cfg = config_lib.from_model_args(str(io["config"]), scan_layers=scan)
    params = generator_weights.torch_to_flax(state_dict, cfg)
    draws = bigr.BiGR(cfg).apply({"params": params}, io["inp"], deterministic=True, rngs=rngs,
                                 method=bigr.BiGR.loss_draws)
    loss, _ = bigr.BiGR(cfg).apply({"params": params}, io["inp"], io["cond"], draws, deterministic=True,
                                   method=bigr.BiGR.loss)
    losses.append(float(loss))
  assert np.isfinite(losses[0]) and abs(losses[0] - losses[1]) < 1e-6


def test_state_dict_round_trip(loaded):
  for _, state_dict, cfg, params in loaded:
    back = generator_weights.flax_to_torch(params, cfg)
    assert list(back) == list(state_dict)  # same keys, same order, aliases and buffers included
    for key, value in state_dict.items():
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_schedules(parity_dir):
  paths = sorted(parity_dir.glob("*schedules*.npz"))
  if not paths:
    pytest.skip(f"no schedule fixtures in {parity_dir}")
  for path in paths:
    fx = dict(np.load(path))
    num_steps = fx["k_final"].shape[0] - 1
    buffers = transcoder.linear_schedule(num_steps)
    for name in ("k_final", "b_final", "beta"):
      np.testing.assert_array_equal(buffers[name], fx[name], err_msg=name)
    for key in fx:
      if key.startswith("infer_timesteps_"):
        steps = int(key.rsplit("_", 1)[1])
        np.testing.assert_array_equal(transcoder.inference_timesteps(num_steps, steps), fx[key])
      if key.startswith("unmask_per_iter_"):
        iters = int(key.rsplit("_", 1)[1])
        num_tokens = int(fx[key].sum())  # every token is decoded exactly once
        np.testing.assert_array_equal(schedules.cosine_unmask_counts(num_tokens, iters), fx[key])
