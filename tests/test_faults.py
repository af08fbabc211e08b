"""Faults around checkpoints, through the command line: a full disk, leftovers of a killed save, and a workdir
read on another device count than the one it was trained on."""

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from bigr_jax.weights import params_io
from bigr_jax.train import metric_writer
from conftest import cpu_env, write_released_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATOR = "--config=configs/bigr_l.py:runlocal"


def _run(module: str, *argv, devices: int = 8, timeout: int = 300):
  """`python -m <module> ARGV` as a user types it, on `devices` CPU devices."""
  return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=cpu_env(devices))


def _main(*argv, **kwargs):
  return _run("bigr_jax.main", *argv, **kwargs)


def _convert(*argv, devices: int):
  result = _run("bigr_jax.convert", *argv, devices=devices)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@contextlib.contextmanager
def _tmpfs(path, size: str):
  """A tmpfs of `size` mounted at `path` for the block's duration."""
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
  """A 4.5 MiB tmpfs."""
  with _tmpfs(tmp_path / "disk", "4608k") as path:
    yield path


@pytest.fixture
def disk(tmp_path):
  """A 64 MiB tmpfs, room for many checkpoints until the test fills it."""
  with _tmpfs(tmp_path / "disk", "64m") as path:
    yield path


def _fill_once_a_checkpoint_is_saved(disk_path, checkpoints, leave: int, stop: threading.Event):
  """Fills the disk to `leave` free bytes as soon as the first checkpoint is finished: what another job writing
  to the same disk does. (Sizing the disk to the first checkpoint instead was flaky: a checkpoint's footprint on
  tmpfs varies by about 130 KiB from save to save.)"""
  while not stop.wait(0.02):
    if params_io.finished_steps(checkpoints):
      free = shutil.disk_usage(disk_path).free
      with open(disk_path / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave, 1))
      return


# Without TensorBoard the same save fails the same way (slow: the tensorboard case covers it).
@pytest.mark.parametrize("tensorboard", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["tensorboard", "jsonl_only"])
def test_a_full_disk_stops_the_run_at_once_and_keeps_the_last_checkpoint(disk, tmp_path, tensorboard):
  workdir = disk / "run"
  # 1 MiB is left: room for the metrics of the few steps until the next save, not for a checkpoint (3.7 MiB).
  stop = threading.Event()
  filler = threading.Thread(target=_fill_once_a_checkpoint_is_saved,
                            args=(disk, workdir / "checkpoints", 2**20, stop), daemon=True)
  filler.start()
  try:
    result = _main(GENERATOR, f"--workdir={workdir}", "--config.total_steps=100000", "--config.log_every=1",
                   "--config.checkpoint_every=2", f"--config.tensorboard={tensorboard}", timeout=240)
  finally:
    stop.set()
    filler.join()
  out = result.stdout + result.stderr
  assert (disk / "filler").exists(), out[-3000:]
  assert result.returncode == 1, out[-3000:]
  last = result.stdout.strip().splitlines()[-1]  # (orbax's own logs of the failure go to stderr)
  assert last.startswith("error: checkpoint save failed") and "No space left on device" in last, last
  saved = params_io.finished_steps(workdir / "checkpoints")
  assert saved and f"The last good checkpoint is step {saved[-1]};" in last, (saved, last)
  assert "step 100000" not in out
  # The last good checkpoint is whole: it equals an uninterrupted run's state at that step, bit for bit.
  reference = tmp_path / "reference"
  assert _main(GENERATOR, f"--workdir={reference}", f"--config.total_steps={saved[-1]}",
               "--config.tensorboard=False").returncode == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_io.train_state(workdir),
                         params_io.train_state(reference))


def _train_with_a_killed_save_beside(config: str, workdir, devices: int) -> None:
  """Two steps on `devices` devices, and what orbax leaves of a save killed half-way: a temporary directory,
  never renamed to its step."""
  result = _main(config, f"--workdir={workdir}", "--config.total_steps=2", "--config.tensorboard=False",
                 devices=devices)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  (workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1764633600").mkdir()


def test_a_workdir_serves_every_device_count_and_ignores_unfinished_saves(tmp_path):
  """The generator trained on 4 devices is exported on 1 and on 8 (bitwise the same) and sampled on 1, with the
  leftover of a save killed half-way beside its checkpoints."""
  generator_dir = tmp_path / "generator"
  _train_with_a_killed_save_beside(GENERATOR, generator_dir, devices=4)
  torch = pytest.importorskip("torch")
  exports = []
  for devices in (1, 8):
    exports.append(tmp_path / f"export_on_{devices}.pt")
    _convert("to-torch", GENERATOR, f"--input={generator_dir}", f"--output={exports[-1]}", devices=devices)
  one, eight = (torch.load(path, weights_only=True)["ema"] for path in exports)
  assert list(one) == list(eight)
  for key in one:
    np.testing.assert_array_equal(one[key].numpy(), eight[key].numpy(), err_msg=key)

  write_released_tokenizer(tmp_path / "bae.npz", "configs/bae_d24.py:runlocal", seed=1)
  sample = (GENERATOR, f"--workdir={generator_dir}", "--mode=sample", "--config.sample.num_iter=2",
            "--config.sample.infer_steps=2", "--config.tokenizer.config=configs/bae_d24.py:runlocal")
  result = _main(*sample, f"--config.tokenizer.checkpoint={tmp_path / 'bae.npz'}", devices=1)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert (generator_dir / "samples" / "samples.png").exists()

  truncated = tmp_path / "truncated.pt"  # a download cut short
  truncated.write_bytes(exports[0].read_bytes()[:5000])
  result = _main(*sample, f"--config.tokenizer.checkpoint={truncated}", devices=1)
  assert result.returncode == 1
  assert result.stdout.strip().splitlines()[-1].startswith(f"error: {truncated} cannot be read as .pt weights")
  assert "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # the generator's case above covers the same checkpoints and the same restore
def test_a_tokenizer_trained_on_8_devices_encodes_on_1_beside_an_unfinished_save(tmp_path):
  tokenizer_dir = tmp_path / "bae"
  _train_with_a_killed_save_beside("--config=configs/bae_d24.py:runlocal", tokenizer_dir, devices=8)
  result = _main("--config=configs/bae_d24.py:runlocal", f"--workdir={tokenizer_dir}", "--mode=encode",
                 "--config.data.split=test", devices=1)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert (tokenizer_dir / "codes" / "test").is_dir()


def test_a_failing_tensorboard_disk_raises_in_the_training_thread(small_disk, tmp_path):
  """TensorBoard events on a full disk: the write raises where the loop calls it, within the call. (With a
  background writer thread, its death left the loop blocked on a full queue, SIGTERM ignored.)"""
  (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 8192))  # the disk is nearly full
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "tensorboard").symlink_to(small_disk)  # metrics.jsonl stays on a good disk
  outcome = {}

  def write_steps():
    try:
      writer = metric_writer.MetricWriter(workdir, tensorboard=True)
      for step in range(1, 20001):
        writer.write(step, {"loss": 0.5, "bit_accuracy": 0.5, "images_per_s": 100.0})
      outcome["error"] = None
    except OSError as e:
      outcome["error"] = e

  thread = threading.Thread(target=write_steps, daemon=True)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive(), "the metrics writer blocked"
  assert isinstance(outcome["error"], OSError) and outcome["error"].errno == errno.ENOSPC, outcome


def test_a_damaged_latest_checkpoint_falls_back_and_resume_step_picks_one(tmp_path):
  workdir, reference = tmp_path / "run", tmp_path / "reference"
  common = ("--config.checkpoint_every=2", "--config.tensorboard=False")
  assert _main(GENERATOR, f"--workdir={workdir}", "--config.total_steps=4", *common).returncode == 0
  checkpoints = workdir / "checkpoints"
  for path in (checkpoints / "4" / "state").rglob("*"):  # truncated array data, as a full disk or a kill leaves
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

  result = _main(GENERATOR, f"--workdir={workdir}", "--config.total_steps=6", *common)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert f"checkpoint {checkpoints / '4'} cannot be restored" in result.stdout
  assert "set aside as" in result.stdout and "resumed from step 2" in result.stdout
  noise = result.stdout + result.stderr  # (it was 2,004 lines with 34 "Event loop is closed" tracebacks)
  assert "Event loop is closed" not in noise and len(noise.splitlines()) < 20, noise[-3000:]
  assert (checkpoints / "4.unreadable").is_dir()  # kept, not deleted
  # Resumed from step 2, the run ends where an uninterrupted one does, bit for bit.
  assert _main(GENERATOR, f"--workdir={reference}", "--config.total_steps=6", *common).returncode == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_io.train_state(workdir),
                         params_io.train_state(reference))

  result = _main(GENERATOR, f"--workdir={workdir}", "--config.total_steps=6", "--config.resume_step=4", *common)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "resumed from step 4" in result.stdout and (checkpoints / "6.after-resume").is_dir()
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_io.train_state(workdir),
                         params_io.train_state(reference))

  # Another model's config is an error about the config, and no checkpoint is touched.
  before = sorted(p.name for p in checkpoints.iterdir())
  result = _main(GENERATOR, f"--workdir={workdir}", "--config.total_steps=8", "--config.model.dim=128", *common)
  assert result.returncode == 1 and result.stdout.strip().splitlines()[-1] == (
      f"error: {workdir} holds a run of another model (model.dim: 64 there, 128 here): resume it with the model it "
      "was trained with, or train this one in a new workdir")
  assert sorted(p.name for p in checkpoints.iterdir()) == before


def _damage(step_dir, kind: str) -> str:
  """Damages a saved checkpoint as a full disk, a kill or a bad copy would; returns the file to be named."""
  arrays = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  if kind == "truncated":
    for path in arrays:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "/d/"
  if kind == "random_bytes":
    for path in arrays:
      path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    return "/d/"
  if kind == "manifest":
    (step_dir / "state" / "manifest.ocdbt").write_bytes(b"\x00garbage")
    return "manifest.ocdbt"
  if kind == "no_metadata":
    (step_dir / "state" / "_METADATA").unlink()
    return "state/_METADATA missing"
  data_file = next((step_dir / "data").glob("process_*.json"))
  data_file.write_text('{"next_index": ')
  return data_file.name


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "manifest", "no_metadata", "data_json"])
def test_each_kind_of_damage_falls_back_with_one_line_naming_the_file(tmp_path, capfd, kind):
  import grain
  from bigr_jax.train import checkpoints

  def iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())

  states, data = {}, iterator()
  writer = checkpoints.Checkpointer(tmp_path, async_save=False)
  for step in (2, 4):
    next(data)
    states[step] = {"w": jax.numpy.full((64, 64), float(step)), "b": jax.numpy.arange(step, step + 100.0)}
    writer.save(step, states[step], data)
  writer.close()
  named = _damage(tmp_path / "checkpoints" / "4", kind)
  capfd.readouterr()

  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states[2])
  resumed_data = iterator()
  reader = checkpoints.Checkpointer(tmp_path)
  state, step = reader.restore_resumable(abstract, resumed_data)
  reader.close()
  assert step == 2 and next(resumed_data) == 1  # the data iterator resumes where step 2 left it
  jax.tree_util.tree_map(np.testing.assert_array_equal, state, states[2])
  out, err = capfd.readouterr()
  assert out.startswith(f"checkpoint {tmp_path / 'checkpoints' / '4'} cannot be restored") and named in out, out
  assert "set aside as" in out and (tmp_path / "checkpoints" / "4.unreadable").is_dir()
  assert "tensorstore_spec" not in out and "Event loop is closed" not in out + err, (out + err)[-3000:]
  assert len((out + err).strip().splitlines()) <= 3, out + err


def test_a_library_error_is_one_line_and_its_trace_is_in_the_log(tmp_path):
  """An unreadable image reaches main through grain (a 50-line traceback that ends with grain's own note): one line
  names the image and the log, which holds the trace; --verbose shows it."""
  for i in range(4):
    path = tmp_path / "images" / "train" / f"class{i % 2}" / f"{i}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a png")
  workdir = tmp_path / "bae"
  command = ("--config=configs/bae_d24.py:runlocal", f"--workdir={workdir}", "--config.data.name=folder",
             f"--config.data.data_dir={tmp_path / 'images'}", "--config.data.eval_split=train",
             "--config.batch_size=4", "--config.tensorboard=False")
  result = _main(*command, devices=1)
  out = result.stdout + result.stderr
  log = workdir / "logs" / "train.process_0.log"
  assert result.returncode == 1 and out.strip().splitlines()[-1] == result.stdout.strip().splitlines()[-1], out
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith(f"error: bad image {tmp_path / 'images' / 'train' / 'class0'}") and str(log) in last, last
  assert "Traceback" not in out and "For simplicity" not in out and len(out.splitlines()) < 5, out[-3000:]
  assert "Traceback" in log.read_text() and "BadImageError" in log.read_text()

  verbose = _main(*command, "--verbose", devices=1)
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "BadImageError" in verbose.stderr

  # The same under the watcher (`--supervise`, as launch/tpu.py runs every command): the worker's line, its
  # stderr in the same log.
  supervised = _main(*command, "--supervise", devices=1)
  assert supervised.returncode == 1 and supervised.stdout.strip().splitlines()[-1] == last, supervised.stdout
  assert "Traceback" not in supervised.stdout + supervised.stderr
  assert log.read_text().count("=== ") == 2 and log.read_text().count("BadImageError") >= 2  # (--verbose wrote none)
