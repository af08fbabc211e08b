"""One job per workdir: the job's process 0 holds `job.lock` in the workdir while it runs, and a second job on the
same workdir is refused at once, naming the holder. A holder that died leaves a stale lock, detected rather than
trusted: on the same host its process is gone (or is another process under a reused pid); from another host (a
pod's shared workdir) the lock has not been refreshed for `STALE_S` seconds."""

import contextlib
import json
import os
import pathlib
import socket
import threading
import time
from typing import Iterator, Optional

LOCK = "job.lock"
REFRESH_S = 20.0  # the holder touches its lock this often
STALE_S = 120.0  # a lock from another host not touched for this long is a dead job's


class WorkdirInUse(RuntimeError):
  """Another live job holds the workdir."""


def _start_ticks(pid: int) -> Optional[str]:
  """The process's start time in clock ticks since boot (None: no such process, or no /proc)."""
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def is_stale(lock: pathlib.Path, holder: dict) -> bool:
  """Whether the job that wrote `holder` into `lock` is gone."""
  if holder.get("host") == socket.gethostname() and _start_ticks(os.getpid()) is not None:
    return _start_ticks(holder.get("pid", -1)) != holder.get("start_ticks")  # gone, or a reused pid
  try:
    return time.time() - lock.stat().st_mtime > STALE_S
  except FileNotFoundError:
    return True  # released meanwhile


def _take(lock: pathlib.Path) -> None:
  """Creates the lock for this process, or raises WorkdirInUse; a stale lock is replaced."""
  lock.parent.mkdir(parents=True, exist_ok=True)
  for _ in range(2):
    try:
      with open(lock, "x") as f:
        json.dump(_holder(), f)
      return
    except FileExistsError:
      try:
        holder = json.loads(lock.read_text())
      except (OSError, ValueError):
        holder = {}  # half-written by a job killed while taking it: stale unless refreshed
      if not is_stale(lock, holder):
        raise WorkdirInUse(f"{lock.parent} is in use by another job: pid {holder.get('pid')} on host "
                           f"{holder.get('host')}, since {holder.get('since')} ({lock} is refreshed every "
                           f"{REFRESH_S:.0f} s while it runs); stop it or wait for it, or use another workdir")
      lock.unlink(missing_ok=True)  # a dead job's: take it over
  raise WorkdirInUse(f"{lock.parent}: another job took the lock at the same moment")


@contextlib.contextmanager
def hold(workdir, active: bool = True) -> Iterator[None]:
  """Holds the workdir's lock for the block (refreshing it in a background thread) where `active` (process 0
  of a job); other processes pass through."""
  if not active:
    yield
    return
  lock = pathlib.Path(workdir) / LOCK
  created = not lock.parent.exists()
  _take(lock)
  done = threading.Event()

  def refresh():
    while not done.wait(REFRESH_S):
      with contextlib.suppress(OSError):
        os.utime(lock)

  thread = threading.Thread(target=refresh, name="workdir-lock", daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    lock.unlink(missing_ok=True)
    if created and not any(lock.parent.iterdir()):
      lock.parent.rmdir()  # a job that wrote nothing leaves no workdir behind
