"""Weight conversion: layouts equal the original's state_dict listings; CLI round trips; clear errors."""

import dataclasses
import pathlib
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigr_jax import artifacts, trees, typed_config
from bigr_jax import convert as convert_cli
from bigr_jax.weights import generator_weights, io, tokenizer_weights
from bigr_jax.models import bigr, tokenizer as tokenizer_lib
from bigr_jax.models.config import MODEL_SIZES, GeneratorConfig, TokenizerConfig, from_model_args
from bigr_jax.models.discriminator import Discriminator
from bigr_jax.train import checkpoints, generator_trainer, tokenizer_trainer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

LISTINGS = {
    "bigr_L_d24": GeneratorConfig(binary_size=24, **MODEL_SIZES["L"]),
    "bigr_L_d32_512": GeneratorConfig(binary_size=32, **MODEL_SIZES["L-512"]),
    "BiGR_XL_d24_nlayer2": GeneratorConfig(binary_size=24, **{**MODEL_SIZES["XL"], "n_layer": 2}),
    "BiGR_XXL_d24_nlayer2": GeneratorConfig(binary_size=24, **{**MODEL_SIZES["XXL"], "n_layer": 2}),
    "BiGR_XXL_d32_nlayer2": GeneratorConfig(binary_size=32, **{**MODEL_SIZES["XXL"], "n_layer": 2}),
    "bigr_L_d24_no_adaLN": GeneratorConfig(binary_size=24, use_adaLN=False, **{**MODEL_SIZES["L"], "n_layer": 2}),
}


def _read_listing(name):
  rows = []
  for line in (FIXTURES / "state_dicts" / f"{name}.txt").read_text().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    key, shape = line.split("\t")[:2]
    rows.append((key, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())))
  return rows


@pytest.mark.parametrize("name", sorted(LISTINGS))
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_layout_equals_original_listing(name, scan):
  config = dataclasses.replace(LISTINGS[name], scan_layers=scan)
  assert list(generator_weights.state_dict_shapes(config).items()) == _read_listing(name)


def test_parameter_counts_of_released_models():
  counts = {("L", 24): 336_346_136, ("XL", 24): 799_372_824, ("XXL", 24): 1_480_028_184,
            ("XXL", 32): 1_480_065_056, ("L-512", 32): 372_718_624}
  for (size, bits), want in counts.items():
    assert trees.count_params(bigr.param_shapes(GeneratorConfig(binary_size=bits, **MODEL_SIZES[size]))) == want


@pytest.fixture(scope="module")
def fixture_model():
  io_npz = np.load(FIXTURES / "bigr_original" / "generator_io.npz")
  state_dict = dict(np.load(FIXTURES / "bigr_original" / "generator_state_dict.npz"))
  return str(io_npz["config"]), state_dict


def _config_file(tmp_path, model_args, **overrides):
  path = tmp_path / "fixture_config.py"
  path.write_text(textwrap.dedent(f"""
      import dataclasses
      import ml_collections
      from bigr_jax import config_lib
      from bigr_jax.models.config import from_model_args

      def get_config(arg=None):
        c = config_lib.base_generator_config()
        c.model = ml_collections.ConfigDict(dataclasses.asdict(from_model_args({model_args!r}, **{overrides!r})))
        return c
      """))
  return str(path)


def test_cli_round_trip_through_torch_file(tmp_path, fixture_model):
  torch = pytest.importorskip("torch")
  model_args, state_dict = fixture_model
  released = tmp_path / "released.pt"
  io.write_state_dict(state_dict, released, wrap_key="ema", aliases=generator_weights.aliases(state_dict))
  config = _config_file(tmp_path, model_args)
  assert convert_cli.main(["from-torch", f"--config={config}", f"--input={released}",
                           f"--output={tmp_path / 'params'}"]) == 0
  assert convert_cli.main(["to-torch", f"--config={config}", f"--input={tmp_path / 'params'}",
                           f"--output={tmp_path / 'back.pt'}"]) == 0
  loaded = torch.load(tmp_path / "back.pt", weights_only=True)
  assert list(loaded) == ["ema"]
  back = loaded["ema"]
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)
  # The alias entries share storage with their primaries, as in the released files.
  alias = "diffusion_processor._denoise_fn.x_embedder.weight"
  assert back[alias].data_ptr() == back["denoise_mlp.x_embedder.weight"].data_ptr()


def test_cli_safetensors_and_unrolled_layout(tmp_path, fixture_model):
  model_args, state_dict = fixture_model
  source = tmp_path / "weights.safetensors"
  io.write_state_dict(state_dict, source)
  config = _config_file(tmp_path, model_args, scan_layers=False)
  assert convert_cli.main(["from-torch", f"--config={config}", f"--input={source}",
                           f"--output={tmp_path / 'params'}"]) == 0
  assert convert_cli.main(["to-torch", f"--config={config}", f"--input={tmp_path / 'params'}",
                           f"--output={tmp_path / 'back.safetensors'}"]) == 0
  back = io.read_state_dict(tmp_path / "back.safetensors")
  assert set(back) == set(state_dict)  # safetensors orders tensors its own way
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_mismatched_weights_fail_before_writing(tmp_path, fixture_model, capsys):
  model_args, state_dict = fixture_model
  source = tmp_path / "weights.npz"
  io.write_state_dict(state_dict, source)
  config = _config_file(tmp_path, model_args, binary_size=16)
  out = tmp_path / "params"
  assert convert_cli.main(["from-torch", f"--config={config}", f"--input={source}", f"--output={out}"]) == 2
  message = capsys.readouterr().err
  assert "binary_size" in message and "tok_embeddings.weight" in message
  assert not out.exists()
  with pytest.raises(ValueError, match="missing keys"):
    generator_weights.torch_to_flax({k: v for k, v in state_dict.items() if "layers.1." not in k},
                                    from_model_args(model_args))


def test_config_overrides_reach_the_converter(tmp_path, fixture_model, capsys):
  """`--config.*` overrides as in bigr_jax.main: the config's wrong bits are refused, the override that corrects
  them converts, and a misspelled field is one line naming it."""
  model_args, state_dict = fixture_model
  source = tmp_path / "weights.npz"
  io.write_state_dict(state_dict, source)
  config = _config_file(tmp_path, model_args, binary_size=16)
  bits = from_model_args(model_args).binary_size
  command = ["from-torch", f"--config={config}", f"--input={source}"]
  assert convert_cli.main([*command, f"--output={tmp_path / 'refused'}"]) == 2
  assert convert_cli.main([*command, f"--output={tmp_path / 'params'}", f"--config.model.binary_size={bits}"]) == 0
  assert (tmp_path / "params").is_dir() and not (tmp_path / "refused").exists()
  capsys.readouterr()
  assert convert_cli.main([*command, f"--output={tmp_path / 'typo'}", "--config.model.binary_sise=16"]) == 2
  assert capsys.readouterr().err == ("error: unknown config field 'binary_sise' Did you mean \"binary_size\" instead "
                                     "of \"binary_sise\"?\n")


def test_weight_decay_mask_matches_original_rule(fixture_model):
  model_args, state_dict = fixture_model
  for scan in (True, False):
    config = from_model_args(model_args, scan_layers=scan)
    mask = generator_trainer.weight_decay_mask(config)
    # The original: decay tensors with >= 2 dims, except biases and the transcoder (`denoise_mlp`).
    want = {k for k, v in state_dict.items() if v.ndim >= 2 and not k.endswith(".bias")
            and k.startswith(("mask_tok", "diffusion_pos", "cls_", "tok_", "adaLN", "layers.", "norm."))}
    got = set()
    for entry in generator_weights.entries(config):
      node = mask
      for name in entry.flax_path:
        node = node[name]
      if node:
        got.add(entry.torch_key)
    assert got == want
    assert "layers.0.attention_norm.weight" not in got and "mask_tok" in got and "layers.1.ada_gss" in got


def test_unknown_format_and_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    io.read_state_dict(tmp_path / "nope.pt")
  (tmp_path / "w.bin2").write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown weights format"):
    io.read_state_dict(tmp_path / "w.bin2")


# --- the B-AE tokenizer through the CLI ----------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
BAE_LOCAL = str(ROOT / "configs" / "bae_d24.py") + ":runlocal"  # a tiny B-AE (family = "tokenizer")


@pytest.fixture(scope="module")
def bae_local():
  """(config, TokenizerConfig, random B-AE params, random discriminator variables) of bae_d24:runlocal."""
  config = typed_config.load_config_file(BAE_LOCAL)
  model_config = TokenizerConfig.from_config(config.model)
  params = nn.meta.unbox(tokenizer_lib.init_params(model_config, jax.random.key(0)))
  disc = Discriminator(model_config.n_channels, config.disc.ndf, config.disc.n_layers)
  disc_vars = nn.meta.unbox(disc.init(jax.random.key(1), *tokenizer_lib.init_inputs(model_config), train=False))
  rng = np.random.default_rng(0)  # BatchNorm stats and biases start constant: make every entry distinct
  disc_vars = jax.tree.map(lambda v: rng.normal(size=np.shape(v)).astype(np.float32), disc_vars)
  params = jax.tree.map(np.asarray, params)
  return config, model_config, params, disc_vars


def _disc_kwargs(config, model_config):
  return dict(in_channels=model_config.n_channels, ndf=config.disc.ndf, n_layers=config.disc.n_layers)


def _assert_same_state_dict(back, want):
  """`back` (torch tensors) equals `want` (numpy) key for key, in order, bitwise, dtypes included."""
  assert list(back) == list(want)
  for key, value in want.items():
    got = back[key].numpy()
    assert got.dtype == value.dtype and got.shape == value.shape, key
    np.testing.assert_array_equal(got, value, err_msg=key)


def test_tokenizer_cli_round_trip_through_torch_file(tmp_path, bae_local, capsys):
  torch = pytest.importorskip("torch")
  _, model_config, params, _ = bae_local
  state_dict = tokenizer_weights.flax_to_torch(params, model_config, prefix="ae.")
  released = io.write_state_dict(state_dict, tmp_path / "released.pt")
  out = tmp_path / "params"
  assert convert_cli.main(["from-torch", f"--config={BAE_LOCAL}", f"--input={released}", f"--output={out}"]) == 0
  assert f"B-AE: {len(state_dict)} of {len(state_dict)} tensors read" in capsys.readouterr().out
  # The directory holds the plain B-AE params tree, as artifacts.tokenizer_params reads it.
  loaded = artifacts.tokenizer_params(out, model_config)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert convert_cli.main(["to-torch", f"--config={BAE_LOCAL}", f"--input={out}",
                           f"--output={tmp_path / 'back.pt'}"]) == 0
  _assert_same_state_dict(torch.load(tmp_path / "back.pt", weights_only=True), state_dict)


def test_tokenizer_cli_released_layout_with_discriminator(tmp_path, bae_local, capsys):
  """A `binaryae_ema_*.th`-like file (ae.*, disc.*, perceptual.*): ae.* to --output, disc.* to --disc-output
  on request, perceptual.* reported, and both groups back to torch bitwise."""
  torch = pytest.importorskip("torch")
  config, model_config, params, disc_vars = bae_local
  ae = tokenizer_weights.flax_to_torch(params, model_config, prefix="ae.")
  disc = tokenizer_weights.discriminator_flax_to_torch(disc_vars, **_disc_kwargs(config, model_config),
                                                       prefix="disc.")
  perceptual = {"perceptual.lin0.model.1.weight": np.ones((1, 64, 1, 1), np.float32)}
  released = io.write_state_dict({**ae, **disc, **perceptual}, tmp_path / "binaryae_ema_1.th")

  # Without --disc-output only the B-AE is converted, and the line says what was left.
  assert convert_cli.main(["from-torch", f"--config={BAE_LOCAL}", f"--input={released}",
                           f"--output={tmp_path / 'ae_only'}"]) == 0
  line = capsys.readouterr().out
  assert f"disc.*: {len(disc)} tensors not converted" in line and "perceptual.*: 1 LPIPS tensors" in line
  assert convert_cli.main(["to-torch", f"--config={BAE_LOCAL}", f"--input={tmp_path / 'ae_only'}",
                           f"--output={tmp_path / 'ae_only.th'}"]) == 0
  _assert_same_state_dict(torch.load(tmp_path / "ae_only.th", weights_only=True), ae)

  assert convert_cli.main(["from-torch", f"--config={BAE_LOCAL}", f"--input={released}",
                           f"--output={tmp_path / 'ae'}", f"--disc-output={tmp_path / 'disc'}"]) == 0
  assert f"disc.*: {len(disc)} tensors -> {tmp_path / 'disc'}" in capsys.readouterr().out
  assert convert_cli.main(["to-torch", f"--config={BAE_LOCAL}", f"--input={tmp_path / 'ae'}",
                           f"--disc-input={tmp_path / 'disc'}", f"--output={tmp_path / 'back.th'}"]) == 0
  _assert_same_state_dict(torch.load(tmp_path / "back.th", weights_only=True), {**ae, **disc})

  # --disc-output on a file without disc.* fails before anything is written.
  bare = io.write_state_dict(ae, tmp_path / "bare.npz")
  assert convert_cli.main(["from-torch", f"--config={BAE_LOCAL}", f"--input={bare}",
                           f"--output={tmp_path / 'x'}", f"--disc-output={tmp_path / 'y'}"]) == 2
  assert "holds no disc.* entries" in capsys.readouterr().err
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tokenizer_to_torch_from_a_training_workdir(tmp_path, bae_local):
  """A tokenizer workdir: EMA (default) or raw (--raw-params) B-AE params, and its discriminator as disc.*."""
  torch = pytest.importorskip("torch")
  config, model_config, params, disc_vars = bae_local
  raw = jax.tree.map(lambda p: p + np.float32(1), params)
  state = tokenizer_trainer.TokenizerState(
      step=np.int32(2), params=raw, ema_params=params, opt_state={"mu": np.zeros((), np.float32)},
      disc_params=disc_vars["params"], disc_stats=disc_vars["batch_stats"],
      disc_opt_state={"mu": np.zeros((), np.float32)})
  workdir = tmp_path / "bae"  # the layout train_and_evaluate writes: workdir/checkpoints/<step>/state
  ckpt = checkpoints.Checkpointer(workdir, async_save=False, with_data=False)
  ckpt.save(2, state)
  ckpt.close()
  disc = tokenizer_weights.discriminator_flax_to_torch(disc_vars, **_disc_kwargs(config, model_config),
                                                       prefix="disc.")
  for flags, tree in (([], params), (["--raw-params"], raw)):
    out = tmp_path / f"export{len(flags)}.th"
    assert convert_cli.main(["to-torch", f"--config={BAE_LOCAL}", f"--input={workdir}", f"--output={out}",
                             *flags]) == 0
    want = {**tokenizer_weights.flax_to_torch(tree, model_config, prefix="ae."), **disc}
    _assert_same_state_dict(torch.load(out, weights_only=True), want)


def test_to_torch_overwrites_only_when_told(tmp_path, fixture_model, capsys):
  torch = pytest.importorskip("torch")
  model_args, state_dict = fixture_model
  generator_config = _config_file(tmp_path, model_args)
  params = tmp_path / "params"
  source = io.write_state_dict(state_dict, tmp_path / "weights.npz")
  assert convert_cli.main(["from-torch", f"--config={generator_config}", f"--input={source}",
                           f"--output={params}"]) == 0
  existing = tmp_path / "existing.pt"
  for config in (generator_config, BAE_LOCAL):
    existing.write_bytes(b"keep me")
    assert convert_cli.main(["to-torch", f"--config={config}", f"--input={params}", f"--output={existing}"]) == 2
    assert "exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
  assert convert_cli.main(["to-torch", f"--config={generator_config}", f"--input={params}", f"--output={existing}",
                           "--overwrite"]) == 0
  exported = torch.load(existing, weights_only=True)["ema"]
  for key, value in state_dict.items():
    np.testing.assert_array_equal(exported[key].numpy(), value, err_msg=key)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
def test_a_truncated_weights_file_is_one_line_naming_it(tmp_path, fixture_model, capsys, suffix):
  if suffix == ".pt":
    pytest.importorskip("torch")
  model_args, state_dict = fixture_model
  config = _config_file(tmp_path, model_args)
  whole = io.write_state_dict(state_dict, tmp_path / f"weights{suffix}")
  truncated = tmp_path / f"truncated{suffix}"
  truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
  assert convert_cli.main(["from-torch", f"--config={config}", f"--input={truncated}",
                           f"--output={tmp_path / 'params'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"error: {truncated} cannot be read"), err
  assert "truncated or damaged" in err and not (tmp_path / "params").exists()


def test_disc_flags_need_a_tokenizer_config(tmp_path, fixture_model, capsys):
  model_args, state_dict = fixture_model
  source = io.write_state_dict(state_dict, tmp_path / "weights.npz")
  config = _config_file(tmp_path, model_args)
  assert convert_cli.main(["from-torch", f"--config={config}", f"--input={source}",
                           f"--output={tmp_path / 'params'}", f"--disc-output={tmp_path / 'disc'}"]) == 2
  assert "tokenizer configs only" in capsys.readouterr().err
  assert not (tmp_path / "params").exists()
