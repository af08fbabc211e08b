"""Test setup: 8 fake CPU devices (for sharded paths), programs compiled for speed of compiling, a persistent
compilation cache, and the quick demo's workdir that the demo's and the app's tests share (built once per test run,
whichever xdist worker asks first)."""

import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

# The tests compile far more than they run: with LLVM at -O0 their programs compile 30-40% faster (measured on 2
# CPU cores: test_train, test_sampler and test_editing 305 -> 196 CPU-s, the parity, tokenizer and evaluation tests
# 220 -> 153). The flag sets LLVM's optimization level of the CPU backend; the parity tests hold at -O0 as at the
# default. A user's command (`user_env`: the quick demo trains 800 steps) keeps the default.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import filelock  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from bigr_jax import typed_config  # noqa: E402
from bigr_jax.weights import generator_weights, io as convert_io, tokenizer_weights  # noqa: E402
from bigr_jax.models import bigr, tokenizer  # noqa: E402
from bigr_jax.models.config import GeneratorConfig, TokenizerConfig  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One persistent compilation cache for the tests and the commands they start (`python -m bigr_jax.main ...`
# inherits the environment), so that a program compiled once is not compiled again by the next run of a config.
# Every program goes in, the small ones too: a command's first checkpoint save compiles about 100 slicing
# programs of under 0.1 s each (orbax's per-replica slices), 9 of the 25 s a warm two-step training command took.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@pytest.fixture(scope="session")
def parity_dir() -> pathlib.Path:
  """Fixtures recorded from the original PyTorch code; BIGR_PARITY_FIXTURES points at another set."""
  return pathlib.Path(os.environ.get("BIGR_PARITY_FIXTURES", ROOT / "tests" / "fixtures" / "bigr_original"))


class QuickDemo(NamedTuple):
  workdir: pathlib.Path
  stdout: str


def cpu_env(devices: int) -> dict:
  """The environment of a command the tests start on `devices` CPU devices, compiled as the tests' own programs."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                                                             f"{FAST_COMPILE}"}


def user_env() -> dict:
  """The environment of a user's command on a CPU machine: one device, not the tests' 8 fake ones (the demo's
  tiny steps run about 1.5 times slower split over 8 devices on 2 cores)."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run_quick_demo(workdir, *argv) -> str:
  """`python -m bigr_jax.main --config=configs/demo.py:quick --workdir=WORKDIR ARGV` as a user types it; its stdout."""
  result = subprocess.run([sys.executable, "-m", "bigr_jax.main", "--config=configs/demo.py:quick",
                           f"--workdir={workdir}", *argv], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=user_env())
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, worker_id) -> QuickDemo:
  """The quick demo, run end to end once per test run: the xdist workers share it through their common temporary
  directory, and the first to ask builds it while the others wait (its users share the xdist_group "quick_demo",
  so under --dist=loadgroup none waits). Its users add outputs but never change its models or edit inputs."""
  root = tmp_path_factory.getbasetemp()
  root = root if worker_id == "master" else root.parent  # the run's own directory, above the workers'
  workdir, stdout = root / "quick_demo", root / "quick_demo.stdout"
  with filelock.FileLock(str(root / "quick_demo.lock")):
    if not stdout.exists():
      stdout.write_text(run_quick_demo(workdir))
  return QuickDemo(workdir, stdout.read_text())


def write_released_generator(path, config: str, seed: int) -> GeneratorConfig:
  """Random weights of `config`'s generator in the released file's layout ({"ema": state_dict}, its aliases
  included); its model config."""
  model = GeneratorConfig.from_config(typed_config.load_config_file(config).model)
  state_dict = generator_weights.flax_to_torch(nn.unbox(bigr.init_params(model, jax.random.key(seed))), model)
  convert_io.write_state_dict(state_dict, path, wrap_key="ema", aliases=generator_weights.aliases(state_dict))
  return model


def write_released_tokenizer(path, config: str, seed: int) -> TokenizerConfig:
  """Random weights of `config`'s B-AE in the released file's layout (`ae.*` entries); its model config."""
  model = TokenizerConfig.from_config(typed_config.load_config_file(config).model)
  state_dict = tokenizer_weights.flax_to_torch(nn.unbox(tokenizer.init_params(model, jax.random.key(seed))), model,
                                               prefix="ae.")
  convert_io.write_state_dict(state_dict, path)
  return model
