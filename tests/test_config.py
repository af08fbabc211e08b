"""The config surface: every shipped config builds every typed section; every setting arrives (from the command
line, as a user types it) and changes what the code does; unknown keys and wrong family/mode pairs are errors."""

import dataclasses
import os
import subprocess
import sys
from unittest import mock

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigr_jax import chips, config_sections, families, main, parallel, typed_config
from bigr_jax.weights import generator_weights
from bigr_jax.models.config import GeneratorConfig, TokenizerConfig, from_model_args
from bigr_jax.sampling import editing, drawing, sampler, schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("bigr_l", "bigr_xl", "bigr_xxl", "bigr_l_512", "bae_d24", "bae_d32", "bae_d32_512", "demo", "mnist")


def parse(*argv, config="configs/bigr_l.py:runlocal"):
  """The config a user gets from `python -m bigr_jax.main --config=... ARGV` (locked, as main.py builds it)."""
  return typed_config.load_config_file(os.path.join(ROOT, config), argv)


def _sections(config):
  """Every typed section of a generator or tokenizer config, built as the code builds them."""
  out = [config_sections.MeshConfig.from_config(config.mesh), config_sections.DataConfig.from_config(config.data),
         config_sections.OptimConfig.from_config(config.optim)]
  if config.family == "generator":
    out += [GeneratorConfig.from_config(config.model), *drawing.sample_settings(config.sample),
            typed_config.from_section(config_sections.EditConfig, config.edit, "config.edit"),
            config_sections.EvaluationConfig.from_config(config.evaluation)]
  else:
    out += [TokenizerConfig.from_config(config.model), config_sections.OptimConfig.from_config(config.disc_optim)]
  return out


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_declare_a_family_and_build_every_section(name):
  config = parse(config=f"configs/{name}.py")
  assert config.mode in families.family(config.family).modes
  stages = (config.tokenizer, config.generator) if config.family == "demo" else (config,)
  for stage in stages:
    assert len(_sections(stage)) >= 5


def test_the_tpu_variant_is_the_setting_that_compiles_to_fit():
  shipped, v5e = parse(config="configs/bigr_xxl.py"), parse(config="configs/bigr_xxl.py:tpu=v5e")
  assert (shipped.model.remat_policy, shipped.mesh.fsdp) == ("dots", 1)
  assert (v5e.model.remat_policy, v5e.mesh.data, v5e.mesh.fsdp) == ("full", 1, -1)
  assert parallel.make_mesh(v5e.mesh).shape["fsdp"] == jax.device_count()
  for name, attention in (("bigr_l", "splash"), ("bigr_xl", "xla"), ("bigr_xxl", "splash"), ("bigr_l_512", "splash")):
    assert parse(config=f"configs/{name}.py:tpu=v5e").model.attention == attention  # as compiled best
    assert parse(config=f"configs/{name}.py").model.attention == "xla"
  assert parse(config="configs/bigr_l.py:tpu=v5e").model.remat_policy == "full"
  assert parse(config="configs/bigr_l.py").model.remat_policy == "none"
  xl = parse(config="configs/bigr_xl.py:tpu=v5e")
  assert (xl.model.remat_policy, xl.mesh.data, xl.mesh.fsdp) == ("full", 1, -1)
  v6e = parse(config="configs/bigr_l.py:tpu=v6e")
  assert (v6e.model.remat_policy, v6e.mesh.data, v6e.mesh.fsdp) == ("dots", 1, -1)
  for name, chips in (("bigr_xl", ("v5e", "v6e")), ("bigr_xl", ("v4", "v5p")),
                      ("bigr_xxl", ("v5e", "v4", "v5p", "v6e")), ("bigr_l_512", ("v5e", "v4", "v6e"))):
    # these variants share their settings: on each slice the one compiled best
    variants = [parse(config=f"configs/{name}.py:tpu={tpu}") for tpu in chips]
    assert all(v.model == variants[0].model and v.mesh == variants[0].mesh for v in variants)
  xl_v5p = parse(config="configs/bigr_xl.py:tpu=v5p")  # 32 and 95 GiB chips: "dots" fits and bounds the step lower
  assert (xl_v5p.model.remat_policy, xl_v5p.mesh.data, xl_v5p.mesh.fsdp) == ("dots", 1, -1)
  l_512_v5p = parse(config="configs/bigr_l_512.py:tpu=v5p")
  assert (l_512_v5p.model.remat_policy, l_512_v5p.model.attention) == ("dots", "splash")
  v4 = parse(config="configs/bigr_l.py:tpu=v4")
  assert v4.model == v6e.model and v4.mesh == v6e.mesh
  with pytest.raises(ValueError, match="tpu=.v3.: the variants are tpu=v5e, tpu=v4"):
    parse(config="configs/bigr_xxl.py:tpu=v3")
  # the 512 px B-AE recomputes its blocks on the 32 GiB chips; the 256 px ones fit every slice as shipped
  bae_v5e, bae_v4, bae_v6e = (parse(config=f"configs/bae_d32_512.py:chips=16,tpu={tpu}")
                              for tpu in ("v5e", "v4", "v6e"))
  assert bae_v4.model.remat and bae_v4.model == bae_v5e.model == bae_v6e.model and bae_v4.batch_size == 48
  assert not parse(config="configs/bae_d32_512.py").model.remat
  with pytest.raises(ValueError, match="unknown config argument 'tpu'"):
    parse(config="configs/bae_d32.py:tpu=v4")


def test_unknown_keys_are_errors_that_name_them():
  with pytest.raises(ValueError, match='unknown config field .num_itr. Did you mean "num_iter" instead of "num_itr"'):
    parse("--config.sample.num_itr=3")
  config = parse()
  with config.sample.unlocked():  # a typo in a config file
    config.sample.num_itr = 3
  with pytest.raises(ValueError, match=r"unknown config.sample field\(s\) \['num_itr'\]; known: .*'num_iter'"):
    drawing.sample_settings(config.sample)
  for cls, section, where in ((GeneratorConfig, {"dimm": 8}, "generator config.model"),
                              (TokenizerConfig, {"nff": 8}, "tokenizer config.model"),
                              (config_sections.DataConfig, {"nmae": "codes"}, "config.data"),
                              (config_sections.MeshConfig, {"fsdb": 2}, "config.mesh"),
                              (config_sections.OptimConfig, {"grad_clipp": 1.0}, "config.optim"),
                              (config_sections.EvaluationConfig, {"probe": {"epoch": 3}}, "config.evaluation.probe")):
    key = next(iter(section if "probe" not in section else section["probe"]))
    with pytest.raises(ValueError, match=rf"unknown {where} field\(s\) \['{key}'\]; known: \["):
      cls.from_config(section)
  with pytest.raises(ValueError, match="resample_known.*config.edit.sampler.resample_known"):
    drawing.sample_settings({"resample_known": True})
  with pytest.raises(ValueError, match=r"unknown config.edit.sampler field\(s\) \['numiter'\]"):
    config_sections.EditConfig(sampler={"numiter": 3})


@pytest.mark.parametrize("flag,message", [
    ("--config.model.dim=0", "generator dim=0 must be a positive integer"),
    ("--config.model.dim=-16", "generator dim=-16 must be a positive integer"),
    ("--config.model.n_head=0", "generator n_head=0 must be a positive integer"),
    ("--config.model.n_head=3", "dim=64 is not divisible by n_head=3"),
    ("--config.model.n_layer=0", "generator n_layer=0 must be a positive integer"),
    ("--config.model.binary_size=0", "generator binary_size=0 must be a positive integer"),
    ("--config.model.block_size=15", "block_size=15 is not a square number of tokens"),
])
def test_nonsense_shape_fields_are_named_before_any_work(flag, message):
  with pytest.raises(ValueError, match=message):
    families.check_models(parse(flag))


BAD_COMMAND_LINES = {  # flags -> the one line that refuses them
    ("--config.optim.lrr=1",): "error: unknown config field 'lrr' Did you mean \"lr\" instead of \"lrr\"?",
    ("--config=configs/does_not_exist.py",): "error: no config file configs/does_not_exist.py",
    ("--config.optim.lr=abc",): "error: flag --config.optim.lr=abc: could not convert string to float: 'abc'",
    ("--workdir=",): "error: --workdir is empty: name the run's directory (created if missing)",
    ("--mode=sampel",): "error: unknown mode 'sampel'; modes: " + ", ".join(families.mode_names()),
    ("--config.optim.lr=nan",): "error: optimizer lr=nan must be a finite positive number",
    ("--config.checkpoint_every=0",): "error: checkpoint_every=0 must be at least 1",
    ("--config.total_steps=-3",): "error: total_steps=-3 must be a non-negative number",
    ("--config.batch_size=0",): "error: batch_size=0 must be at least 1",
}


@pytest.mark.parametrize("argv", BAD_COMMAND_LINES, ids=lambda argv: argv[0])
def test_a_bad_command_line_is_one_line_before_any_work(argv, tmp_path, capsys, monkeypatch):
  """`main.main` after absl's parse with the parser `python -m bigr_jax.main` uses (main.py's __main__)."""
  monkeypatch.chdir(ROOT)
  command = ["bigr_jax.main", "--config=configs/bigr_l.py:runlocal", f"--workdir={tmp_path / 'run'}", *argv]
  values = flags.FlagValues()
  main.define_flags(values, sys_argv=command)
  with pytest.raises(SystemExit) as exit_info, mock.patch.object(main, "FLAGS", values):
    main.main(typed_config.parse_flags_or_exit(values, command))
  message = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err.strip()
  assert message == BAD_COMMAND_LINES[argv] and not (tmp_path / "run").exists()


def test_a_config_file_with_an_error_names_its_file_and_line(tmp_path):
  (tmp_path / "syntax.py").write_text("def get_config(:\n  pass\n")
  (tmp_path / "raises.py").write_text("def get_config(arg=None):\n  return 1 / 0\n")
  with pytest.raises(ValueError, match=r"^SyntaxError: invalid syntax \(syntax.py, line 1\)$"):
    typed_config.load_config_file(str(tmp_path / "syntax.py"))
  with pytest.raises(ValueError, match=rf"^ZeroDivisionError: division by zero \({tmp_path / 'raises.py'}, line 2\)$"):
    typed_config.load_config_file(str(tmp_path / "raises.py"))
  (tmp_path / "workdir_file").write_text("")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    main.check_workdir(str(tmp_path / "workdir_file"))


def test_a_nonsense_shape_field_is_one_usage_error_from_the_command_line():
  result = subprocess.run([sys.executable, "-m", "bigr_jax.main", "--config=configs/bigr_l.py:runlocal",
                           "--workdir=/nonexistent/workdir", "--config.model.dim=-16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
  assert "generator dim=-16 must be a positive integer" in result.stderr and not os.path.exists("/nonexistent/workdir")


# Each sampler field, a value other than the runlocal default, as typed on the command line.
SAMPLER_VALUES = {"num_iter": "3", "cfg_scale": "30.0", "cfg_schedule": "linear", "gumbel_temp": "30.0",
                  "gumbel_schedule": "down", "mask_schedule": "linear", "ordering": "entropy",
                  "token_sampling": "threshold", "temperature": "0.2", "infer_steps": "2", "transcode_sizes": "1"}


@pytest.fixture(scope="module")
def tiny_model(parity_dir):
  """The fixture generator with noise on every weight: freshly initialised, its zero adaLN layers would make the
  class (and so the CFG settings) change nothing."""
  model_config = from_model_args(str(np.load(parity_dir / "generator_io.npz")["config"]))
  params = generator_weights.torch_to_flax(dict(np.load(parity_dir / "generator_state_dict.npz")), model_config)
  rng = np.random.default_rng(0)
  return model_config, jax.tree_util.tree_map(
      lambda p: p + 0.05 * rng.standard_normal(np.shape(p)).astype(np.float32), params)


def _sample(model_config, params, sampler_config):
  labels = np.arange(4, dtype=np.int32) % model_config.num_classes
  out = sampler.generate(model_config, params, labels, jax.random.key(1), sampler_config)
  return np.asarray(out.bits), np.asarray(out.decoded_at)


def test_every_sampler_field_arrives_from_the_command_line_and_changes_the_sampler(tiny_model):
  model_config, params = tiny_model
  assert set(SAMPLER_VALUES) == set(typed_config.field_names(config_sections.SamplerConfig)) - {"resample_known"}
  for field, value in SAMPLER_VALUES.items():
    # Without Gumbel noise the decoding order follows the model's confidences.
    # A schedule is seen with a large enough value under it.
    base = ["--config.sample.num_iter=4", "--config.sample.infer_steps=3",
            f"--config.sample.gumbel_temp={1.0 if field == 'gumbel_schedule' else 0.0}",
            f"--config.sample.cfg_scale={30.0 if field == 'cfg_schedule' else 2.5}"]
    default, _ = drawing.sample_settings(parse(*base).sample)
    changed, _ = drawing.sample_settings(parse(*base, f"--config.sample.{field}={value}").sample)
    assert getattr(changed, field) == type(getattr(default, field))(value), field
    assert dataclasses.replace(changed, **{field: getattr(default, field)}) == default, field  # only that field
    if field == "transcode_sizes":
      continue  # the same samples, by design: checked on the program below
    bits, order = _sample(model_config, params, default)
    other_bits, other_order = _sample(model_config, params, changed)
    assert not (np.array_equal(other_bits, bits) and np.array_equal(other_order, order)), field


def _lowered_text(model_config, params, sampler_config) -> str:
  labels = jnp.zeros((2,), jnp.int32)
  bits = jnp.zeros((2, model_config.seq_len, model_config.binary_size))
  masked = jnp.ones((2, model_config.seq_len), bool)
  tables = {k: jnp.asarray(v) for k, v in schedules.tables(sampler_config, model_config.seq_len).items()}
  static = sampler._Static(sampler._static_part(sampler_config), model_config, None, ("data",))  # pylint: disable=protected-access
  return sampler._sample.lower(params, labels, None, jax.random.key(0), bits, masked, tables,  # pylint: disable=protected-access
                               static).as_text()


def test_infer_steps_and_transcode_sizes_shape_the_lowered_program(tiny_model):
  model_config, params = tiny_model
  texts = {}
  for name, argv in (("default", []), ("steps", ["--config.sample.infer_steps=7"]),
                     ("all_tokens", ["--config.sample.transcode_sizes=1"])):
    config, _ = drawing.sample_settings(parse(*argv).sample)
    texts[name] = _lowered_text(model_config, params, config)
  # The reverse-diffusion coefficients are one row per step: 100 by default, 7 when set.
  assert "tensor<100xf32>" in texts["default"] and "tensor<100xf32>" not in texts["steps"]
  assert "tensor<7xf32>" in texts["steps"]
  # Masked-first transcoding switches between padded sizes; transcode_sizes=1 transcodes all tokens, no switch.
  assert "stablehlo.case" in texts["default"] and "stablehlo.case" not in texts["all_tokens"]


def test_edit_sampler_settings_default_to_the_original_apps_and_arrive_from_the_command_line():
  edit = typed_config.from_section(config_sections.EditConfig, parse().edit, "config.edit")
  assert editing.task_sampler(edit) == editing.TASK_SAMPLERS["inpaint"] == editing.EDIT_CONFIG
  config = parse("--config.edit.task=interpolate", "--config.edit.sampler.num_iter=3",
                 "--config.edit.sampler.resample_known=True")
  edit = typed_config.from_section(config_sections.EditConfig, config.edit, "config.edit")
  assert editing.task_sampler(edit) == editing.INTERPOLATE_CONFIG.replace(num_iter=3, resample_known=True)


def test_wrong_family_and_mode_pairs_are_refused_before_any_work():
  generator_config, tokenizer_config = parse(), parse(config="configs/bae_d24.py:runlocal")
  with pytest.raises(ValueError, match="--mode=sample needs a config of family generator or demo; this config "
                                       "is a tokenizer config, which runs the modes train, encode"):
    families.entry_point(tokenizer_config, "sample")
  with pytest.raises(ValueError, match="--mode=encode needs a config of family tokenizer"):
    families.entry_point(generator_config, "encode")
  with pytest.raises(ValueError, match="unknown mode 'sampel'"):
    families.entry_point(generator_config, "sampel")
  # From the command line: one line, exit status 1, nothing written.
  result = subprocess.run([sys.executable, "-m", "bigr_jax.main", "--config=configs/bae_d24.py:runlocal",
                           "--workdir=/nonexistent/workdir", "--mode=sample"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1 and result.stderr.count("\n") == 1
  assert result.stderr.startswith("error: --mode=sample needs a config of family generator or demo")
  assert not os.path.exists("/nonexistent/workdir")


def test_overwrite_is_refused_where_it_means_nothing_and_guards_a_finished_evaluation(tmp_path):
  generator_config = parse()
  with pytest.raises(ValueError, match="--overwrite means nothing to --mode=sample on a generator config; it "
                                       r"applies to the modes \(families\) encode \(tokenizer, demo\), evaluate "
                                       r"\(generator\)"):
    families.entry_point(generator_config, "sample", overwrite=True)
  finished = tmp_path / "evaluation.json"
  finished.write_text('{"fid": 3.1}')
  with pytest.raises(FileExistsError, match="evaluation.json exists.*--overwrite"):  # before any sample is drawn
    main.run_entry(families.entry_point(generator_config, "evaluate"), generator_config, str(tmp_path))
  assert finished.read_text() == '{"fid": 3.1}' and not (tmp_path / "samples").exists()


def test_peak_flops_come_from_the_device_kind():
  assert chips.peak_flops_per_device(0.0, device=type("D", (), {"device_kind": "TPU v5 lite"})()) == 197e12
  assert chips.peak_flops_per_device(0.0, device=type("D", (), {"device_kind": "TPU v4"})()) == 275e12
  assert chips.peak_flops_per_device(123.0) == 123.0  # the config wins
  assert chips.peak_flops_per_device(0.0) == 0.0  # a CPU: no MFU
