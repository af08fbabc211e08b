"""Batches for the generator trainer: bit codes and labels, from a configured source."""

from bigr_jax import data
from bigr_jax.train.loop import Feed


def generator_feed(config) -> Feed:
  """The configured code source through the grain loader (sharded per host, checkpointable)."""
  model = config.model
  if config.data.name == "synthetic":
    source, transforms = data.SyntheticCodes(model.seq_len, model.binary_size, model.num_classes, seed=config.seed), []
  elif config.data.name in data.builder.CODE_SOURCES:
    source, transforms = data.build_source(config.data), data.build_transforms(config.data)
  else:
    raise ValueError(f"the generator trains on bit codes: data.name={config.data.name!r} is an image source. "
                     "Extract codes first (--mode=encode with a tokenizer config), then set data.name='codes'.")
  loader = data.make_loader(source, global_batch_size=config.batch_size, seed=config.seed, shuffle=True,
                            num_epochs=None, transforms=transforms, worker_count=config.data.worker_count)
  iterator = iter(loader)
  return Feed(_as_generator_batches(iterator, model.seq_len, model.binary_size), iterator, len(source))


def _as_generator_batches(iterator, num_tokens: int, bits: int):
  for batch in iterator:
    codes = batch["codes"]
    if codes.shape[1:] != (num_tokens, bits):
      raise ValueError(f"codes of shape {codes.shape[1:]} do not fit the model ({num_tokens} tokens x {bits} bits)")
    yield {"bits": codes, "label": batch["label"]}
