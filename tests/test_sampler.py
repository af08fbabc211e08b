"""The jitted sampler against the schedules of the original and a plain-Python rendering of its algorithm."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from bigr_jax import config_sections
from bigr_jax.weights import generator_weights
from bigr_jax.models import bigr, config as config_lib, transcoder
from bigr_jax.sampling import sampler, schedules


@pytest.fixture(scope="module")
def tiny(parity_dir):
  """(config, params) of the tiny generator recorded from the original (N = 16 tokens, K = 8 bits)."""
  io = np.load(parity_dir / "generator_io.npz")
  cfg = config_lib.from_model_args(str(io["config"]))
  return cfg, generator_weights.torch_to_flax(dict(np.load(parity_dir / "generator_state_dict.npz")), cfg)


def _uniform(rng, purpose, shape, *indices):
  return np.asarray(jax.random.uniform(sampler.noise_key(rng, purpose, *indices), shape))


def reference_complete(model_config, params, labels, rng, bits, regenerate, config, *, label_weights=None):
  """The original's `generate_with_cfg` / `inpaint_with_cfg` and `BinaryDiffusion.sample`, step by step.

  A Python loop over numpy arrays around single model calls, written after the original code (CFG batch,
  one_step applied repeatedly, torch-style top-k); only the random draws come from `sampler.noise_key`,
  so that both can be fed the same draws. Ties in the top-k go to the lower index.
  """
  model = bigr.BiGR(model_config)
  condition = jax.jit(lambda *a: model.apply({"params": params}, *a, method=bigr.BiGR.condition))
  denoise = jax.jit(lambda *a: model.apply({"params": params}, *a, method=bigr.BiGR.denoise))
  batch, num_tokens, num_bits = bits.shape
  guided = config.cfg_scale > 1.0
  labels = np.asarray(labels)
  if guided:
    labels = np.concatenate([labels, np.full_like(labels, model_config.null_class)])
    if label_weights is not None:
      label_weights = np.concatenate([label_weights, label_weights])
  buffers = transcoder.linear_schedule(model_config.n_sample_steps)
  steps = transcoder.inference_timesteps(model_config.n_sample_steps, config.infer_steps)
  seq = np.where(regenerate[..., None], 0.0, bits).astype(np.float32)
  unknown = regenerate.copy()
  resample_known = config.resample_known
  budget = int((~regenerate[0]).sum()) if resample_known else int(regenerate[0].sum())

  def decode_one_step(iteration, cfg):
    both = lambda x: np.concatenate([x, x]) if guided else x
    cond = np.asarray(condition(both(seq), labels, both(unknown), label_weights)).reshape(-1, model_config.dim)
    cond_z, uncond_z = np.split(cond, 2) if guided else (cond, None)
    x_t = (_uniform(rng, "init", bits.shape, iteration) < 0.5).astype(np.float32).reshape(-1, num_bits)
    for i, t in enumerate(steps):
      t_minus_1 = np.full((x_t.shape[0],), t - 1, np.int32)
      logits = np.asarray(denoise(x_t, t_minus_1, cond_z)) / config.temperature
      if guided:
        logits_u = np.asarray(denoise(x_t, t_minus_1, uncond_z)) / config.temperature
        logits = logits_u + cfg * (logits - logits_u)
      x0 = 1.0 / (1.0 + np.exp(-logits))
      x0 = x_t * (1 - x0) + (1 - x_t) * x0
      if t != 1:
        t_next = steps[i + 1]
        prior = np.stack([x0, 1 - x0], -1) * buffers["k_final"][t_next] + buffers["b_final"][t_next]
        likelihood = np.stack([x_t, 1 - x_t], -1)
        for back in range(t - t_next):
          beta = buffers["beta"][t - back]
          likelihood = likelihood * beta + 0.5 * (1 - beta)
        probs = prior * likelihood
        probs = (probs / probs.sum(-1, keepdims=True))[..., 0]
        u = _uniform(rng, "diffusion", bits.shape, iteration, i).reshape(-1, num_bits)
        x_t = (u < probs).astype(np.float32)
    return x0.reshape(batch, num_tokens, num_bits)

  def take(pred, chosen, iteration):
    if config.token_sampling == "bernoulli":
      new = (_uniform(rng, "tokens", bits.shape, iteration) < pred).astype(np.float32)
    else:
      new = (pred > 0.5).astype(np.float32)
    seq[chosen] = new[chosen]
    unknown[chosen] = False

  old_len = budget
  for step in range(config.num_iter):
    ratio = 1.0 * (step + 1) / config.num_iter
    rate = np.cos(math.pi / 2.0 * ratio) if config.mask_schedule == "cosine" else 1.0 - ratio
    new_len = math.floor(rate * budget)
    predict_len, old_len = old_len - new_len, new_len
    cfg = 1.0 + (config.cfg_scale - 1.0) * ratio if config.cfg_schedule == "linear" else config.cfg_scale
    tau = {"constant": 1.0, "down": 1.0 - ratio, "up": ratio}[config.gumbel_schedule] * config.gumbel_temp
    pred = decode_one_step(step, cfg)
    if config.ordering == "confidence":
      score = (np.abs(pred - 0.5) * 2.0).mean(-1)
    elif config.ordering == "random":
      score = _uniform(rng, "order", (batch, num_tokens), step).copy()
    else:
      with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(np.nan_to_num(pred * np.log(pred)) + np.nan_to_num((1 - pred) * np.log(1 - pred)))
      score = -entropy.mean(-1)
    score[~unknown] = -np.inf
    score = score + np.float32(tau) * _uniform_gumbel(rng, step, (batch, num_tokens))
    top = np.argsort(-score, axis=1, kind="stable")[:, :predict_len]
    chosen = np.zeros_like(unknown)
    np.put_along_axis(chosen, top, True, axis=1)
    take(pred, chosen, step)
  if unknown.any():  # leftovers, at the unscheduled scale
    pred = decode_one_step(config.num_iter, config.cfg_scale)
    take(pred, unknown.copy(), config.num_iter)
  return seq


def _uniform_gumbel(rng, iteration, shape):
  return np.asarray(jax.random.gumbel(sampler.noise_key(rng, "gumbel", iteration), shape))


def test_schedules_match_the_original(parity_dir):
  fx = np.load(parity_dir / "schedules.npz")
  for key in fx:
    if key.startswith("unmask_per_iter_"):
      iters = int(key.rsplit("_", 1)[1])
      np.testing.assert_array_equal(schedules.cosine_unmask_counts(256, iters), fx[key])
      np.testing.assert_array_equal(schedules.unmask_table(256, iters)[256], fx[key])
  np.testing.assert_array_equal(transcoder.reverse_coefficients(256, 100)["t_minus_1"] + 1,
                                fx["infer_timesteps_100"])
  # pi/2 * r rounded as the original: at the last of 13 iterations cos() is -6e-17 with the other order.
  for iters in (1, 4, 13, 26, 39):
    for schedule in config_sections.MASK_SCHEDULES:
      table = schedules.unmask_table(300, iters, schedule)
      assert (table >= 0).all()
      np.testing.assert_array_equal(table.sum(1), np.arange(301))
  np.testing.assert_allclose(schedules.cfg_scales(3.0, 4, "linear"), [1.5, 2.0, 2.5, 3.0])
  np.testing.assert_allclose(schedules.gumbel_temperatures(1.0, 4, "down"), [0.75, 0.5, 0.25, 0.0])
  np.testing.assert_allclose(schedules.gumbel_temperatures(1.0, 4, "up"), [0.25, 0.5, 0.75, 1.0])


def test_reverse_step_matches_repeated_one_step():
  buffers = transcoder.linear_schedule(256)
  coeffs = transcoder.reverse_coefficients(256, 100)
  steps = transcoder.inference_timesteps(256, 100)
  x_t = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
  x0 = np.array([0.1, 0.7, 0.2, 0.99], np.float32)
  for j in (0, 1, 50, 98):
    t, t_next = steps[j], steps[j + 1]
    got = transcoder.bernoulli_posterior(x_t, x0, coeffs["k_next"][j], coeffs["b_next"][j], coeffs["keep"][j])
    np.testing.assert_allclose(got, transcoder.reverse_probs(x_t, x0, t, t_next, buffers), rtol=1e-5)
    like = np.stack([x_t, 1 - x_t], -1)
    for back in range(t - t_next):
      like = like * buffers["beta"][t - back] + 0.5 * (1 - buffers["beta"][t - back])
    probs = (np.stack([x0, 1 - x0], -1) * buffers["k_final"][t_next] + buffers["b_final"][t_next]) * like
    np.testing.assert_allclose(got, probs[..., 0] / probs.sum(-1), rtol=1e-5)


# (a) CFG with both schedules and Gumbel noise, transcoding in padded sizes (4 here, to compile faster);
# (b) cfg <= 1 (no null half), the entropy ordering and thresholded bits, every token transcoded;
# (c) the random ordering (a uniform order, whatever the model predicts).
CONFIGS = {
    "cfg": config_sections.SamplerConfig(num_iter=4, cfg_scale=2.5, cfg_schedule="linear", gumbel_temp=0.5,
                                 gumbel_schedule="down", transcode_sizes=4),
    "no_cfg": config_sections.SamplerConfig(num_iter=4, cfg_scale=1.0, gumbel_temp=0.3, gumbel_schedule="up",
                                    ordering="entropy", token_sampling="threshold", transcode_sizes=1),
    "random": config_sections.SamplerConfig(num_iter=4, cfg_scale=1.0, gumbel_temp=0.3, ordering="random",
                                    transcode_sizes=4),
}
LABELS = {"cfg": np.array([0, 1, 2, 3, 4, 5, 6, 10]), "no_cfg": np.array([7, 10]), "random": np.array([2, 9])}


@pytest.fixture(scope="module")
def runs(tiny):
  cfg, params = tiny
  return {name: sampler.generate(cfg, params, LABELS[name], jax.random.key(7), config)
          for name, config in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(tiny, runs, name):
  cfg, params = tiny
  labels = LABELS[name]
  shape = (len(labels), cfg.seq_len)
  want = reference_complete(cfg, params, labels, jax.random.key(7), np.zeros(shape + (cfg.binary_size,)),
                            np.ones(shape, bool), CONFIGS[name])
  np.testing.assert_array_equal(np.asarray(runs[name].bits), want)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_token_decoded_once(tiny, runs, name):
  cfg, _ = tiny
  decoded_at = np.asarray(runs[name].decoded_at)
  counts = schedules.cosine_unmask_counts(cfg.seq_len, CONFIGS[name].num_iter)
  for row in decoded_at:
    np.testing.assert_array_equal(np.bincount(row, minlength=len(counts)), counts)
  bits = np.asarray(runs[name].bits)
  assert set(np.unique(bits)) <= {0.0, 1.0}


def test_seeds_and_no_recompilation(tiny, runs):
  cfg, params = tiny
  config, labels = CONFIGS["cfg"], LABELS["cfg"]
  cached = sampler._sample._cache_size()  # pylint: disable=protected-access
  again = sampler.generate(cfg, params, labels, jax.random.key(7), config)
  np.testing.assert_array_equal(again.bits, runs["cfg"].bits)
  other_seed = sampler.generate(cfg, params, labels, jax.random.key(8), config)
  assert np.mean(np.asarray(other_seed.bits) != np.asarray(again.bits)) > 0.2
  # New labels, seed, CFG scale and Gumbel temperature: the same compiled program.
  sampler.generate(cfg, params, labels[::-1].copy(), jax.random.key(9), config.replace(cfg_scale=4.0, gumbel_temp=1.0))
  assert sampler._sample._cache_size() == cached  # pylint: disable=protected-access


def test_program_size_does_not_grow_with_iterations(tiny):
  cfg, params = tiny
  labels = jnp.zeros((2,), jnp.int32)
  sizes = []
  for num_iter in (4, 8):
    config = config_sections.SamplerConfig(num_iter=num_iter, transcode_sizes=2)
    tables = {k: jnp.asarray(v) for k, v in schedules.tables(config, cfg.seq_len).items()}
    static = sampler._Static(sampler._static_part(config), cfg, None, ("data",))  # pylint: disable=protected-access
    lowered = sampler._sample.lower(params, labels, None, jax.random.key(0), jnp.zeros((2, 16, 8)),  # pylint: disable=protected-access
                                    jnp.ones((2, 16), bool), tables, static=static)
    sizes.append(len(lowered.as_text()))
  assert abs(sizes[0] - sizes[1]) <= 16, sizes


def test_sharded_equals_single_device(tiny, runs):
  cfg, params = tiny
  devices = np.array(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs 8 devices")
  mesh = Mesh(devices.reshape(4, 2), ("data", "fsdp"))
  out = sampler.generate(cfg, params, LABELS["cfg"], jax.random.key(7), CONFIGS["cfg"], mesh=mesh,
                         batch_axes=("data", "fsdp"))
  assert len(out.bits.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out.bits), np.asarray(runs["cfg"].bits))
  np.testing.assert_array_equal(np.asarray(out.decoded_at), np.asarray(runs["cfg"].decoded_at))
  with pytest.raises(ValueError, match="not divisible"):
    sampler.generate(cfg, params, np.array([0, 1]), jax.random.key(7), CONFIGS["cfg"], mesh=mesh,
                     batch_axes=("data", "fsdp"))


def test_bad_inputs(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match="out of range"):
    sampler.generate(cfg, params, np.array([0, 11]), jax.random.key(0))
  with pytest.raises(ValueError, match="out of range"):
    sampler.generate(cfg, params, np.array([-1]), jax.random.key(0))
  with pytest.raises(ValueError, match="label_weights"):
    sampler.generate(cfg, params, np.array([[0, 1]]), jax.random.key(0))
  with pytest.raises(ValueError, match="unknown ordering"):
    config_sections.SamplerConfig(ordering="raster")
  with pytest.raises(ValueError, match="unknown mask_schedule"):
    config_sections.SamplerConfig(mask_schedule="cos")


def test_top_k_mask_takes_exactly_k_with_ties():
  scores = jnp.array([[1.0, 1.0, 1.0, 1.0, -jnp.inf], [0.5, 2.0, 2.0, -jnp.inf, -jnp.inf]])
  chosen = sampler.top_k_mask(scores, jnp.array([2, 4]))
  np.testing.assert_array_equal(chosen, [[True, True, False, False, False], [True, True, True, True, False]])
