"""Schedules of the sampler: tokens decoded per iteration, CFG scale and Gumbel temperature per iteration.

Plain numpy on the host, computed in float64 with the original's order of operations: the counts go
through `floor`, so a different rounding order changes them (e.g. pi/2 * (i+1) / I instead of
pi/2 * ((i+1) / I) gives cos < 0 at the last of 13 iterations, and a count of -1).
"""

import math

import numpy as np

from bigr_jax.config_sections import CFG_SCHEDULES, GUMBEL_SCHEDULES, MASK_SCHEDULES



def _ratios(num_iter: int):
  return [1.0 * (step + 1) / num_iter for step in range(num_iter)]


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def still_masked(num_tokens: int, num_iter: int, schedule: str = "cosine") -> np.ndarray:
  """Tokens still masked after each iteration: floor(N cos(pi/2 r)) ("cosine") or floor(N (1 - r))."""
  _check("mask schedule", schedule, MASK_SCHEDULES)
  rates = [np.cos(math.pi / 2.0 * r) if schedule == "cosine" else 1.0 - r for r in _ratios(num_iter)]
  return np.asarray([math.floor(rate * num_tokens) for rate in rates], np.int64)


def unmask_counts(num_tokens: int, num_iter: int, schedule: str = "cosine") -> np.ndarray:
  """Tokens decoded at each iteration (they sum to `num_tokens`)."""
  left = still_masked(num_tokens, num_iter, schedule)
  return -np.diff(np.concatenate([[num_tokens], left]))


def cosine_unmask_counts(num_tokens: int, num_iter: int) -> np.ndarray:
  """Tokens decoded at each iteration of `generate_with_cfg`: N floor(cos(pi/2 (i+1)/I)) left after it."""
  return unmask_counts(num_tokens, num_iter, "cosine")


def unmask_table(max_tokens: int, num_iter: int, schedule: str = "cosine") -> np.ndarray:
  """(max_tokens + 1, num_iter) int32: row m holds the per-iteration counts for a budget of m tokens.

  The sampler indexes it with each row's budget, so masks of any size share one compiled program.
  """
  return np.stack([unmask_counts(m, num_iter, schedule) for m in range(max_tokens + 1)]).astype(np.int32)


def cfg_scales(cfg_scale: float, num_iter: int, schedule: str = "constant") -> np.ndarray:
  """CFG scale per iteration: constant, or 1 + (cfg - 1) r ("linear")."""
  _check("cfg schedule", schedule, CFG_SCHEDULES)
  if schedule == "constant":
    return np.full((num_iter,), cfg_scale, np.float32)
  return np.asarray([1.0 + (cfg_scale - 1.0) * r for r in _ratios(num_iter)], np.float32)


def gumbel_temperatures(gumbel_temp: float, num_iter: int, schedule: str = "constant") -> np.ndarray:
  """Gumbel noise scale per iteration: constant, tau (1 - r) ("down") or tau r ("up")."""
  _check("gumbel schedule", schedule, GUMBEL_SCHEDULES)
  if schedule == "constant":
    return np.full((num_iter,), gumbel_temp, np.float32)
  scale = [1.0 - r for r in _ratios(num_iter)] if schedule == "down" else _ratios(num_iter)
  return np.asarray([gumbel_temp * s for s in scale], np.float32)


def tables(config, max_tokens: int) -> dict:
  """A `SamplerConfig`'s host arrays, indexed in the sampler's loops: counts per budget and iteration, CFG scale,
  Gumbel temperature."""
  return {
      "unmask": unmask_table(max_tokens, config.num_iter, config.mask_schedule),
      "cfg": cfg_scales(config.cfg_scale, config.num_iter, config.cfg_schedule),
      "gumbel": gumbel_temperatures(config.gumbel_temp, config.num_iter, config.gumbel_schedule),
      "final_cfg": np.float32(config.cfg_scale),
  }
