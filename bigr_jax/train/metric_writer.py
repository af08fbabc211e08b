"""Metric writing (JSON lines + TensorBoard event files, no TensorFlow) and a progress line."""

import json
import pathlib
import time
from typing import Mapping, Optional

import jax
import numpy as np

from bigr_jax import files


class WriteFailed(RuntimeError):
  """Metrics could not be written (a full disk, ...): the run stops, as for a failed checkpoint save."""


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard events in the workdir; only process 0 writes.

  Every write happens in the calling thread and is flushed: a full disk or a dead file raises here, at the step
  that wrote, and nothing can block the training loop (a background writer thread could, once it died).
  Opened at a resumed step, it drops the lines a crashed run wrote past that step, so each step is logged once.
  """

  def __init__(self, workdir, tensorboard: bool = True, start_step: int = 0):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    logged = read_metrics(workdir)
    kept = [m for m in logged if m["step"] <= start_step]
    if len(kept) != len(logged):
      with files.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in kept)
    self._jsonl = open(path, "a")
    if tensorboard:
      # Imported only here: tensorboardX imports torch where it is installed, 3 s a command would pay.
      from tensorboardX import event_file_writer  # pylint: disable=import-outside-toplevel
      (workdir / "tensorboard").mkdir(exist_ok=True)
      self._tb = event_file_writer.EventsWriter(str(workdir / "tensorboard" / "events"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                           for k, v in scalars.items()])
      self._tb.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
      self._tb.flush()

  def close(self) -> None:
    for handle in (self._jsonl, self._tb):
      if handle is not None:
        handle.close()


def read_metrics(workdir) -> list:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Progress:
  """Step time, images/s, ETA and MFU over the steps since the last report."""

  def __init__(self, total_steps: int, global_batch: int, flops_per_image: float, peak_flops_per_device: float):
    self.total_steps = total_steps
    self.global_batch = global_batch
    self.flops_per_step = flops_per_image * global_batch
    self.peak = peak_flops_per_device * jax.device_count()
    self._last_time: Optional[float] = None
    self._last_step: Optional[int] = None

  def measure(self, step: int) -> dict:
    now = time.perf_counter()
    out = {}
    if self._last_time is not None and step > self._last_step:
      step_time = (now - self._last_time) / (step - self._last_step)
      out = {"step_time_s": step_time, "images_per_s": self.global_batch / step_time,
             "eta_min": (self.total_steps - step) * step_time / 60.0}
      if self.peak > 0:
        out["mfu"] = self.flops_per_step / step_time / self.peak
    self._last_time, self._last_step = now, step
    return out


def format_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
  parts = [f"step {step}/{total}"]
  for key in ("loss", "bit_accuracy", "images_per_s", "step_time_s", "eta_min", "mfu"):
    if key in scalars:
      value = scalars[key]
      parts.append(f"{key} {value:.4g}" if key != "mfu" else f"mfu {100 * value:.1f}%")
  return " | ".join(parts)


class ScalarAverages:
  """Averages each reported scalar over the steps since the last `pop`.

  Values arrive already fetched to the host; the sums are numpy float64, not jax ops: eager jax ops cost about
  0.1 s per step of host time here (the demo's generator step is faster than that).
  """

  def __init__(self):
    self._sums: dict = {}
    self._count = 0

  def add(self, values: Mapping[str, np.ndarray]) -> None:
    if self._count and values.keys() != self._sums.keys():
      raise ValueError(f"metrics {sorted(values)} differ from this window's {sorted(self._sums)}")
    for key, value in values.items():
      self._sums[key] = self._sums.get(key, 0.0) + float(np.mean(value, dtype=np.float64))
    self._count += 1

  def pop(self) -> dict:
    """The averages since the last pop (empty if nothing was added); starts a new window."""
    sums, count = self._sums, self._count
    self._sums, self._count = {}, 0
    return {k: total / count for k, total in sums.items()}
