"""Orbax checkpoints of the train state and the data iterator: atomic, asynchronous, keep-N, resumable."""

import json
import pathlib
import signal
import threading
import time
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from bigr_jax import files
from bigr_jax.weights import params_io

# A replicated array is saved by its replicas together, each writing a slice, only where each slice holds at least
# this much; a smaller one is written by one replica. Orbax splits every replicated array by default: for the
# runlocal generator on 8 CPU devices, 2,500 slicing programs a save, and a 4-step run took 8.7 CPU-s instead of 6.1.
MIN_REPLICA_SLICE_BYTES = 2**20


def _save_small_arrays_whole() -> None:
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
      override=True)


class Checkpointer:
  """Saves {state, data iterator} under workdir/checkpoints and restores onto any mesh."""

  def __init__(self, workdir, keep: int = 3, async_save: bool = True, with_data: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.with_data = with_data
    _save_small_arrays_whole()
    handlers = {"state": ocp.StandardCheckpointHandler()}
    if with_data:
      handlers["data"] = grain.checkpoint.CheckpointHandler()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def finished_steps(self) -> list:
    return params_io.finished_steps(self.directory)

  def last_good_step(self) -> Optional[int]:
    steps = self.finished_steps()
    return steps[-1] if steps else None

  def _failed(self, error: BaseException) -> "SaveFailed":
    # Orbax reports a failed asynchronous save at the next call; its message names the unfinished checkpoint.
    return SaveFailed(f"checkpoint save failed in {self.directory}: {files.first_cause(error)}. The last good "
                      f"checkpoint is step {self.last_good_step()}; free space (or fix the cause) "
                      "and rerun to resume")

  def save(self, step: int, state: Any, data_iterator=None, force: bool = False) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if self.with_data and data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except  (any cause: the run must not go on)
      raise self._failed(e) from e

  def check(self) -> None:
    """Raises SaveFailed if an asynchronous save has failed since the last call. It waits only for orbax's small
    metadata writes, never for the arrays, so it can run every step."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e

  def restore(self, abstract_state: Any, data_iterator, step: int):
    """Restores step `step` into the shardings of `abstract_state` (ShapeDtypeStructs with shardings). A
    checkpoint that does not restore is an UnusableFile naming it, the damaged part and the first real cause."""
    params_io.quiet_failed_reads()
    path = self.directory / str(step)
    missing = [name for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")
               if not (path / name).is_file()]
    if missing:
      raise files.UnusableFile(f"checkpoint {path} cannot be restored: {', '.join(missing)} missing")
    state = self._restore_item(step, "state", ocp.args.StandardRestore(abstract_state), path / "state")
    if self.with_data and data_iterator is not None:
      data_file = path / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
      self._restore_item(step, "data", grain.checkpoint.CheckpointRestore(data_iterator), data_file)
    return state

  def _restore_item(self, step: int, name: str, args, where: pathlib.Path):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds; the cause is named)
      raise files.UnusableFile(f"checkpoint {self.directory / str(step)} cannot be restored: {where}: "
                               f"{files.first_cause(e)}") from e

  def set_aside(self, step: int, why: str) -> pathlib.Path:
    """Renames a checkpoint out of the way (nothing is deleted), so that the run can save that step again."""
    target = self.directory / f"{step}.{why}"
    (self.directory / str(step)).rename(target)
    self.manager.reload()
    return target

  def restore_resumable(self, abstract_state: Any, data_iterator=None, resume_step: int = 0):
    """(state, step) from `resume_step` if > 0, else from the newest checkpoint that restores. Unreadable ones
    are set aside as `<step>.unreadable`, and with `resume_step` the later ones as `<step>.after-resume`."""
    params_io.quiet_failed_reads()  # reading a damaged checkpoint's metadata fails noisily too
    steps = self.finished_steps()
    if resume_step:
      if resume_step not in steps:
        raise ValueError(f"resume_step={resume_step}: no such checkpoint in {self.directory} (finished: {steps})")
      state = self.restore(abstract_state, data_iterator, resume_step)
      for later in [s for s in steps if s > resume_step]:
        _say(f"resume_step={resume_step}: checkpoint {later} set aside as {self.set_aside(later, 'after-resume')}")
      return state, resume_step
    errors = []
    for step in reversed(steps):
      self._check_fits(step, abstract_state)  # another model's checkpoint is a config error, never set aside
      try:
        return self.restore(abstract_state, data_iterator, step), step
      except files.UnusableFile as e:
        errors.append(str(e))
        if step != steps[0]:
          _say(f"{e}; set aside as {self.set_aside(step, 'unreadable')}, trying the step before")
    raise files.UnusableFile(f"no checkpoint in {self.directory} restores: " + " | ".join(errors))

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Raises if the checkpoint's recorded shapes are another model's; unreadable metadata passes (the restore
    then fails and the checkpoint counts as damaged)."""
    try:
      metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
      saved = sorted(tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(metadata))
    except Exception:  # pylint: disable=broad-except
      return
    wanted = sorted(tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract_state))
    if saved != wanted:  # the shapes alone: metadata and state name their paths differently
      raise ValueError(f"checkpoint {self.directory / str(step)} holds another model than the config's (a "
                       f"different model size, bits or scan_layers?): {len(saved)} arrays saved, "
                       f"{len(wanted)} expected, {len(set(saved) ^ set(wanted))} shapes differ")

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e

  def close(self) -> None:
    self.wait()
    self.manager.close()


# Model fields that change the computation but not the parameters: a resume may change them.
COMPUTE_ONLY_FIELDS = ("model.dtype", "model.remat_policy", "model.remat", "model.attention")
RESUMES = "resumes.jsonl"


class ConfigChanged(ValueError):
  """A resume whose config trains another model than the workdir's checkpoints: refused before any step."""


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
  return flat


def save_config(config, workdir, resuming: bool) -> None:
  """The first run's config, `config.json`, beside its checkpoints. A resume keeps it: its changed settings
  (batch, lr, total_steps, ...) are printed and recorded in `resumes.jsonl`, one line per resume, and a changed
  model (shapes, bits) is refused. Process 0 writes."""
  path = pathlib.Path(workdir) / "config.json"
  new = json.loads(config.to_json_best_effort())
  if not (resuming and path.exists()):
    if jax.process_index() == 0:
      files.write_json(path, new)
    return
  old_flat, new_flat = _flat(json.loads(path.read_text())), _flat(new)
  changes = {key: [old_flat.get(key), new_flat.get(key)] for key in sorted(old_flat.keys() | new_flat.keys())
             if old_flat.get(key) != new_flat.get(key)}
  breaking = [key for key in changes
              if key == "family" or (key.startswith("model.") and key not in COMPUTE_ONLY_FIELDS)]
  if breaking:
    differences = ", ".join(f"{key}: {changes[key][0]} there, {changes[key][1]} here" for key in breaking)
    raise ConfigChanged(f"{workdir} holds a run of another model ({differences}): resume it with the model it was "
                        "trained with, or train this one in a new workdir")
  if jax.process_index() == 0:
    if changes:
      print("resuming with changed settings (config.json keeps the first run's): "
            + ", ".join(f"{key} {old} -> {value}" for key, (old, value) in changes.items()), flush=True)
    with open(path.parent / RESUMES, "a") as f:
      f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}) + "\n")


def _say(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


class SaveFailed(RuntimeError):
  """A checkpoint could not be written: the run stops at once (training on could lose every step after it)."""


class Preempted(Exception):
  """Raised after the checkpoint of a preempted run is written: rerun the same command to resume."""

  def __init__(self, step: int, directory):
    super().__init__(f"preempted: step {step} is saved in {directory}; rerun the same command to resume")
    self.step = step


class PreemptionFlag:
  """Set by SIGTERM (how TPU VMs announce preemption); the loop checkpoints and exits when it sees it.

  Single-process runs only: with several processes every host must stop at the same step, which JAX's
  distributed runtime coordinates (`CheckpointManager.reached_preemption`), so no handler is installed.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
