"""Two JAX processes on this machine (4 CPU devices each) train one model over a (2, 2, 2) mesh, as the hosts
of a pod slice do: per-host data shards, one checkpoint, one metrics writer, and a joint resume; the generator
and the tokenizer alike."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_released_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def on_two_processes(workdir, *argv, config: str = "configs/bigr_l.py:runlocal") -> list:
  """`python -m bigr_jax.main ARGV` as 2 processes of 4 CPU devices each (a (2, 2, 2) mesh); their outputs."""
  port = free_port()
  procs = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id),
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"))
    cmd = [sys.executable, "-m", "bigr_jax.main", f"--config={ROOT}/{config}", f"--workdir={workdir}",
           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *argv]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outputs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    outputs.append(out)
  return outputs


def train_on_two_processes(workdir, total_steps: int, config: str = "configs/bigr_l.py:runlocal", *extra) -> list:
  return on_two_processes(workdir, "--mode=train", f"--config.total_steps={total_steps}", "--config.log_every=2",
                          "--config.checkpoint_every=2", "--config.tensorboard=False", *extra, config=config)


def progress_steps(output: str) -> list:
  return [line.split()[1] for line in output.splitlines() if line.startswith("step ")]


def test_two_processes_train_checkpoint_and_resume_together(tmp_path):
  workdir = tmp_path / "run"
  first = train_on_two_processes(workdir, total_steps=4)
  assert progress_steps(first[0]) == ["2/4", "4/4"] and progress_steps(first[1]) == []  # host 0 reports
  second = train_on_two_processes(workdir, total_steps=6)
  assert "resumed from step 4" in second[0]
  assert progress_steps(second[0]) == ["6/6"]

  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [2, 4, 6]  # one writer, and nothing lost or repeated on resume
  assert all(0 < m["loss"] < 1 for m in logged)
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == 6
  # Each host's data iterator position is saved and restored with the state.
  data_files = sorted(p.name for p in (workdir / "checkpoints" / "6" / "data").iterdir())
  assert any("process_0" in name for name in data_files) and any("process_1" in name for name in data_files)

  # Sampling on the 2 processes equals sampling on 1 process of 8 devices with the same mesh: each process
  # gathers the samples, process 0 writes them.
  write_released_tokenizer(tmp_path / "bae.npz", "configs/bae_d24.py:runlocal", seed=1)
  sample = ("--mode=sample", "--config.sample.num_iter=2", "--config.sample.infer_steps=2",
            "--config.tokenizer.config=configs/bae_d24.py:runlocal",
            f"--config.tokenizer.checkpoint={tmp_path / 'bae.npz'}")
  on_two_processes(workdir, *sample)
  two = dict(np.load(workdir / "samples" / "samples.npz"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  one = subprocess.run([sys.executable, "-m", "bigr_jax.main", "--config=configs/bigr_l.py:runlocal",
                        f"--workdir={workdir}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                        "--config.mesh.tensor=2", *sample], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  one = dict(np.load(workdir / "samples" / "samples.npz"))
  assert one.keys() == two.keys() and len(one["arr_0"]) == 4
  for name in one:
    np.testing.assert_array_equal(one[name], two[name], err_msg=name)


@pytest.mark.slow
def test_two_processes_train_a_tokenizer_together(tmp_path):
  """The B-AE's step (its GAN branch too, from step 2) and its reconstruction grid run on both hosts."""
  workdir = tmp_path / "bae"
  outputs = train_on_two_processes(workdir, 4, "configs/bae_d24.py:runlocal", "--config.loss.disc_start_step=2")
  assert progress_steps(outputs[0]) == ["2/4", "4/4"] and progress_steps(outputs[1]) == []
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [2, 4] and logged[-1]["d_loss"] > 0  # the discriminator trained
  assert sorted(p.name for p in (workdir / "reconstructions").iterdir()) == ["step_0000002.png", "step_0000004.png"]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
