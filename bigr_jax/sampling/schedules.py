"""Schedules of the sampler: tokens decoded per iteration, CFG scale and Gumbel temperature per iteration."""

import math

import numpy as np


def cosine_unmask_counts(num_tokens: int, num_iter: int) -> np.ndarray:
  """Tokens decoded at each iteration: N floor(cos(pi/2 (i+1)/I)) still masked after iteration i."""
  still_masked = [num_tokens] + [math.floor(np.cos(math.pi / 2.0 * (i + 1) / num_iter) * num_tokens)
                                 for i in range(num_iter)]
  return -np.diff(np.asarray(still_masked, np.int64))
