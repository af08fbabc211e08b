"""B-AE tokenizer, PatchGAN and LPIPS: parity with the original, weight conversion, files, sizes.

Parity fixture sets: `*bae_io*.npz` beside a `*bae_state_dict*.npz` twin, in the directory given by
BIGR_PARITY_FIXTURES (default tests/fixtures/bigr_original); any config of the recorded form works.
"""

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigr_jax.weights import io, tokenizer_weights as tw
from bigr_jax.models import tokenizer
from bigr_jax.models.discriminator import Discriminator
from bigr_jax.models.lpips import LPIPS, VGG16_CONVS
from bigr_jax import trees

TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
# Key/shape dumps of the original modules (copied from the reference into the fixtures).
STATE_DICT_DUMPS = ROOT / "tests" / "fixtures" / "state_dicts"

# A tiny model with per-level attention (levels at 16 and 8 px), and one where only the mid blocks attend.
TINY = tokenizer.TokenizerConfig(codebook_size=8, img_size=16, nf=32, ch_mult=(1, 2), res_blocks=1,
                                 attn_resolutions=(8,), emb_dim=32)
TINY_MID_ONLY = TINY.replace(img_size=32, ch_mult=(1, 1, 2), res_blocks=2, attn_resolutions=(16,),
                             norm_first=False, gen_mul=1.5, codebook_size=5)


def _close(got, want, name):
  """Max abs error, asserted below TOL relative to max(1, |want|) as in test_parity."""
  err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
  scale = max(1.0, float(np.max(np.abs(want))))
  assert err <= TOL * scale, f"{name}: max abs error {err:.3g} (scale {scale:.3g})"
  return err


def _random_state_dict(config, seed=0):
  rng = np.random.default_rng(seed)
  return {key: rng.standard_normal(shape).astype(np.float32) for key, _, _, shape in tw.tokenizer_specs(config)}


def _load_config_file(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


# --- parity with the original -------------------------------------------------------------------------


def _bae_sets(parity_dir):
  sets = []
  for io_path in sorted(parity_dir.glob("*bae_io*.npz")):
    sd_path = io_path.with_name(io_path.name.replace("bae_io", "bae_state_dict"))
    if sd_path.exists():
      sets.append((io_path, sd_path))
  return sets


def _reference_outputs(model, images):
  """The recorded quantities, NHWC: encoder output, bit probabilities, thresholded bits, bits @ E, decoding."""
  def run(module, images):
    features = module.encoder(images)
    bit_probs, code_det = module.encode(images, deterministic=True)
    return {"enc": features, "probs": bit_probs, "code_det": code_det,
            "quant": module.quantize.embed_bits(code_det), "rec": module.decode(code_det)}
  return run


@pytest.fixture(scope="module")
def parity_results(parity_dir):
  sets = _bae_sets(parity_dir)
  if not sets:
    pytest.skip(f"no B-AE fixtures in {parity_dir}")
  results = []
  for io_path, sd_path in sets:
    io = dict(np.load(io_path))
    config = tokenizer.from_hparams(str(io["config"]))
    params = tw.torch_to_flax(dict(np.load(sd_path)), config)
    model = tokenizer.BinaryAutoEncoder(config)
    images = jnp.asarray(io["img"].transpose(0, 2, 3, 1))
    outputs = jax.jit(lambda p, x: model.apply({"params": p}, x, method=_reference_outputs(model, x)))(
        params, images)
    results.append((io_path.name, io, jax.device_get(outputs)))
  return results


def test_parity_with_original(parity_results):
  for name, io, outputs in parity_results:
    errors = {}
    for key in ("enc", "probs", "code_det", "quant", "rec"):
      errors[key] = _close(outputs[key], io[key].transpose(0, 2, 3, 1), f"{name}:{key}")
    print(f"{name} max abs errors: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))


def test_fixture_weights_round_trip(parity_dir):
  sets = _bae_sets(parity_dir)
  if not sets:
    pytest.skip(f"no B-AE fixtures in {parity_dir}")
  for io_path, sd_path in sets:
    config = tokenizer.from_hparams(str(np.load(io_path)["config"]))
    state_dict = dict(np.load(sd_path))
    back = tw.flax_to_torch(tw.torch_to_flax(state_dict, config), config)
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
      np.testing.assert_array_equal(back[key], value, err_msg=key)


# --- the module's API ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_outputs():
  model = tokenizer.BinaryAutoEncoder(TINY)
  params = jax.jit(tokenizer.init_params, static_argnums=0)(TINY, jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))

  def run(module, images):
    probs, sampled = module.encode(images)
    _, sampled_again = module.encode(images)
    det_probs, det_bits = module.encode(images, deterministic=True)
    recon, aux = module(images)
    return dict(probs=probs, sampled=sampled, sampled_again=sampled_again, det_probs=det_probs,
                det_bits=det_bits, decoded=module.decode(det_bits), recon=recon, aux=aux)

  outputs = jax.jit(lambda p, x, key: model.apply({"params": p}, x, method=run, rngs={"sample": key}))(
      params, images, jax.random.key(2))
  return params, jax.device_get(outputs)


def test_encode_decode_shapes_and_bits(tiny_outputs):
  _, out = tiny_outputs
  latent = (2, TINY.latent_size, TINY.latent_size, TINY.codebook_size)
  for key in ("probs", "sampled", "det_bits"):
    assert out[key].shape == latent and out[key].dtype == np.float32
  assert out["decoded"].shape == out["recon"].shape == (2, 16, 16, 3)
  assert set(np.unique(out["sampled"])) <= {0.0, 1.0}
  np.testing.assert_array_equal(out["det_bits"], (out["det_probs"] > 0.5).astype(np.float32))
  np.testing.assert_array_equal(out["probs"], out["det_probs"])
  # Two draws in one call use different keys: Bernoulli sampling, not thresholding.
  assert np.any(out["sampled"] != out["sampled_again"])
  assert np.all((out["probs"] > 0) & (out["probs"] < 1))
  aux = out["aux"]
  assert set(aux) >= {"bits", "bit_probs", "code_loss", "entropy_loss"}
  assert np.isfinite(aux["code_loss"]) and np.isfinite(aux["entropy_loss"])


def test_straight_through_gradient():
  probs = jnp.array([0.1, 0.5, 0.7, 0.99])
  weights = jnp.array([1.0, -2.0, 3.0, 0.5])
  for deterministic in (True, False):
    key = None if deterministic else jax.random.key(0)
    bits = tokenizer.straight_through_bits(probs, key, deterministic)
    assert set(np.asarray(bits).tolist()) <= {0.0, 1.0}  # forward value is exactly the bits
    grad = jax.grad(lambda p: jnp.sum(weights * tokenizer.straight_through_bits(p, key, deterministic)))(probs)
    np.testing.assert_array_equal(grad, weights)


def test_lfq_quantizer_signs_and_entropy_gradient():
  config = TINY.replace(quantizer="lfq")
  quantizer = tokenizer.BinaryQuantizer(config)
  features = jax.random.normal(jax.random.key(0), (2, 4, 4, config.emb_dim))
  variables = jax.jit(quantizer.init, static_argnums=2)(jax.random.key(1), features, False)

  def entropy_loss_and_bits(variables):
    bits, probs, aux = quantizer.apply(variables, features, False)  # no 'sample' rng: lfq never samples
    return aux["entropy_loss"], (bits, probs)

  grads, (bits, probs) = jax.jit(jax.grad(entropy_loss_and_bits, has_aux=True))(variables)
  np.testing.assert_array_equal(bits, (probs > 0.5).astype(np.float32))
  assert float(jnp.abs(nn.meta.unbox(grads)["params"]["proj"]["kernel"]).sum()) > 0
  with pytest.raises(ValueError, match="quantizer"):
    TINY.replace(quantizer="vq")


def test_bad_inputs_raise_clear_errors(tiny_outputs):
  params, _ = tiny_outputs
  model = tokenizer.BinaryAutoEncoder(TINY)
  with pytest.raises(ValueError, match="not divisible"):
    model.apply({"params": params}, jnp.zeros((1, 15, 16, 3)), method=model.encode, deterministic=True)
  with pytest.raises(ValueError, match="bits must be"):
    model.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), method=model.decode)
  with pytest.raises(ValueError, match="GroupNorm"):
    TINY.replace(nf=48)


def test_from_hparams():
  config = tokenizer.from_hparams("{'seed': 0, 'codebook_size': 8, 'img_size': 64, 'nf': 32, "
                                  "'ch_mult': [1, 1, 2, 2, 4], 'res_blocks': 1, 'emb_dim': 64, "
                                  "'attn_resolutions': [16], 'quantizer': None}")
  assert config.ch_mult == (1, 1, 2, 2, 4) and config.attn_resolutions == (16,) and config.latent_size == 4
  with pytest.raises(ValueError, match="unknown B-AE field"):
    tokenizer.from_hparams({"codebook_size": 8, "bogus": 1})


# --- conversion ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, TINY_MID_ONLY], ids=["tiny", "mid_only"])
def test_round_trip_is_exact_and_matches_the_module(config):
  state_dict = _random_state_dict(config)
  params = tw.torch_to_flax(state_dict, config)
  shapes = nn.meta.unbox(tokenizer.param_shapes(config))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  jax.tree.map(lambda s, p: np.testing.assert_equal(s.shape, p.shape), shapes, params)
  back = tw.flax_to_torch(params, config)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  prefixed = tw.flax_to_torch({"params": params}, config, prefix="ae.")
  assert list(prefixed) == ["ae." + k for k in state_dict]


def test_layout_conv_transpose():
  state_dict = _random_state_dict(TINY)
  params = tw.torch_to_flax(state_dict, TINY)
  np.testing.assert_array_equal(params["encoder"]["blocks_0"]["kernel"],
                                state_dict["encoder.blocks.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["quantize"]["embed"], state_dict["quantize.embed.weight"])
  assert params["generator"]["blocks_0"]["scale"].shape == (TINY.emb_dim,)  # norm_first GroupNorm


def test_released_checkpoint_layout_loads():
  state_dict = _random_state_dict(TINY)
  checkpoint = {"ae." + k: v for k, v in state_dict.items()}
  checkpoint["disc.main.0.weight"] = np.zeros((64, 3, 4, 4), np.float32)
  checkpoint["perceptual.lin0.model.1.weight"] = np.zeros((1, 64, 1, 1), np.float32)
  params = tw.torch_to_flax(checkpoint, TINY)
  bare = tw.torch_to_flax(state_dict, TINY)
  jax.tree.map(np.testing.assert_array_equal, params, bare)
  checkpoint["encoder.blocks.0.weight"] = state_dict["encoder.blocks.0.weight"]  # a stray bare key
  with pytest.raises(ValueError, match=r"unexpected \(1\): encoder.blocks.0.weight"):
    tw.torch_to_flax(checkpoint, TINY)


def test_mismatches_are_listed():
  state_dict = _random_state_dict(TINY)
  state_dict["encoder.blocks.1.conv1.weight"] = state_dict["encoder.blocks.1.conv1.weight"][:, :, :2]
  del state_dict["quantize.embed.weight"]
  state_dict["generator.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as error:
    tw.torch_to_flax(state_dict, TINY)
  message = str(error.value)
  assert "missing (1): quantize.embed.weight" in message
  assert "unexpected (1): generator.extra.weight" in message
  assert "encoder.blocks.1.conv1.weight: expected (32, 32, 3, 3), got (32, 32, 2, 3)" in message
  # A checkpoint of another size is refused before anything is converted.
  with pytest.raises(ValueError, match="wrong shape"):
    tw.torch_to_flax(_random_state_dict(TINY), TINY.replace(codebook_size=16))
  params = tw.torch_to_flax(_random_state_dict(TINY), TINY)
  params["quantize"]["embed"] = params["quantize"]["embed"][:4]
  with pytest.raises(ValueError, match="quantize/embed: expected"):
    tw.flax_to_torch(params, TINY)


def test_param_counts_of_released_models():
  expected = {"bae_d24": (65_530_654, 337), "bae_d32": (65_534_758, 337), "bae_d32_512": (61_328_166, 297)}
  for name, (count, num_keys) in expected.items():
    config = tokenizer.TokenizerConfig.from_config(_load_config_file(name)().model)
    assert trees.count_params(tokenizer.param_shapes(config)) == count, name
    specs = tw.tokenizer_specs(config)
    assert len(specs) == num_keys and sum(int(np.prod(s[3])) for s in specs) == count, name
    local = tokenizer.TokenizerConfig.from_config(_load_config_file(name)("runlocal").model)
    assert local.latent_size in (4, 8) and local.codebook_size == config.codebook_size


@pytest.mark.parametrize("name,config_name", [("bae_d24_256", "bae_d24"), ("bae_d32_256", "bae_d32"),
                                              ("bae_d32_512", "bae_d32_512")])
def test_keys_match_dumps_of_the_original(name, config_name):
  dump = STATE_DICT_DUMPS / f"{name}.txt"
  rows = [line.split("\t") for line in dump.read_text().splitlines() if line and not line.startswith("#")]
  config = tokenizer.TokenizerConfig.from_config(_load_config_file(config_name)().model)
  want = [(key, shape) for key, shape, *_ in rows]
  assert [(key, str(shape)) for key, _, _, shape in tw.tokenizer_specs(config)] == want


# --- files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".th", ".pt", ".npz", ".safetensors"])
def test_write_and_read_state_dict(tmp_path, suffix):
  if suffix in (".th", ".pt"):
    pytest.importorskip("torch")
  state_dict = tw.flax_to_torch(tw.torch_to_flax(_random_state_dict(TINY), TINY), TINY, prefix="ae.")
  path = tmp_path / f"weights{suffix}"
  io.write_state_dict(state_dict, path)
  loaded = io.read_state_dict(path)
  if suffix != ".safetensors":  # safetensors orders tensors its own way
    assert list(loaded) == list(state_dict)
  assert set(loaded) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
  tw.torch_to_flax(loaded, TINY)


def test_read_state_dict_refuses_pickled_code_and_selects_entries(tmp_path):
  torch = pytest.importorskip("torch")
  nested = tmp_path / "nested.pt"
  torch.save({"ema": {"w": torch.ones(2)}, "step": 3}, nested)
  assert list(io.read_state_dict(nested, key="ema")) == ["w"]
  assert list(io.read_state_dict(nested)) == ["w"]  # the released layout {"ema": state_dict, ...}
  two = tmp_path / "two.pt"
  torch.save({"model": {"w": torch.ones(2)}, "opt": {"v": torch.ones(2)}}, two)
  with pytest.raises(ValueError, match="not a flat state dict"):
    io.read_state_dict(two)
  code = tmp_path / "code.pt"
  torch.save({"w": torch.ones(2), "obj": pathlib.PurePosixPath("x")}, code)
  with pytest.raises(ValueError, match="refused"):
    io.read_state_dict(code)
  with pytest.raises(ValueError, match="unknown weights format"):
    io.write_state_dict({}, tmp_path / "w.ckpt")


# --- discriminator ------------------------------------------------------------------------------------


def _torch_patchgan(torch, ndf, n_layers):
  """Independent torch reference built from the documented layer list (not the original's code)."""
  layers = [torch.nn.Conv2d(3, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
  mult = 1
  for n in range(1, n_layers + 1):
    prev, mult = mult, min(2 ** n, 8)
    layers += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
               torch.nn.BatchNorm2d(ndf * mult), torch.nn.LeakyReLU(0.2)]
  layers.append(torch.nn.Conv2d(ndf * mult, 1, 4, 1, 1))
  reference = torch.nn.Module()
  reference.main = torch.nn.Sequential(*layers)  # keys `main.i.*`, as in the original
  return reference


def test_discriminator_matches_torch_and_round_trips(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  reference = _torch_patchgan(torch, ndf=16, n_layers=3)
  with torch.no_grad():
    for module in reference.main:
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
        module.weight.normal_()
        module.bias.normal_()
  state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
  dump = STATE_DICT_DUMPS / "bae_discriminator.txt"
  if dump.exists():  # the same key names as the original at its real width
    keys = [line.split("\t")[0] for line in dump.read_text().splitlines() if line and not line.startswith("#")]
    assert [row[0] for row in tw.discriminator_specs(ndf=64)] == keys
  variables = tw.discriminator_torch_to_flax({"disc." + k: v for k, v in state_dict.items()}, ndf=16)
  images = np.random.default_rng(0).uniform(size=(2, 3, 32, 32)).astype(np.float32)
  model = Discriminator(ndf=16)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  got = apply(variables, images.transpose(0, 2, 3, 1))
  reference.eval()
  with torch.no_grad():
    want = reference.main(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape == (2, 2, 2, 1)
  _close(got, want, "discriminator")
  back = tw.discriminator_flax_to_torch(variables, ndf=16)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[key], value, err_msg=key)
  io.write_state_dict(back, tmp_path / "disc.th")
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in io.read_state_dict(tmp_path / "disc.th").items()})
  init_vars = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert jax.tree.structure(nn.meta.unbox(init_vars)) == jax.tree.structure(variables)


# --- LPIPS --------------------------------------------------------------------------------------------


def _torch_lpips(torch, state_dict, images, targets):
  """Independent torch reference of the LPIPS computation, from its documented definition."""
  F = torch.nn.functional
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

  def taps(x):
    x = (x - shift) / scale
    out = []
    for index, _, _ in VGG16_CONVS:
      if index in (5, 10, 17, 24):
        x = F.max_pool2d(x, 2, 2)
      x = F.relu(F.conv2d(x, state_dict[f"features.{index}.weight"], state_dict[f"features.{index}.bias"],
                          padding=1))
      if index in (2, 7, 14, 21, 28):
        out.append(x)
    return out

  total = 0
  for k, (a, b) in enumerate(zip(taps(images), taps(targets))):
    a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    total = total + F.conv2d((a - b) ** 2, state_dict[f"lin{k}.model.1.weight"]).mean([2, 3])
  return total[:, 0]


def test_lpips_matches_torch_reference():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  vgg = {}
  for index, in_channels, out_channels in VGG16_CONVS:
    vgg[f"features.{index}.weight"] = (rng.standard_normal((out_channels, in_channels, 3, 3))
                                       * np.sqrt(2.0 / (9 * in_channels))).astype(np.float32)
    vgg[f"features.{index}.bias"] = (0.01 * rng.standard_normal(out_channels)).astype(np.float32)
  heads = {f"lin{k}.model.1.weight": np.abs(rng.standard_normal((1, c, 1, 1))).astype(np.float32)
           for k, c in enumerate((64, 128, 256, 512, 512))}
  # The released .th layout: VGG inside LPIPS slices, under `perceptual.`, with the scaling buffers.
  slice_of = {i: s for s, (lo, hi) in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), 1)
              for i in range(lo, hi)}
  checkpoint = {f"perceptual.net.slice{slice_of[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
                for k, v in vgg.items()}
  checkpoint.update({"perceptual." + k: v for k, v in heads.items()})
  checkpoint["perceptual.scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
  checkpoint["ae.encoder.blocks.0.weight"] = np.zeros((1,), np.float32)
  params = tw.lpips_torch_to_flax(checkpoint)
  jax.tree.map(np.testing.assert_array_equal, params, tw.lpips_torch_to_flax({**vgg, **heads}))
  assert list(tw.lpips_flax_to_torch(params)) == [row[0] for row in tw.lpips_specs()]

  images = rng.uniform(size=(2, 3, 32, 32)).astype(np.float32)
  targets = np.clip(images + 0.1 * rng.standard_normal(images.shape), 0, 1).astype(np.float32)
  lpips = jax.jit(lambda p, a, b: LPIPS().apply({"params": p}, a, b))
  got = lpips(params, images.transpose(0, 2, 3, 1), targets.transpose(0, 2, 3, 1))
  with torch.no_grad():
    want = _torch_lpips(torch, {k: torch.from_numpy(v) for k, v in {**vgg, **heads}.items()},
                        torch.from_numpy(images), torch.from_numpy(targets)).numpy()
  assert got.shape == (2,)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  same = lpips(params, images.transpose(0, 2, 3, 1), images.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(same, 0.0, atol=1e-12)
  with pytest.raises(ValueError, match="missing"):
    tw.lpips_torch_to_flax(vgg)


def test_runs_sharded_on_a_mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  from bigr_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  model = tokenizer.BinaryAutoEncoder(TINY)
  boxed = tokenizer.param_shapes(TINY)
  shardings = parallel.logical_shardings(boxed, mesh, parallel.DEFAULT_RULES)
  params = jax.jit(tokenizer.init_params, static_argnums=0, out_shardings=shardings)(TINY, jax.random.key(0))
  images = jax.device_put(jnp.ones((4, 16, 16, 3)) * 0.5, parallel.batch_sharding(mesh, 4))
  recon, aux = jax.jit(lambda p, x: model.apply(p, x, deterministic=True))({"params": params}, images)
  assert recon.shape == (4, 16, 16, 3) and aux["bits"].shape == (4, TINY.latent_size, TINY.latent_size, 8)


def test_remat_keeps_gradients_and_saves_fewer_activations():
  """`remat=True` recomputes each residual and attention block in the backward pass: the same gradients, and
  far fewer bytes kept from the forward pass for it (the residuals `jax.vjp` holds). The TPU compiler agrees:
  this model's backward at 64 px, batch 8, needs 142 MiB of temporaries on v5e with remat, 285 without."""
  config = TINY_MID_ONLY.replace(deterministic=True)
  params = nn.meta.unbox(tokenizer.init_params(config, jax.random.key(0)))
  images = jax.random.uniform(jax.random.key(1), (4, config.img_size, config.img_size, 3))
  grads, kept = {}, {}
  for remat in (False, True):
    model = tokenizer.BinaryAutoEncoder(config.replace(remat=remat))
    loss = lambda p: jnp.abs(model.apply({"params": p}, images)[0] - images).mean()  # noqa: E731,B023
    pullback = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)  # noqa: B023 (shapes only, no compute)
    kept[remat] = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(pullback))
    grads[remat] = jax.jit(jax.grad(loss))(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[True], grads[False])
  assert float(max(np.abs(g).max() for g in jax.tree_util.tree_leaves(grads[False]))) > 0
  assert kept[True] < 0.25 * kept[False], kept  # 12 MB against 71 MB measured
