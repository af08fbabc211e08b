"""Counting the scalars of a params tree (the benchmarks report it; the tests check the released sizes with it)."""

import flax.linen as nn
import jax
import numpy as np


def count_params(tree) -> int:
  """Number of scalars in a params tree (arrays, ShapeDtypeStructs or logically boxed leaves)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))
