"""Which JAX platforms this host starts. The `tpu` extra installs libtpu so that any host compiles for TPU
topologies; JAX then starts libtpu on every host, and on one without TPU chips libtpu prints a multi-line error
about TPU_WORKER_HOSTNAMES. So where JAX_PLATFORMS is unset and the host has no accelerator, JAX starts on the
CPU alone, and where the environment names a TPU that is not there, one line says so."""

import os
import sys

import jax
from jax._src import hardware_utils  # the PCI and device-file checks JAX itself makes before choosing

TPU_ENVIRONMENT = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")


def start_on_cpu_without_accelerators() -> None:
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return  # the user chose
  if (hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu()
      or os.path.exists("/dev/kfd")):  # TPU chips, an NVIDIA GPU, an AMD GPU
    return
  named = [name for name in TPU_ENVIRONMENT if os.environ.get(name)]
  if named:
    print(f"warning: {named[0]} is set but this host has no TPU chips: running on the CPU", file=sys.stderr)
  jax.config.update("jax_platforms", "cpu")
