"""Entry point: `python -m bigr_jax.main --config=configs/X.py[:args] --workdir=DIR [--mode=...]`.

Any config field can be overridden (--config.optim.lr=2e-4); a misspelled one is an error. The config's `family`
field names its family, and `bigr_jax.families` what each family's modes run.
"""

import functools
import gc
import logging
import os
import pathlib
import sys
import time

import jax
from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from bigr_jax import console, families, files, parallel, supervisor, typed_config, workdir_lock
from bigr_jax.compile import report
from bigr_jax.train import checkpoints, metric_writer
from bigr_jax.weights import params_io

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, sys_argv=None) -> None:
  """The command's flags, on `flag_values` (another set than FLAGS parses a command line given as `sys_argv`)."""
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (with optional :args).",
                                  flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs (created if missing).",
                      flag_values=flag_values)
  flags.DEFINE_string("mode", None, "Overrides config.mode: one of the modes of the config's family (the README's "
                      "table of modes; bigr_jax.families).", flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace the finished outputs of encode (codes) and of a generator's "
                    "evaluate (evaluation.json and its generated samples); without it they are refused before any "
                    "work.", flag_values=flag_values)
  flags.DEFINE_bool("verbose", False, "Show the libraries' logs (orbax, grain, JAX) and full tracebacks on the "
                    "console. Without it they go to WORKDIR/logs/MODE.process_N.log, and a failure is one line "
                    "naming its cause and that file.", flag_values=flag_values)
  flags.DEFINE_bool("supervise", None, "Run the work in a watched child process that reports a lost peer in one "
                    "line (bigr_jax/supervisor.py). Default: when the environment makes this one process of several "
                    "(JAX_NUM_PROCESSES, TPU_WORKER_HOSTNAMES, SLURM_NTASKS); launch/tpu.py run sets it.",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["workdir"], flag_values=flag_values)


define_flags()


def check_workdir(workdir: str) -> None:
  if not workdir.strip():
    raise ValueError("--workdir is empty: name the run's directory (created if missing)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory")


def last_checkpoint(workdir: str) -> str:
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  steps = params_io.finished_steps(directory) if directory.is_dir() else []
  return f"The last good checkpoint is step {steps[-1]} in {directory}" if steps else f"{directory} holds no checkpoint"


def after_a_lost_peer(workdir: str, mode: str) -> str:
  """What a process that lost a peer says to do: a training run resumes from its last good checkpoint."""
  if mode == "train":
    return f"{last_checkpoint(workdir)}; start every process again to resume from it"
  return "Start every process again"


def run_entry(entry, config, workdir: str, log=None):
  """Runs a mode's entry point (`families.entry_point`) on this process, joining the others first. `log(index)`
  is called with this process's index once the workdir is this job's, before any work."""
  parallel.maybe_initialize_distributed(config.peer_timeout_s)
  with workdir_lock.hold(workdir, active=jax.process_index() == 0):  # one job per workdir; process 0 holds it
    if log is not None:
      log(jax.process_index())
    return entry(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain are chatty at INFO
  config = FLAGS.config
  mode = FLAGS.mode or config.mode
  try:
    check_workdir(FLAGS.workdir)
    entry = families.entry_point(config, mode, FLAGS.overwrite)
    families.check_models(config)
  except ValueError as e:  # one line, not absl's usage text: the message names the setting and its choices
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1)
  supervise = parallel.several_processes() if FLAGS.supervise is None else FLAGS.supervise
  if supervise and not supervisor.is_worker():  # a worker child does the work (see there)
    raise SystemExit(supervisor.supervise(sys.argv, console.log_file(FLAGS.workdir, mode, supervisor.this_process()),
                                          FLAGS.verbose, lambda: after_a_lost_peer(FLAGS.workdir, mode)))
  log_path = None

  def start_log(process_index):
    nonlocal log_path
    if supervisor.is_worker():
      log_path = supervisor.worker_log()  # its stderr goes there already
    else:
      log_path = console.log_file(FLAGS.workdir, mode, process_index)
      if not FLAGS.verbose:
        console.open_log(log_path, sys.argv)

  try:
    run_entry(entry, config, FLAGS.workdir, start_log)
  except checkpoints.Preempted as e:
    print(e, flush=True)
    raise SystemExit(143)  # 128 + SIGTERM: the run did not finish
  except (checkpoints.SaveFailed, checkpoints.ConfigChanged, workdir_lock.WorkdirInUse, metric_writer.WriteFailed,
          files.UnusableFile, FileExistsError, FileNotFoundError, report.DoesNotFit) as e:
    _exit_after_noise(f"error: {e}", 1)  # the message names the file and the cause: no traceback
  except Exception as e:  # pylint: disable=broad-except
    if FLAGS.verbose or log_path is None:
      raise
    console.append_traceback(log_path, e)
    if supervisor.is_worker() and isinstance(e, jax.errors.JaxRuntimeError):
      # A collective failed: a peer is likely gone, and within the timeout JAX's runtime ends this process with
      # the lost process's name in the log, for the supervisor to report.
      time.sleep(config.peer_timeout_s + 30)
    _exit_after_noise(f"error: {console.one_line(e)} (the full trace is in {log_path}; --verbose shows it)", 1)


def _exit_after_noise(message: str, status: int) -> None:
  """Ends the process with `message` as its last line: orbax's background threads and asyncio would otherwise
  keep logging their copies of the same failure as the interpreter shuts down."""
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  absl_logging.set_verbosity(absl_logging.FATAL)
  gc.collect()
  sys.stderr.flush()
  print(message, flush=True)
  os._exit(status)  # no exit handlers: every file is closed by now, and they only add noise


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(typed_config.parse_flags_or_exit, FLAGS))
