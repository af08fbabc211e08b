"""Weight conversion: layouts equal the original's state_dict listings; CLI round trips; clear errors."""

import dataclasses
import pathlib
import textwrap

import numpy as np
import pytest

from bigr_jax.convert import __main__ as convert_cli
from bigr_jax.convert import generator_weights, io
from bigr_jax.models import bigr
from bigr_jax.models.config import MODEL_SIZES, GeneratorConfig, from_model_args

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
    assert bigr.count_params(bigr.param_shapes(GeneratorConfig(binary_size=bits, **MODEL_SIZES[size]))) == want


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


def test_weight_decay_mask_matches_original_rule(fixture_model):
  model_args, state_dict = fixture_model
  for scan in (True, False):
    config = from_model_args(model_args, scan_layers=scan)
    mask = generator_weights.weight_decay_mask(config)
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
