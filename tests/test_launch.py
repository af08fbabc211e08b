"""launch/tpu.py: the dry-run commands of every subcommand and the missing-setting errors (nothing is run)."""

import importlib.util
import os
import pathlib
import shlex
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_tpu", ROOT / "launch" / "tpu.py")
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

TARGET = ["--project=my-proj", "--zone=us-east5-b", "--name=bigr"]
WHERE = "--project=my-proj --zone=us-east5-b"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
  for env, _, _ in tpu.SETTINGS.values():
    monkeypatch.delenv(env, raising=False)

  def refuse(*args, **kwargs):
    raise AssertionError(f"a dry run tried to run {args}")
  monkeypatch.setattr(subprocess, "run", refuse)


def dry(capsys, *argv):
  """The printed commands, one string per line (--dry-run last: it is honoured even after `--`)."""
  assert tpu.main([*argv, "--dry-run"]) == 0
  out = capsys.readouterr().out
  return out.splitlines()


def remote(line):
  """The --command= of a gcloud ssh line, split into shell words."""
  words = shlex.split(line)
  command = [w for w in words if w.startswith("--command=")]
  assert len(command) == 1, line
  return shlex.split(command[0][len("--command="):])


def test_create_single_host(capsys):
  assert dry(capsys, "create", *TARGET, "--type=v5litepod-8") == [
      f"gcloud compute tpus tpu-vm create bigr --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite {WHERE}"]


def test_create_from_env_and_flag_wins(capsys, monkeypatch):
  monkeypatch.setenv("BIGR_TPU_PROJECT", "my-proj")
  monkeypatch.setenv("BIGR_TPU_ZONE", "us-east5-b")
  monkeypatch.setenv("BIGR_TPU_NAME", "from-env")
  monkeypatch.setenv("BIGR_TPU_TYPE", "v4-32")
  monkeypatch.setenv("BIGR_TPU_VERSION", "tpu-ubuntu2204-base")
  assert dry(capsys, "create", "--name=bigr", "--spot") == [
      f"gcloud compute tpus tpu-vm create bigr --accelerator-type=v4-32 --spot --version=tpu-ubuntu2204-base {WHERE}"]


def test_create_multislice_queued_resource(capsys):
  lines = dry(capsys, "create", *TARGET, "--type=v6e-256", "--slices=4", "--", "--network=my net")
  assert lines == [
      "gcloud compute tpus queued-resources create bigr --accelerator-type=v6e-256 "
      "--runtime-version=v2-alpha-tpuv6e --node-count=4 --node-prefix=bigr '--network=my net' " + WHERE]


def test_create_single_slice_queued(capsys, monkeypatch):
  monkeypatch.setenv("BIGR_TPU_QUEUED", "true")
  assert dry(capsys, "create", *TARGET, "--type=v5p-8", "--reserved") == [
      "gcloud compute tpus queued-resources create bigr --accelerator-type=v5p-8 --reserved "
      f"--runtime-version=v2-alpha-tpuv5 --node-id=bigr {WHERE}"]


def test_create_unknown_type_needs_version(capsys):
  assert tpu.main(["create", *TARGET, "--type=v9z-8", "--dry-run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "--version" in captured.err and "BIGR_TPU_VERSION" in captured.err


def test_setup_copies_this_checkout(capsys):
  tar, scp, ssh = dry(capsys, "setup", *TARGET)
  tarball = os.path.join(tempfile.gettempdir(), "bigr_jax-src-bigr.tar.gz")
  tar = shlex.split(tar)
  assert tar[:3] == ["tar", "-czf", tarball] and tar[-3:] == ["-C", str(ROOT), "."]
  assert {"--exclude=.git", "--exclude=.venv", "--exclude=./runs"} <= set(tar)
  assert scp == f"gcloud compute tpus tpu-vm scp {tarball} bigr:bigr_jax-src.tar.gz --worker=all {WHERE}"
  assert shlex.split(ssh)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bigr"]
  assert "--worker=all" in shlex.split(ssh)
  words = remote(ssh)
  assert words[:10] == ["mkdir", "-p", "bigr_jax", "&&", "tar", "-xzf", "bigr_jax-src.tar.gz", "-C", "bigr_jax", "&&"]
  assert ["uv", "pip", "install", "--python", ".venv/bin/python", "-e", ".[tpu]"] == \
      words[words.index("pip") - 1:words.index(".[tpu]") + 1]


def test_setup_git_clone_on_every_slice(capsys):
  (ssh,) = dry(capsys, "setup", *TARGET, "--slices=2", "--repo=https://github.com/me/bigr_jax.git", "--ref=v1",
               "--remote-dir=src/bigr")
  words = shlex.split(ssh)
  assert words[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "bigr"]
  assert "--worker=all" in words and "--node=all" in words
  line = remote(ssh)
  assert line[:9] == ["(test", "-d", "src/bigr/.git", "||", "git", "clone", "https://github.com/me/bigr_jax.git",
                      "src/bigr)", "&&"]
  assert line[9:15] == ["git", "-C", "src/bigr", "fetch", "origin", "v1"]
  assert ["cd", "src/bigr"] == line[line.index("cd"):line.index("cd") + 2]


def test_run_passes_config_overrides_quoted(capsys):
  tricky = "--config.data.name=it's a \"$HOME\" test"
  (ssh,) = dry(capsys, "run", *TARGET, "--config=configs/bigr_l.py:bits=24", "--config.optim.lr=2e-4",
               "--mode=train", "--", tricky, "--config.train.steps=10")
  words = shlex.split(ssh)
  assert words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bigr", "--worker=all"]
  assert remote(ssh) == [
      "cd", "bigr_jax", "&&", ".venv/bin/python", "-m", "bigr_jax.main", "--supervise",
      "--config=configs/bigr_l.py:bits=24", "--workdir=runs/bigr", "--mode=train", "--config.optim.lr=2e-4", tricky,
      "--config.train.steps=10"]


def test_run_multislice_sets_dcn_data(capsys):
  (ssh,) = dry(capsys, "run", *TARGET, "--slices=2", "--config=configs/bigr_xl.py", "--workdir=runs/xl")
  assert "--node=all" in shlex.split(ssh)
  assert remote(ssh)[-3:] == ["--config=configs/bigr_xl.py", "--workdir=runs/xl", "--config.mesh.dcn_data=2"]
  (ssh,) = dry(capsys, "run", *TARGET, "--slices=2", "--config=c.py", "--config.mesh.dcn_data=1")
  assert remote(ssh)[-1] == "--config.mesh.dcn_data=1"
  assert sum(w.startswith("--config.mesh.dcn_data") for w in remote(ssh)) == 1


def test_run_background(capsys):
  (ssh,) = dry(capsys, "run", *TARGET, "--config=configs/bigr_l.py", "--background")
  words = remote(ssh)
  assert words[:7] == ["cd", "bigr_jax", "&&", "mkdir", "-p", "logs", "&&"]
  assert words[7] == "(nohup" and words[-6:] == [">", "logs/bigr.log", "2>&1", "<", "/dev/null", "&)"]


def test_sync_push_and_pull(capsys):
  (ssh,) = dry(capsys, "sync", *TARGET, "--bucket=my-bucket/bigr/")
  assert shlex.split(ssh)[6] == "--worker=0"
  assert remote(ssh) == ["cd", "bigr_jax", "&&", "gcloud", "storage", "rsync", "--recursive", "runs/bigr",
                         "gs://my-bucket/bigr/bigr"]
  (ssh,) = dry(capsys, "sync", *TARGET, "--bucket=gs://b", "--workdir=runs/xl/", "--worker=all", "--slices=2")
  assert "--worker=all" in shlex.split(ssh) and "--node=all" in shlex.split(ssh)
  assert remote(ssh)[-2:] == ["runs/xl/", "gs://b/xl"]
  assert dry(capsys, "sync", *TARGET, "--bucket=gs://b", "--pull=out dir") == [
      "gcloud storage rsync --recursive gs://b/bigr 'out dir'"]


def test_status_and_delete(capsys):
  assert dry(capsys, "status", *TARGET) == [f"gcloud compute tpus tpu-vm describe bigr {WHERE}"]
  assert dry(capsys, "delete", *TARGET) == [f"gcloud compute tpus tpu-vm delete bigr {WHERE}"]
  assert dry(capsys, "delete", *TARGET, "--slices=3", "--yes") == [
      f"gcloud compute tpus queued-resources delete bigr --force --quiet {WHERE}"]


@pytest.mark.parametrize("argv, missing", [
    (["create"], ["--project", "BIGR_TPU_PROJECT", "--zone", "BIGR_TPU_ZONE", "--name", "BIGR_TPU_NAME",
                  "--type", "BIGR_TPU_TYPE"]),
    (["create", *TARGET], ["--type", "BIGR_TPU_TYPE"]),
    (["setup", "--project=p"], ["--zone", "BIGR_TPU_ZONE", "--name", "BIGR_TPU_NAME"]),
    (["run", "--config=c.py", "--zone=z", "--name=n"], ["--project", "BIGR_TPU_PROJECT"]),
    (["sync", *TARGET], ["--bucket", "BIGR_TPU_BUCKET"]),
    (["status"], ["--project", "BIGR_TPU_PROJECT"]),
    (["delete", "--project=p", "--zone=z"], ["--name", "BIGR_TPU_NAME"]),
])
def test_missing_settings(capsys, argv, missing):
  assert tpu.main([*argv, "--dry-run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "missing setting" in captured.err
  for word in missing:
    assert word in captured.err
  if "--project" not in missing:
    assert "BIGR_TPU_PROJECT" not in captured.err


def test_bad_slices_and_stray_arguments(capsys):
  assert tpu.main(["delete", *TARGET, "--slices=0", "--dry-run"]) == 2
  assert "slices" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    tpu.main(["sync", *TARGET, "--bucket=b", "--", "extra"])
  with pytest.raises(SystemExit):
    tpu.main(["setup", *TARGET, "--bogus"])


def test_without_dry_run_runs_the_same_commands(capsys, monkeypatch):
  ran = []
  monkeypatch.setattr(subprocess, "run", lambda argv: ran.append(argv) or subprocess.CompletedProcess(argv, 0))
  assert tpu.main(["run", *TARGET, "--config=configs/bigr_l.py", "--config.x=a b"]) == 0
  printed = dry(capsys, "run", *TARGET, "--config=configs/bigr_l.py", "--config.x=a b")
  assert [shlex.join(argv) for argv in ran] == printed
  ran.clear()
  monkeypatch.setattr(subprocess, "run", lambda argv: ran.append(argv) or subprocess.CompletedProcess(argv, 3))
  assert tpu.main(["setup", *TARGET]) == 3 and len(ran) == 1  # stops at the first failure
