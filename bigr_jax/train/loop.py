"""The training loop shared by the generator and tokenizer trainers: resume, steps, metrics, checkpoints."""

import itertools
import pathlib
from typing import Any, Callable, NamedTuple, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from bigr_jax import chips, parallel
from bigr_jax.train import checkpoints, metric_writer


class Feed(NamedTuple):
  iterator: Any  # yields dicts of host-local numpy batches; a "skipped" entry counts bad images replaced
  checkpointable: Optional[Any]  # a grain iterator whose state goes into checkpoints, if any
  num_examples: Optional[int]


def total_steps(config, num_examples: Optional[int]) -> int:
  """Training length from `total_steps`, or from `num_epochs` and the dataset size."""
  if config.total_steps:
    return int(config.total_steps)
  if config.num_epochs and num_examples:
    return int(np.ceil(config.num_epochs * num_examples / config.batch_size))
  raise ValueError("set config.total_steps, or config.num_epochs with a dataset of known size")


_barriers = itertools.count()


def _compile_then_meet(train_step, state, batch, key):
  """Compiles the step, then waits until every process has: hosts compile at different speeds, and a
  collective whose peers are still compiling may time out (CPU collectives wait only 30 s)."""
  compiled = train_step.lower(state, batch, key).compile()
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  distributed.global_state.client.wait_at_barrier(f"bigr_jax_compiled_{next(_barriers)}",
                                                  timeout_in_ms=60 * 60 * 1000)
  return compiled


def train(config, workdir, *, mesh, feed: Feed, steps: int, init: Callable[[], Any], abstract_state: Any,
        train_step: Callable, flops_per_image: float = 0.0,
        on_log: Optional[Callable[[int, Any], None]] = None):
  """Resumes from `workdir` (or calls `init`), trains to `steps`, logs and checkpoints. Returns the state.

  `train_step(state, global_batch, key) -> (state, metrics)` must report a scalar "loss". Metrics are
  fetched one step late so the host never waits on the device; a non-finite loss stops the run before a
  checkpoint of that state is written. SIGTERM (preemption) checkpoints and raises `checkpoints.Preempted`.
  """
  if str(workdir).startswith(("gs://", "s3://")):
    raise ValueError(f"workdir {workdir}: use a local path; on a pod, mount the bucket at the same path on every "
                     "host (e.g. gcsfuse) so that all hosts write one checkpoint")
  workdir = pathlib.Path(workdir)
  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints,
                                  with_data=feed.checkpointable is not None)
  checkpoints.save_config(config, workdir, resuming=bool(ckpt.finished_steps()))
  if ckpt.finished_steps():
    state, resumed = ckpt.restore_resumable(abstract_state, feed.checkpointable, config.resume_step)
    if jax.process_index() == 0:
      print(f"resumed from step {resumed} in {ckpt.directory}", flush=True)
  else:
    state = init()
  start = int(jax.device_get(state.step))

  writer = metric_writer.MetricWriter(workdir, tensorboard=config.tensorboard, start_step=start)
  progress = metric_writer.Progress(steps, config.batch_size, flops_per_image,
                                  chips.peak_flops_per_device(config.peak_flops_per_device))
  preempted = checkpoints.PreemptionFlag()
  train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  pending, averages = None, metric_writer.ScalarAverages()
  skipped = None  # bad images replaced since the last log line, on this process (for sources that decode)

  def fetch(step, step_metrics):
    values = jax.device_get(step_metrics)
    if not np.isfinite(values["loss"]):
      raise FloatingPointError(f"loss is {values['loss']} at step {step}; stopping. The last good checkpoint is "
                               f"step {ckpt.last_good_step()} in {ckpt.directory}. Lower the lr or check the data.")
    averages.add(values)

  def log(done, state):
    nonlocal skipped
    scalars = {**averages.pop(), **progress.measure(done)}
    if skipped is not None:  # every process reads the same kind of source, so all of them take part
      scalars["skipped_images"] = int(np.sum(multihost_utils.process_allgather(np.int64(skipped))))
      skipped = 0
    try:
      writer.write(done, scalars)
    except OSError as e:
      raise metric_writer.WriteFailed(f"writing metrics to {workdir} failed at step {done}: {e}; the last good "
                                    f"checkpoint is step {ckpt.last_good_step()}") from e
    if jax.process_index() == 0:
      print(metric_writer.format_line(done, steps, scalars), flush=True)
    if on_log is not None:
      on_log(done, state)

  failed = False
  try:
    with jax.set_mesh(mesh):
      for step in range(start, steps):
        host_batch = next(feed.iterator)
        if "skipped" in host_batch:
          skipped = (skipped or 0) + int(np.sum(host_batch.pop("skipped")))
        batch = parallel.to_global(host_batch, mesh)
        if step == start and jax.process_count() > 1:
          train_step = _compile_then_meet(train_step, state, batch, train_key)
        state, step_metrics = train_step(state, batch, train_key)
        if pending is not None:
          fetch(*pending)
        done = step + 1
        pending = (done, step_metrics)
        ckpt.check()  # a failed background save stops the run here, not at the next save
        stop = preempted.is_set() or ckpt.manager.reached_preemption(done)
        if done % config.log_every == 0 or done == steps or stop:  # on SIGTERM: the steps since the last line
          fetch(*pending)
          pending = None
          log(done, state)
        if done % config.checkpoint_every == 0 or done == steps or stop:
          if pending is not None:  # never checkpoint a state whose loss was not finite
            fetch(*pending)
            pending = None
          ckpt.save(done, state, feed.checkpointable, force=stop)
        if stop:
          ckpt.wait()
          raise checkpoints.Preempted(done, ckpt.directory)
  except BaseException:
    failed = True
    raise
  finally:
    preempted.restore_handler()
    for close in (writer.close, ckpt.close):
      try:
        close()
      except (OSError, checkpoints.SaveFailed):
        if not failed:  # the last save failed as the run ended; after an earlier error, that one is reported
          raise
  return state
