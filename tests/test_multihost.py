"""Two JAX processes on this machine (4 CPU devices each) run one job over a (2, 2, 2) mesh, as the hosts of a pod
slice do: per-host data shards, one checkpoint, one metrics writer, a joint resume, a lost peer reported in one
line (`bigr_jax.supervisor`), and sampling, editing, features, the probe, encoding and the export of what they
wrote equal to one process's; the generator and the tokenizer alike."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bigr_jax import convert as convert_cli, main, supervisor, typed_config
from bigr_jax.evaluation import adm_metrics, features
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.sampling import editing
from bigr_jax.weights import generator_weights, io as convert_io, params_io
from conftest import cpu_env, write_released_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two_processes(workdir, *argv, config: str = "configs/bigr_l.py:runlocal") -> list:
  """Starts `python -m bigr_jax.main ARGV` as 2 processes of 4 CPU devices each (a (2, 2, 2) mesh), each in its
  own process group (a host: the command and the worker it starts)."""
  port = free_port()
  procs = []
  for process_id in range(2):
    env = dict(cpu_env(4), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id))
    cmd = [sys.executable, "-m", "bigr_jax.main", f"--config={ROOT}/{config}", f"--workdir={workdir}",
           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *argv]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True))
  return procs


def on_two_processes(workdir, *argv, config: str = "configs/bigr_l.py:runlocal") -> list:
  """`python -m bigr_jax.main ARGV` as 2 processes of 4 CPU devices each; their outputs."""
  procs = start_two_processes(workdir, *argv, config=config)
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


def _read_until(proc, prefix: str) -> list:
  """Lines of `proc`'s output up to the first that starts with `prefix`."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      return lines
  raise AssertionError(f"{prefix!r} never came:\n{''.join(lines)[-3000:]}")


PEER_TIMEOUT_S = 10


@contextlib.contextmanager
def training_until(workdir, step: int, *extra):
  """Trains on 2 processes (with no end in sight) until process 0 reports `step`; yields the processes and process
  0's lines so far. Whatever still runs after the block is killed."""
  procs = start_two_processes(workdir, "--mode=train", "--config.total_steps=100000", "--config.log_every=2",
                              "--config.tensorboard=False", *extra)
  try:
    yield procs, _read_until(procs[0], f"step {step}/")
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def lose_a_peer(workdir, host_lost: int, how: signal.Signals, kill_after: int) -> tuple:
  """Trains on 2 processes until process 0 reports step `kill_after`, then sends `how` to one host (its command
  and worker). Checks the other host's end; returns its output and the step its last line names."""
  with training_until(workdir, kill_after, "--config.checkpoint_every=2",
                      f"--config.peer_timeout_s={PEER_TIMEOUT_S}") as (procs, before):
    os.killpg(procs[host_lost].pid, how)
    sent = time.monotonic()
    survivor = procs[1 - host_lost]
    out, _ = survivor.communicate(timeout=PEER_TIMEOUT_S + 90)
    waited = time.monotonic() - sent
  out = ("".join(before) if host_lost == 1 else "") + out
  last = out.strip().splitlines()[-1]
  assert survivor.returncode == 1 and waited < PEER_TIMEOUT_S + 60, (waited, out[-3000:])
  lost = "process 1 (no heartbeat" if host_lost == 1 else "the coordinator, process 0"
  assert last.startswith(f"error: process {1 - host_lost} stopped: lost {lost}"), out[-3000:]
  assert "Traceback" not in out and "Check failure" not in out, out[-3000:]  # JAX's abort is in the log only
  step = int(last.split("The last good checkpoint is step ")[1].split()[0])
  log = workdir / "logs" / f"train.process_{1 - host_lost}.log"
  assert step >= kill_after - 2 and str(log) in last
  assert "Terminating process" in log.read_text()
  return out, step


def one_process_of_eight(workdir, *argv, config: str = "configs/bigr_l.py:runlocal") -> str:
  """`python -m bigr_jax.main ARGV` on 1 process of 8 CPU devices, the same (2, 2, 2) mesh; its output."""
  result = subprocess.run([sys.executable, "-m", "bigr_jax.main", f"--config={config}",
                           f"--workdir={workdir}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                           "--config.mesh.tensor=2", *argv], cwd=ROOT, env=cpu_env(8), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_two_processes_train_lose_a_hung_peer_resume_together_sample_edit_probe_and_export(tmp_path):
  """Two processes train until process 1 hangs (SIGSTOP: its heartbeats stop); process 0 ends within the peer
  timeout with one line naming it and the last good checkpoint; both resume from there together; then the two
  sample, edit, extract features and probe them as 1 process of 8 devices does, and the workdir they wrote exports
  to the original's layout."""
  workdir = tmp_path / "run"
  first, step = lose_a_peer(workdir, host_lost=1, how=signal.SIGSTOP, kill_after=6)
  assert progress_steps(first)[:3] == ["2/100000", "4/100000", "6/100000"]  # host 0 reports
  second = train_on_two_processes(workdir, step + 2)
  assert f"resumed from step {step}" in second[0]
  assert progress_steps(second[0]) == [f"{step + 2}/{step + 2}"] and progress_steps(second[1]) == []

  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == list(range(2, step + 3, 2))  # one writer; nothing lost or repeated
  assert all(0 < m["loss"] < 1 for m in logged)
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == step + 2
  # Each host's data iterator position is saved and restored with the state.
  data_files = sorted(p.name for p in (workdir / "checkpoints" / str(step + 2) / "data").iterdir())
  assert any("process_0" in name for name in data_files) and any("process_1" in name for name in data_files)

  # Sampling and editing (a class interpolation) on the 2 processes equal the same on 1 process of 8 devices with
  # the same mesh: each process gathers the images, process 0 writes them.
  write_released_tokenizer(tmp_path / "bae.npz", "configs/bae_d24.py:runlocal", seed=1)
  tokenizer = ("--config.tokenizer.config=configs/bae_d24.py:runlocal",
               f"--config.tokenizer.checkpoint={tmp_path / 'bae.npz'}")
  sample = ("--mode=sample", "--config.sample.num_iter=2", "--config.sample.infer_steps=2", *tokenizer)
  edit = ("--mode=edit", "--config.edit.task=interpolate", "--config.edit.sampler.num_iter=2",
          "--config.edit.sampler.infer_steps=2", *tokenizer)
  for argv, output, count in ((sample, workdir / "samples" / "samples.npz", 4),
                              (edit, workdir / "edit" / "interpolate.npz", len(editing.INTERPOLATION_WEIGHTS))):
    on_two_processes(workdir, *argv)
    two = dict(np.load(output))
    output.unlink()
    one_process_of_eight(workdir, *argv)
    one = dict(np.load(output))
    assert one.keys() == two.keys() and len(one["arr_0"]) == count, output
    for name in one:
      np.testing.assert_array_equal(one[name], two[name], err_msg=f"{output.name}: {name}")

  # Features and the probe: each host extracts its share of every batch, process 0 writes them: the same arrays as
  # on 1 process. Both hosts fit the probe together: the same accuracies and penalty, its loss to float32
  # rounding (the hosts' all-reduce sums in another order than one process does; L-BFGS's iterations carry the
  # difference: up to 4e-6 relative measured).
  probes = {}
  for name, run in (("two", on_two_processes), ("one", one_process_of_eight)):
    run(workdir, "--mode=features", "--config.evaluation.layers=(0, 1)", "--config.evaluation.probe.optimizer=lbfgs",
        f"--config.evaluation.features_dir={tmp_path / name}")
    probes[name] = json.loads((workdir / "linear_probe.json").read_text())
  for split in ("train", "validation"):
    (two, two_labels), (one, one_labels) = (features.load_features(str(tmp_path / name / split))
                                            for name in ("two", "one"))
    assert sorted(one) == [0, 1] and len(one_labels) == 512  # the runlocal stand-in codes
    np.testing.assert_array_equal(one_labels, two_labels)
    for layer in one:
      np.testing.assert_array_equal(one[layer], two[layer], err_msg=f"{split} block {layer}")
  for layer, one in probes["one"]["layers"].items():
    two = probes["two"]["layers"][layer]
    assert [two[k] for k in ("top1", "top5", "train_top1", "l2")] == [one[k] for k in ("top1", "top5", "train_top1",
                                                                                         "l2")], layer
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4), layer
  assert probes["one"]["best_top1"] > 50  # chance 10%

  # The workdir two processes wrote exports to the original's layout: its EMA params, exactly (read here with the
  # whole state; the export reads the EMA params alone).
  assert convert_cli.main(["to-torch", "--config=configs/bigr_l.py:runlocal", f"--input={workdir}",
                           f"--output={tmp_path / 'bigr.pt'}"]) == 0
  model = GeneratorConfig.from_config(typed_config.load_config_file("configs/bigr_l.py:runlocal").model)
  exported = generator_weights.torch_to_flax(convert_io.read_state_dict(str(tmp_path / "bigr.pt")), model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, exported, params_io.train_state(workdir)["ema_params"])


def test_two_processes_encode_the_codes_one_process_encodes(tmp_path):
  """`--mode=encode` on 2 processes: both read every image and encode each batch together, process 0 writes; the
  codes (Bernoulli-sampled, flipped too) equal those of 1 process of 8 devices, bit for bit."""
  write_released_tokenizer(tmp_path / "bae.npz", "configs/bae_d24.py:runlocal", seed=1)
  encode = ("--mode=encode", "--config.data.split=test", f"--config.tokenizer.checkpoint={tmp_path / 'bae.npz'}")
  outputs = on_two_processes(tmp_path / "two", *encode, config="configs/bae_d24.py:runlocal")
  assert "codes: 359 records" in outputs[0] and "codes:" not in outputs[1]
  one_process_of_eight(tmp_path / "one", *encode, config="configs/bae_d24.py:runlocal")
  for name in ("codes.npy", "codes_flipped.npy", "labels.npy", "meta.json"):
    assert (tmp_path / "two" / "codes" / "test" / name).read_bytes() == \
        (tmp_path / "one" / "codes" / "test" / name).read_bytes(), name


@pytest.mark.slow  # Inception compiles at 299 px and FIDs of 2048-d statistics: minutes on 2 cores
def test_two_processes_evaluate_as_one_process_does(tmp_path):
  """`--mode=evaluate`'s FID path (a random-weights Inception) on 2 processes: the same metrics as 1 process of 8
  devices, to float32 rounding (each host's Inception runs on its share of every batch; the activations are
  gathered). The sample batch is given: drawing it is `--mode=sample`'s path, tested above."""
  torch = pytest.importorskip("torch")
  from test_evaluation import TorchFIDInception, _randomize  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  torch.save(_randomize(TorchFIDInception()).state_dict(), tmp_path / "inception.pth")
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "reference.npz", arr_0=rng.integers(0, 256, (8, 80, 80, 3), np.uint8))
  adm_metrics.write_sample_batch(str(tmp_path / "samples.npz"), rng.integers(0, 256, (8, 80, 80, 3), np.uint8),
                                 np.arange(8))
  evaluate = ("--mode=evaluate", "--config.evaluation.batch_size=4",
              f"--config.evaluation.sample_batch={tmp_path / 'samples.npz'}",
              f"--config.evaluation.reference_batch={tmp_path / 'reference.npz'}",
              f"--config.evaluation.inception_weights={tmp_path / 'inception.pth'}")
  on_two_processes(tmp_path / "two", *evaluate)
  one_process_of_eight(tmp_path / "one", *evaluate)
  two, one = (json.loads((tmp_path / name / "evaluation.json").read_text()) for name in ("two", "one"))
  assert two["num_samples"] == one["num_samples"] == 8
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_killed_coordinator_ends_the_other_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
  """The coordinator's host dies (SIGKILL): process 1 ends at once with one line; resumed from the checkpoint it
  names, the run ends where an uninterrupted one does, bit for bit."""
  workdir = tmp_path / "run"
  _, step = lose_a_peer(workdir, host_lost=0, how=signal.SIGKILL, kill_after=4)
  train_on_two_processes(workdir, step + 2)
  train_on_two_processes(tmp_path / "uninterrupted", step + 2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_io.train_state(workdir),
                         params_io.train_state(tmp_path / "uninterrupted"))


@pytest.mark.slow
def test_sigterm_to_both_hosts_saves_one_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
  """A preemption notice (SIGTERM) reaches both hosts' commands: they agree on one step (JAX's preemption sync
  point), save it, and end with 143; resumed, the run ends where an uninterrupted one does, bit for bit."""
  workdir = tmp_path / "run"
  with training_until(workdir, 4, "--config.checkpoint_every=1000") as (procs, _):
    for proc in procs:
      os.killpg(proc.pid, signal.SIGTERM)
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
  assert [proc.returncode for proc in procs] == [143, 143], [out[-2000:] for out in outputs]
  saved = params_io.finished_steps(workdir / "checkpoints")
  assert len(saved) == 1 and saved[0] >= 4, saved
  assert f"preempted: step {saved[0]} is saved" in outputs[0], outputs[0][-2000:]
  train_on_two_processes(workdir, saved[0] + 2)
  train_on_two_processes(tmp_path / "uninterrupted", saved[0] + 2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_io.train_state(workdir),
                         params_io.train_state(tmp_path / "uninterrupted"))


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


@pytest.mark.parametrize("log, lost", [
    # what the coordination service (process 0) logs when a process stops sending heartbeats
    ("E1207 coordination_service.cc:1549] Use error polling to propagate the following error to all tasks: "
     "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.",
     "process 1 (no heartbeat"),
    ("Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 3 heartbeat timeout. This indicates",
     "process 3 (no heartbeat"),
    # what another process logs when the coordinator's host is gone or hung
    ("F1207 client.h:80] Terminating process because the JAX distributed service detected fatal errors.\n"
     "RPC: /xla.coordination.CoordinationService/Heartbeat", "the coordinator, process 0"),
    ("Additional GRPC error information from remote target coordination_service while calling "
     "/xla.coordination.CoordinationService/PollForError:\n{grpc_message:\"Socket closed\"}", "the coordinator, process 0"),
    ("Traceback (most recent call last):\nValueError: bad image x.png", None),
])
def test_the_lost_process_is_read_from_jax_s_log(log, lost):
  found = supervisor.lost_process(log)
  assert found == lost if lost is None else found.startswith(lost), found


def test_only_a_training_run_names_a_checkpoint_to_resume_from_after_a_lost_peer(tmp_path):
  assert main.after_a_lost_peer(str(tmp_path), "train") == (f"{tmp_path / 'checkpoints'} holds no checkpoint; start "
                                                            "every process again to resume from it")
  assert main.after_a_lost_peer(str(tmp_path), "encode") == "Start every process again"  # no checkpoint in play
