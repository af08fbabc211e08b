"""Accelerator facts, one table: dense bf16 peak FLOP/s and HBM per chip, keyed by `jax.Device.device_kind`.

Sources (public spec pages):
- TPU v4: 275 TFLOP/s bf16, 32 GiB HBM (cloud.google.com/tpu/docs/v4)
- TPU v5e: 197 TFLOP/s bf16, 16 GiB HBM (cloud.google.com/tpu/docs/v5e)
- TPU v5p: 459 TFLOP/s bf16, 95 GiB HBM (cloud.google.com/tpu/docs/v5p)
- TPU v6e (Trillium): 918 TFLOP/s bf16, 32 GiB HBM (cloud.google.com/tpu/docs/v6e)
- NVIDIA A100: 312 TFLOP/s dense bf16 (NVIDIA A100 datasheet); H100 SXM and H200: 989 TFLOP/s dense bf16
  (NVIDIA H100 / H200 datasheets)
"""

from typing import NamedTuple

import jax


class Chip(NamedTuple):
  name: str
  peak_bf16_flops: float
  hbm_bytes: int


GiB = 2 ** 30
# device_kind as JAX reports it -> chip. v5e and v6e report themselves as "lite" parts.
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 32 * GiB),
    "TPU v5 lite": Chip("v5e", 197e12, 16 * GiB),
    "TPU v5e": Chip("v5e", 197e12, 16 * GiB),
    "TPU v5": Chip("v5p", 459e12, 95 * GiB),
    "TPU v5p": Chip("v5p", 459e12, 95 * GiB),
    "TPU v6 lite": Chip("v6e", 918e12, 32 * GiB),
    "TPU v6e": Chip("v6e", 918e12, 32 * GiB),
    "NVIDIA A100-SXM4-40GB": Chip("a100", 312e12, 40 * GiB),
    "NVIDIA A100-SXM4-80GB": Chip("a100", 312e12, 80 * GiB),
    "NVIDIA H100 80GB HBM3": Chip("h100", 989e12, 80 * GiB),
    "NVIDIA H200": Chip("h200", 989e12, 141 * 10 ** 9),
}


def peak_flops_per_device(configured: float = 0.0, device=None) -> float:
  """The configured peak if set (> 0), else the table's for this device kind, else 0 (no MFU: a CPU)."""
  if configured > 0:
    return float(configured)
  chip = CHIPS.get((device or jax.devices()[0]).device_kind)
  return chip.peak_bf16_flops if chip else 0.0
