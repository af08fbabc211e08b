#!/usr/bin/env python3
"""Cloud TPU launcher for bigr_jax: create, setup, run, sync, status, delete.

  python launch/tpu.py create|setup|run|sync|status|delete [flags] [--dry-run] [-- passthrough...]

Settings come from flags or environment variables (flag wins): --project BIGR_TPU_PROJECT, --zone BIGR_TPU_ZONE,
--name BIGR_TPU_NAME, --type BIGR_TPU_TYPE, --version BIGR_TPU_VERSION, --bucket BIGR_TPU_BUCKET,
--slices BIGR_TPU_SLICES, --queued BIGR_TPU_QUEUED, --repo BIGR_TPU_REPO, --remote-dir BIGR_TPU_REMOTE_DIR.
With --slices > 1 (or --queued) the TPU is a queued resource: every subcommand must see the same settings.
--dry-run prints the exact commands (one per line, shell-quoted) instead of running them.
Args after `--` go to `gcloud ... create` (create) or to `python -m bigr_jax.main` (run).
"""

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# setting -> (env var, description, default)
SETTINGS = {
    "project": ("BIGR_TPU_PROJECT", "Google Cloud project", None),
    "zone": ("BIGR_TPU_ZONE", "zone", None),
    "name": ("BIGR_TPU_NAME", "TPU name", None),
    "type": ("BIGR_TPU_TYPE", "accelerator type (e.g. v5litepod-16)", None),
    "version": ("BIGR_TPU_VERSION", "runtime version (default from --type)", None),
    "bucket": ("BIGR_TPU_BUCKET", "bucket to sync to (gs://BUCKET[/PREFIX])", None),
    "slices": ("BIGR_TPU_SLICES", "number of slices (> 1: multi-slice queued resource)", "1"),
    "queued": ("BIGR_TPU_QUEUED", "use a queued resource even for one slice (1/true)", ""),
    "repo": ("BIGR_TPU_REPO", "git URL to clone on the workers (default: copy this checkout)", None),
    "remote_dir": ("BIGR_TPU_REMOTE_DIR", "checkout dir on the workers, relative to $HOME", "bigr_jax"),
}

# Runtime versions recommended for JAX (cloud.google.com/tpu/docs/runtimes), by accelerator-type prefix.
RUNTIMES = (("v6e", "v2-alpha-tpuv6e"), ("v5p", "v2-alpha-tpuv5"), ("v5litepod", "v2-alpha-tpuv5-lite"),
            ("v5e", "v2-alpha-tpuv5-lite"), ("v4", "tpu-ubuntu2204-base"), ("v3", "tpu-ubuntu2204-base"),
            ("v2", "tpu-ubuntu2204-base"))

OPTIONAL = ("queued", "repo", "version")
TRUE = ("1", "true", "yes", "on")


class SettingError(Exception):
  pass


def flag_name(key: str) -> str:
  return "--" + key.replace("_", "-")


def settings(args, *keys) -> dict:
  """Resolves `keys` from flags, then env vars, then defaults; names every missing one at once."""
  values, missing = {}, []
  for key in keys:
    env, desc, default = SETTINGS[key]
    value = getattr(args, key, None)
    if value in (None, ""):
      value = os.environ.get(env) or default
    if value in (None, "") and key not in OPTIONAL:
      missing.append(f"{desc}: pass {flag_name(key)} or set {env}")
    values[key] = value
  if missing:
    raise SettingError("missing setting(s):\n  " + "\n  ".join(missing))
  return values


def runtime_version(accel_type: str, version) -> str:
  if version:
    return version
  for prefix, runtime in RUNTIMES:
    if accel_type.startswith(prefix + "-"):
      return runtime
  raise SettingError(f"no default runtime version for accelerator type {accel_type!r}: "
                     f"pass --version or set {SETTINGS['version'][0]}")


class Target:
  """One TPU VM (tpu-vm commands) or a queued resource, possibly multi-slice (queued-resources commands)."""

  def __init__(self, args):
    s = settings(args, "project", "zone", "name", "slices", "queued")
    self.project, self.zone, self.name = s["project"], s["zone"], s["name"]
    try:
      self.slices = int(s["slices"])
    except ValueError:
      self.slices = 0
    if self.slices < 1:
      raise SettingError(f"slices must be a positive integer, got {s['slices']!r}")
    self.queued = self.slices > 1 or str(s["queued"]).lower() in TRUE

  def gcloud(self, verb: str, *rest: str) -> list:
    group = "queued-resources" if self.queued else "tpu-vm"
    return ["gcloud", "compute", "tpus", group, verb, *rest, f"--project={self.project}", f"--zone={self.zone}"]

  def on_workers(self, worker: str = "all") -> list:
    return [f"--worker={worker}"] + (["--node=all"] if self.queued else [])

  def ssh(self, command: str, worker: str = "all") -> list:
    return self.gcloud("ssh", self.name, *self.on_workers(worker), f"--command={command}")

  def scp(self, local: str, remote: str) -> list:
    return self.gcloud("scp", local, f"{self.name}:{remote}", *self.on_workers())


def chain(*commands) -> str:
  """One remote shell line: each command is a list of words (quoted here) or a literal shell string."""
  return " && ".join(c if isinstance(c, str) else shlex.join(c) for c in commands)


def run_name(workdir: str) -> str:
  return pathlib.PurePosixPath(workdir.rstrip("/")).name


def default_workdir(args, target: Target) -> str:
  return args.workdir or f"runs/{target.name}"


# --- subcommands: each returns the list of commands (argv lists) it would run -----------------------------

def cmd_create(args, extra):
  target = Target(args)
  s = settings(args, "type", "version")
  version = runtime_version(s["type"], s["version"])
  options = [f"--accelerator-type={s['type']}"]
  options += ["--spot"] if args.spot else []
  options += ["--reserved"] if args.reserved else []
  if not target.queued:
    return [target.gcloud("create", target.name, *options, f"--version={version}", *extra)]
  nodes = ([f"--node-count={target.slices}", f"--node-prefix={target.name}"] if target.slices > 1
           else [f"--node-id={target.name}"])
  return [target.gcloud("create", target.name, *options, f"--runtime-version={version}", *nodes, *extra)]


def cmd_setup(args, extra):
  target = Target(args)
  s = settings(args, "repo", "remote_dir")
  remote = s["remote_dir"]
  commands = []
  if s["repo"]:
    fetch = chain(f"(test -d {shlex.quote(remote + '/.git')} || {shlex.join(['git', 'clone', s['repo'], remote])})",
                  ["git", "-C", remote, "fetch", "origin", args.ref],
                  ["git", "-C", remote, "checkout", "--force", "--detach", "FETCH_HEAD"])
  else:
    tarball = os.path.join(tempfile.gettempdir(), f"bigr_jax-src-{target.name}.tar.gz")
    excludes = [f"--exclude={p}" for p in (".git", ".venv", ".cache", ".pytest_cache", "__pycache__",
                                           "*.egg-info", "./runs", "./workdir*", "./tests/fixtures")]
    commands.append(["tar", "-czf", tarball, *excludes, "-C", str(ROOT), "."])
    commands.append(target.scp(tarball, "bigr_jax-src.tar.gz"))
    fetch = chain(["mkdir", "-p", remote], ["tar", "-xzf", "bigr_jax-src.tar.gz", "-C", remote],
                  ["rm", "bigr_jax-src.tar.gz"])
  # jax 0.10 needs Python >= 3.11, newer than some TPU images ship: uv brings its own Python.
  install = chain('export PATH="$HOME/.local/bin:$PATH"',
                  "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
                  ["cd", remote],
                  f"(test -x .venv/bin/python || {shlex.join(['uv', 'venv', '--python', args.python, '.venv'])})",
                  ["uv", "pip", "install", "--python", ".venv/bin/python", "-e", ".[tpu]"],  # jax[tpu] at the pinned jax
                  [".venv/bin/python", "-c", "import bigr_jax, jax; print('jax', jax.__version__)"])
  commands.append(target.ssh(chain(fetch, install)))
  return commands


def cmd_run(args, extra):
  target = Target(args)
  remote = settings(args, "remote_dir")["remote_dir"]
  workdir = default_workdir(args, target)
  # --supervise: a lost or hung host is one line naming it (TPU VMs need not tell JAX's host count in the env).
  main = [".venv/bin/python", "-m", "bigr_jax.main", "--supervise", f"--config={args.config}", f"--workdir={workdir}"]
  main += [f"--mode={args.mode}"] if args.mode else []
  main += extra
  if target.slices > 1 and not any(a.split("=")[0] == "--config.mesh.dcn_data" for a in extra):
    main.append(f"--config.mesh.dcn_data={target.slices}")
  if args.background:
    log = f"logs/{run_name(workdir)}.log"
    line = chain(["cd", remote], ["mkdir", "-p", "logs"],
                 f"(nohup {shlex.join(main)} > {shlex.quote(log)} 2>&1 < /dev/null &)")
  else:
    line = chain(["cd", remote], main)
  return [target.ssh(line)]


def cmd_sync(args, extra):
  target = Target(args)
  s = settings(args, "bucket", "remote_dir")
  workdir = default_workdir(args, target)
  bucket = s["bucket"].rstrip("/")
  dest = (bucket if bucket.startswith("gs://") else "gs://" + bucket) + "/" + run_name(workdir)
  if args.pull:
    return [["gcloud", "storage", "rsync", "--recursive", dest, args.pull]]
  rsync = ["gcloud", "storage", "rsync", "--recursive", workdir, dest]
  return [target.ssh(chain(["cd", s["remote_dir"]], rsync), worker=args.worker)]


def cmd_status(args, extra):
  target = Target(args)
  return [target.gcloud("describe", target.name)]


def cmd_delete(args, extra):
  target = Target(args)
  force = ["--force"] if target.queued else []  # deletes the slices, then the queued resource
  return [target.gcloud("delete", target.name, *force, *(["--quiet"] if args.yes else []))]


def parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  for key, (env, desc, default) in SETTINGS.items():
    if key == "queued":
      common.add_argument("--queued", action="store_const", const="1", help=f"{desc} [{env}]")
    else:
      default_help = f", default {default}" if default else ""
      common.add_argument(flag_name(key), dest=key, help=f"{desc} [{env}]{default_help}")
  common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")

  p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("create", parents=[common], help="create the TPU VM / queued resource")
  c.add_argument("--spot", action="store_true", help="Spot capacity")
  c.add_argument("--reserved", action="store_true", help="use a reservation")
  c = sub.add_parser("setup", parents=[common], help="copy or clone the repo on every worker, pip install -e .")
  c.add_argument("--ref", default="HEAD", help="branch, tag or commit to check out (with --repo)")
  c.add_argument("--python", default="3.11", help="Python version for the workers' venv")
  c = sub.add_parser("run", parents=[common], help="python -m bigr_jax.main on every worker at once")
  c.add_argument("--config", required=True, help="config file with optional :args, e.g. configs/bigr_l.py:bits=24")
  c.add_argument("--workdir", help="workdir on the workers, relative to the checkout (default runs/NAME)")
  c.add_argument("--mode", help="train | sample | encode | edit | features | evaluate | demo")
  c.add_argument("--background", action="store_true", help="detach (nohup), log to logs/RUN.log on each worker")
  c = sub.add_parser("sync", parents=[common], help="rsync the workers' workdir to BUCKET/RUN")
  c.add_argument("--workdir", help="workdir on the workers (default runs/NAME)")
  c.add_argument("--worker", default="0", help="which worker(s) push: 0 (default; process 0 writes metrics and "
                 "config), all, or a list like 0,2")
  c.add_argument("--pull", metavar="DIR", help="instead, copy BUCKET/RUN down to DIR on this machine")
  sub.add_parser("status", parents=[common], help="describe the TPU / queued resource")
  c = sub.add_parser("delete", parents=[common], help="delete the TPU (queued: all slices and the request)")
  c.add_argument("--yes", action="store_true", help="do not ask for confirmation")
  return p


COMMANDS = dict(create=cmd_create, setup=cmd_setup, run=cmd_run, sync=cmd_sync, status=cmd_status, delete=cmd_delete)
TARGET = ("project", "zone", "name")
NEEDS = dict(create=TARGET + ("type",), setup=TARGET, run=TARGET, sync=TARGET + ("bucket",), status=TARGET,
             delete=TARGET)


def build(argv) -> tuple:
  """(args, commands) for argv (without the program name); raises SettingError before anything runs."""
  argv = list(argv)
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  p = parser()
  args, unknown = p.parse_known_args(argv)
  if "--dry-run" in extra:  # never passed through: neither gcloud create nor bigr_jax.main has it
    extra = [a for a in extra if a != "--dry-run"]
    args.dry_run = True
  if args.command == "run":  # config overrides may also come before `--`
    extra = [a for a in unknown if a.startswith("--config.")] + extra
    unknown = [a for a in unknown if not a.startswith("--config.")]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  if extra and args.command not in ("create", "run"):
    p.error(f"{args.command} takes no arguments after --")
  settings(args, *NEEDS[args.command])  # every missing setting in one error, before any command is built
  return args, COMMANDS[args.command](args, extra)


def main(argv=None) -> int:
  try:
    args, commands = build(sys.argv[1:] if argv is None else argv)
  except SettingError as e:
    print(f"launch/tpu.py: {e}", file=sys.stderr)
    return 2
  for command in commands:
    if args.dry_run:
      print(shlex.join(command))
      continue
    print("+", shlex.join(command), file=sys.stderr, flush=True)
    rc = subprocess.run(command).returncode
    if rc:
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
