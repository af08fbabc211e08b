"""One job per workdir: a second job is refused at once naming the holder; a dead holder's lock (killed on this
host, or gone quiet on another) does not block the next run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bigr_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_job_on_a_held_workdir_is_refused_at_once_from_the_command_line(tmp_path):
  """The fault: two training runs on one workdir (the second died at its first save, and metrics.jsonl held
  steps twice). Now the second is one line naming the holder, before it builds anything."""
  workdir = tmp_path / "run"
  with workdir_lock.hold(workdir):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "bigr_jax.main", "--config=configs/bigr_l.py:runlocal",
                             f"--workdir={workdir}", "--config.total_steps=2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == (
        f"error: {workdir} is in use by another job: pid {os.getpid()} on host {socket.gethostname()}, since "
        f"{json.loads((workdir / workdir_lock.LOCK).read_text())['since']} ({workdir / workdir_lock.LOCK} is "
        f"refreshed every 20 s while it runs); stop it or wait for it, or use another workdir")
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK]  # nothing written
  assert not workdir.exists()  # the holder wrote nothing, and leaves nothing
  assert time.monotonic() - start < 120


def test_a_killed_holder_does_not_block_the_next_job(tmp_path):
  workdir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom bigr_jax import workdir_lock\n"
                             f"with workdir_lock.hold({str(workdir)!r}):\n  print('held', flush=True)\n"
                             "  time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lock.WorkdirInUse, match=f"pid {holder.pid} on host"):
    with workdir_lock.hold(workdir):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert (workdir / workdir_lock.LOCK).exists()  # left behind by the killed job
  with workdir_lock.hold(workdir):  # detected as stale: its process is gone
    assert json.loads((workdir / workdir_lock.LOCK).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_stale_once_it_stops_being_refreshed(tmp_path):
  lock = tmp_path / workdir_lock.LOCK
  lock.write_text(json.dumps({"host": "another-host", "pid": 1, "start_ticks": "1", "since": "then"}))
  with pytest.raises(workdir_lock.WorkdirInUse, match="pid 1 on host another-host, since then"):
    with workdir_lock.hold(tmp_path):
      pass
  quiet = time.time() - workdir_lock.STALE_S - 1
  os.utime(lock, (quiet, quiet))
  with workdir_lock.hold(tmp_path):
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
  assert not lock.exists()  # released
