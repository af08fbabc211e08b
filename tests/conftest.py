"""Test setup: 8 fake CPU devices (for sharded paths) and a persistent compilation cache."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture(scope="session")
def parity_dir() -> pathlib.Path:
  """Fixtures recorded from the original PyTorch code; BIGR_PARITY_FIXTURES points at another set."""
  return pathlib.Path(os.environ.get("BIGR_PARITY_FIXTURES", ROOT / "tests" / "fixtures" / "bigr_original"))
