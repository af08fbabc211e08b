"""One process of a multi-process job runs its work in a child process and watches it.

When a process dies, hangs (no heartbeat for `config.peer_timeout_s`) or loses its coordinator, JAX's distributed
runtime ends every other process with a C++ abort that names neither the lost process nor the checkpoint to
resume from. The watching parent reads the child's log (its stderr, where that abort lands) and ends with one line
that names both. The child's standard output (progress, results) is the console's, as in a single-process run.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
from typing import Callable, Optional

from bigr_jax import console

WORKER_LOG = "BIGR_WORKER_LOG"  # set in the child: the log file its stderr (Python's logging too) goes to
ABORTED = 128 + signal.SIGABRT  # how a shell reports an abort; Popen reports it as -SIGABRT

# What JAX's runtime writes when it gives up on a peer. The coordination service (in process 0) names the
# processes that stopped sending heartbeats; the others learn it from the service, or find the service gone.
_SILENT_PEERS = re.compile(r"stopped sending heartbeats\):\s*([\d,\s]+?)\s*The tasks|Task (\d+) heartbeat timeout")
_COORDINATOR_GONE = re.compile(r"CoordinationService/(Heartbeat|PollForError|GetKeyValue)|"
                               r"coordination_service.*(Socket closed|Connection refused)", re.S)


def is_worker() -> bool:
  return WORKER_LOG in os.environ


def worker_log() -> pathlib.Path:
  return pathlib.Path(os.environ[WORKER_LOG])


def this_process() -> int:
  """This process's index as the launcher set it (JAX's own index is known only once JAX has started)."""
  for name in ("JAX_PROCESS_ID", "SLURM_PROCID", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID"):
    if os.environ.get(name, "").isdigit():
      return int(os.environ[name])
  return 0


def lost_process(log_text: str) -> Optional[str]:
  """Which process JAX's runtime gave up on, from a worker's log; None if it did not."""
  silent = _SILENT_PEERS.findall(log_text)
  if silent:
    ids = sorted({int(i) for found in silent for i in re.findall(r"\d+", " ".join(found))})
    return f"process {', '.join(map(str, ids))} (no heartbeat: dead, hung or cut off)"
  if _COORDINATOR_GONE.search(log_text):
    return "the coordinator, process 0 (it died, hung or is cut off)"
  return None


def supervise(argv, log_path: pathlib.Path, verbose: bool, what_next: Callable[[], str]) -> int:
  """Runs `python -m bigr_jax.main ARGV[1:]` as a child with its stderr in `log_path` (and on the console if
  `verbose`), forwarding SIGTERM and SIGINT; returns its exit status, after one line if a peer was lost (naming
  it, then `what_next()`: where a training run resumes from)."""
  console.start_log(log_path, argv).close()
  start = log_path.stat().st_size  # this command's part of the log: an earlier command's abort is not this one's
  child = subprocess.Popen([sys.executable, "-m", "bigr_jax.main", *argv[1:]], stderr=subprocess.PIPE,
                           env={**os.environ, WORKER_LOG: str(log_path)})
  for sig in (signal.SIGTERM, signal.SIGINT):  # preemption notices and ^C are the child's to handle
    signal.signal(sig, lambda signum, frame: child.send_signal(signum))
  copier = threading.Thread(target=_copy_lines, args=(child.stderr, log_path, verbose))
  copier.start()
  status = child.wait()
  copier.join()
  if status == 0:
    return 0
  with open(log_path, "rb") as log:
    log.seek(max(start, log_path.stat().st_size - 1_000_000))
    lost = lost_process(log.read().decode(errors="replace"))
  if lost is not None:
    print(f"error: process {this_process()} stopped: lost {lost}. {what_next()} (this process's log: {log_path})",
          flush=True)
    return 1
  if status < 0 or status == ABORTED:
    name = signal.Signals(-status).name if status < 0 else "SIGABRT"
    print(f"error: process {this_process()} ended by {name}; its log is {log_path}", flush=True)
    return 1
  return status  # the child said why in its own last line


def _copy_lines(stream, log_path: pathlib.Path, verbose: bool) -> None:
  """The child's stderr into the log; onto the console too if `verbose`, and the project's warnings always."""
  with open(log_path, "ab") as log:
    for line in iter(stream.readline, b""):
      log.write(line)
      log.flush()
      if verbose or line.startswith(console.WARNING):
        sys.stderr.buffer.write(line)
        sys.stderr.flush()
