"""A host without TPU chips, with libtpu installed (the `tpu` extra): JAX starts on the CPU without libtpu's
multi-line error; where the environment names a TPU, one line says that none is here."""

import importlib.util
import os
import subprocess
import sys

import pytest

from bigr_jax import platforms

SHOW_DEVICES = "import jax; print(jax.devices())"


def _python(code: str, **env):
  clean = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", *platforms.TPU_ENVIRONMENT)}
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env={**clean, **env})


def test_commands_start_on_the_cpu_without_libtpus_error():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (the tpu extra): there is no error to silence")
  bare = _python(SHOW_DEVICES)  # JAX alone: libtpu's error
  if "TpuDevice" in bare.stdout:
    pytest.skip("this host has TPU chips")
  assert "TPU_WORKER_HOSTNAMES" in bare.stderr
  ours = _python(f"import bigr_jax; {SHOW_DEVICES}")
  assert ours.returncode == 0 and "CpuDevice" in ours.stdout and ours.stderr == "", ours.stderr
  expected = _python(f"import bigr_jax; {SHOW_DEVICES}", TPU_ACCELERATOR_TYPE="v5litepod-8")
  assert expected.stderr == "warning: TPU_ACCELERATOR_TYPE is set but this host has no TPU chips: running on the CPU\n"
  chosen = _python(f"import bigr_jax; {SHOW_DEVICES}", JAX_PLATFORMS="cpu")  # the user's choice stands
  assert "CpuDevice" in chosen.stdout and chosen.stderr == ""
