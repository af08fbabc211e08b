"""Small pytree chores shared by models, trainers and converters."""

import flax.linen as nn
import jax
import numpy as np


def count_params(tree) -> int:
  """Number of scalars in a params tree (arrays, ShapeDtypeStructs or logically boxed leaves)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))
