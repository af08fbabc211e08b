"""Accelerator facts in one table, keyed by `jax.Device.device_kind`, and the chips a program is compiled for.

Per chip: dense bf16 peak FLOP/s, HBM capacity, HBM bandwidth, and interconnect bandwidth (TPU: bidirectional
ICI over all ports; GPU: NVLink). Sources, the vendors' public spec pages:
- TPU v4: 275 TFLOP/s, 32 GiB, 1200 GB/s (cloud.google.com/tpu/docs/v4); its page gives no per-chip ICI figure,
  so no interconnect bound is computed for v4.
- TPU v5e: 197 TFLOP/s, 16 GiB, 819 GB/s, ICI 400 GB/s (cloud.google.com/tpu/docs/v5e)
- TPU v5p: 459 TFLOP/s, 95 GiB, 2765 GB/s, ICI 1200 GB/s (cloud.google.com/tpu/docs/v5p)
- TPU v6e (Trillium): 918 TFLOP/s, 32 GB, 1638 GB/s, ICI 800 GB/s (cloud.google.com/tpu/docs/v6e)
- NVIDIA A100 SXM: 312 TFLOP/s, 40 or 80 GB at 1555 or 2039 GB/s, NVLink 600 GB/s (A100 datasheet)
- NVIDIA H100 SXM: 989 TFLOP/s, 80 GB, 3.35 TB/s, NVLink 900 GB/s; H200: 989 TFLOP/s, 141 GB, 4.8 TB/s,
  NVLink 900 GB/s (H100 / H200 datasheets)
"""

import os
from typing import NamedTuple, Optional

import jax
from jax.experimental import topologies

from bigr_jax import files
from bigr_jax.config_sections import CompileConfig


class Chip(NamedTuple):
  name: str
  peak_bf16_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float
  interconnect_bytes_per_s: Optional[float]  # None: not published per chip


GiB = 2 ** 30
GB = 10 ** 9
_V4 = Chip("v4", 275e12, 32 * GiB, 1200 * GB, None)
_V5E = Chip("v5e", 197e12, 16 * GiB, 819 * GB, 400 * GB)
_V5P = Chip("v5p", 459e12, 95 * GiB, 2765 * GB, 1200 * GB)
_V6E = Chip("v6e", 918e12, 32 * GB, 1638 * GB, 800 * GB)
# device_kind as JAX reports it -> chip. v5e and v6e report themselves as "lite" parts.
CHIPS = {
    "TPU v4": _V4,
    "TPU v5 lite": _V5E,
    "TPU v5e": _V5E,
    "TPU v5": _V5P,
    "TPU v5p": _V5P,
    "TPU v6 lite": _V6E,
    "TPU v6e": _V6E,
    "NVIDIA A100-SXM4-40GB": Chip("a100", 312e12, 40 * GB, 1555 * GB, 600 * GB),
    "NVIDIA A100-SXM4-80GB": Chip("a100", 312e12, 80 * GB, 2039 * GB, 600 * GB),
    "NVIDIA H100 80GB HBM3": Chip("h100", 989e12, 80 * GB, 3350 * GB, 900 * GB),
    "NVIDIA H200": Chip("h200", 989e12, 141 * GB, 4800 * GB, 900 * GB),
}


def chip_of(device) -> Optional[Chip]:
  return CHIPS.get(device.device_kind)


def peak_flops_per_device(configured: float = 0.0, device=None) -> float:
  """The configured peak if set (> 0), else the table's for this device kind, else 0 (no MFU: a CPU)."""
  if configured > 0:
    return float(configured)
  chip = chip_of(device or jax.devices()[0])
  return chip.peak_bf16_flops if chip else 0.0


def target_devices(compile_config: CompileConfig) -> list:
  """The devices to compile for: a TPU topology's (no TPU needed, only libtpu) or this host's."""
  if not compile_config.topology:
    return jax.devices()
  try:
    # Compiling drives no TPU: several processes may load libtpu at once (its lockfile guards a real chip), and
    # the TPU VM metadata server, which a CPU host lacks, is not asked.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # v4 and v5p chips hold two TensorCores, which JAX runs as one device per chip ("megacore").
    megacore = {"chip_config_name": "megacore"} if compile_config.topology.split(":")[0] in ("v4", "v5p") else {}
    topology = topologies.get_topology_desc(platform="tpu", topology_name=compile_config.topology,
                                            num_slices=compile_config.num_slices, **megacore)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing, or a name it does not know)
    raise ValueError(f"compile.topology={compile_config.topology!r} (num_slices={compile_config.num_slices}) "
                     f"cannot be made: {files.first_cause(e)}. It needs libtpu (pip install 'bigr_jax[tpu]') and a "
                     "name such as v5e:2x2 or v5p:2x2x1") from e
  return list(topology.devices)
