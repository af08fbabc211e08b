"""Entry point: `python -m bigr_jax.main --config=configs/X.py[:args] --workdir=DIR [--mode=...]`.

Any config field can be overridden (--config.optim.lr=2e-4); a misspelled one is an error. The config's `family`
field names its family, and `bigr_jax.families` what each family's modes run.
"""

import functools
import gc
import logging
import os
import sys

import jax
from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from bigr_jax import families, files, parallel, typed_config, workdir_lock
from bigr_jax.compile import report
from bigr_jax.train import checkpoints, metric_writer

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, sys_argv=None) -> None:
  """The command's flags, on `flag_values` (another set than FLAGS parses a command line given as `sys_argv`)."""
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (with optional :args).",
                                  flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs (created if missing).",
                      flag_values=flag_values)
  flags.DEFINE_string("mode", None, f"Overrides config.mode; one of {', '.join(families.mode_names())} (each family runs "
                      "some: bigr_jax.families).", flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace the finished outputs of encode (codes) and of a generator's "
                    "evaluate (evaluation.json and its generated samples); without it they are refused before any "
                    "work.", flag_values=flag_values)
  flags.mark_flags_as_required(["workdir"], flag_values=flag_values)


define_flags()


def check_workdir(workdir: str) -> None:
  if not workdir.strip():
    raise ValueError("--workdir is empty: name the run's directory (created if missing)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory")


def run_entry(entry, config, workdir: str):
  """Runs a mode's entry point (`families.entry_point`) on this process, joining the others first."""
  parallel.maybe_initialize_distributed()
  with workdir_lock.hold(workdir, active=jax.process_index() == 0):  # one job per workdir; process 0 holds it
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
  try:
    run_entry(entry, config, FLAGS.workdir)
  except checkpoints.Preempted as e:
    print(e, flush=True)
    raise SystemExit(143)  # 128 + SIGTERM: the run did not finish
  except (checkpoints.SaveFailed, checkpoints.ConfigChanged, workdir_lock.WorkdirInUse, metric_writer.WriteFailed,
          files.UnusableFile, FileExistsError, FileNotFoundError, report.DoesNotFit) as e:
    _exit_after_noise(f"error: {e}", 1)  # the message names the file and the cause: no traceback


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
