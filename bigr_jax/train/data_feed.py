"""Batches for the generator trainer: bit codes and labels, from a configured source."""

import numpy as np

from bigr_jax.train.loop import Feed


class SyntheticCodes:
  """Learnable stand-in codes: each class has a fixed bit pattern; samples flip each bit with p = `noise`.

  A random-access source (grain-compatible), deterministic per (seed, index). For tests and benchmarks only.
  """

  def __init__(self, num_tokens: int, bits: int, num_classes: int, size: int = 4096, noise: float = 0.05,
               seed: int = 0):
    self.num_tokens, self.bits, self.num_classes = num_tokens, bits, num_classes
    self.size, self.noise, self.seed = size, noise, seed
    rng = np.random.default_rng(seed)
    self.patterns = rng.random((num_classes, num_tokens, bits)) < 0.5

  def __len__(self):
    return self.size

  def __repr__(self):  # grain checks the source by repr when restoring an iterator
    return (f"SyntheticCodes(num_tokens={self.num_tokens}, bits={self.bits}, num_classes={self.num_classes}, "
            f"size={self.size}, noise={self.noise}, seed={self.seed})")

  def __getitem__(self, index):
    rng = np.random.default_rng((self.seed, int(index)))
    label = int(index) % self.num_classes
    flips = rng.random((self.num_tokens, self.bits)) < self.noise
    return {"codes": np.logical_xor(self.patterns[label], flips).astype(np.uint8), "label": np.int32(label)}


def generator_feed(config) -> Feed:
  """The configured code source through the grain loader (sharded per host, checkpointable)."""
  from bigr_jax import data
  model = config.model
  if config.data.name == "synthetic":
    source, transforms = SyntheticCodes(model.seq_len, model.binary_size, model.num_classes, seed=config.seed), []
  elif config.data.name in data.builder.CODE_SOURCES:
    source, transforms = data.build_source(config.data), data.build_transforms(config.data)
  else:
    raise ValueError(f"the generator trains on bit codes: data.name={config.data.name!r} is an image source. "
                     "Extract codes first (--mode=encode with a tokenizer config), then set data.name='codes'.")
  loader = data.make_loader(source, global_batch_size=config.batch_size, seed=config.seed, shuffle=True,
                            num_epochs=None, transforms=transforms, worker_count=config.data.get("worker_count", 0))
  iterator = iter(loader)
  return Feed(_as_generator_batches(iterator, model.seq_len, model.binary_size), iterator, len(source))


def _as_generator_batches(iterator, num_tokens: int, bits: int):
  for batch in iterator:
    codes = batch["codes"]
    if codes.shape[1:] != (num_tokens, bits):
      raise ValueError(f"codes of shape {codes.shape[1:]} do not fit the model ({num_tokens} tokens x {bits} bits)")
    yield {"bits": codes, "label": batch["label"]}
