"""Per-host batched grain loaders with saveable iterator state.

Each JAX process reads a disjoint shard of the records (`ShardOptions(process_index, process_count)`,
equal sizes) and yields `global_batch_size // process_count` records a step, so every host takes the
same number of steps; `parallel.py` assembles the global batch. Order, flips and shards depend only on
the seed (and the worker count: grain hands whole batches to workers in turn, so 0 and 2 workers give
different streams), so `iterator.get_state()` saved with a checkpoint and `set_state()` on restart
give the resumed run the same stream. grain refuses a state saved under another sampler (seed,
shards, epochs), worker count or source (`repr`).
"""

from typing import Optional, Sequence

from absl import flags
import grain
import jax
import numpy as np


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
  """global_batch_size // process_count; raises if it does not divide evenly."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size={global_batch_size} must be positive")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by the {process_count} JAX processes; "
        f"use a multiple of {process_count}")
  return global_batch_size // process_count


def make_loader(source, *, global_batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: Optional[int] = None,
                transforms: Sequence[grain.transforms.Transformation] = (),
                worker_count: int = 0, worker_buffer_size: int = 1,
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                read_options: Optional[grain.ReadOptions] = None) -> grain.DataLoader:
  """A grain DataLoader yielding this host's batches (dicts of numpy arrays).

  Args:
    source: a random-access source (`__len__`, `__getitem__`), e.g. from `build_source`.
    global_batch_size: records per step over all hosts; divisible by the process count.
    seed: shuffling and per-record randomness (flips); an int in [0, 2**32).
    shuffle: shuffle globally, anew each epoch.
    num_epochs: passes over the data; None repeats forever.
    transforms: per-record grain transforms applied before batching (e.g. `image_transforms`).
    worker_count: grain worker processes (0: in this process).
    worker_buffer_size: batches each worker prepares ahead.
    process_index: this host's shard; defaults to `jax.process_index()`.
    process_count: number of shards; defaults to `jax.process_count()`.
    read_options: grain read threads / prefetch buffer; by default grain's 16 threads, two batches ahead (grain's
      own 500 records cost about 2 ms of the consumer's time per record: each record scans the buffer).

  Returns:
    The loader; `iter(loader)` gives an iterator with `get_state()` -> bytes and `set_state(bytes)`.
    Batches have leading size `global_batch_size // process_count` (the remainder is dropped).
  """
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  batch_size = per_host_batch_size(global_batch_size, process_count)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed!r}: grain needs an int in [0, 2**32)")
  seed = int(seed)
  num_records = len(source)
  records_per_host = num_records // process_count
  if records_per_host < 1:
    raise ValueError(f"{num_records} records cannot be split over {process_count} hosts")
  if num_epochs is not None and records_per_host * num_epochs < batch_size:
    raise ValueError(
        f"{num_records} records x {num_epochs} epochs over {process_count} hosts give fewer than one "
        f"batch of {batch_size} per host; lower the batch size or raise num_epochs")
  if worker_count and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags, which are unparsed outside absl.app.run.
    flags.FLAGS.mark_as_parsed()
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=num_records, shard_options=shard_options, shuffle=shuffle,
      num_epochs=num_epochs, seed=seed)
  operations = list(transforms) + [grain.transforms.Batch(batch_size=batch_size, drop_remainder=True)]
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations, worker_count=worker_count,
      worker_buffer_size=worker_buffer_size, shard_options=shard_options,
      read_options=read_options or grain.ReadOptions(prefetch_buffer_size=2 * batch_size))
