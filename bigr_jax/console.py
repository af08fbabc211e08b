"""Where a command's words go. Progress (print) and the project's warnings and one-line errors reach the console;
the libraries' own logs (orbax, grain, asyncio, absl) and full tracebacks go to a log file in the workdir, or to the
console as well with `--verbose`."""

import datetime
import pathlib
import sys
import traceback

from absl import logging as absl_logging

from bigr_jax import files


WARNING = b"warning: "


def warn(message: str) -> None:
  """A warning the user should read, on the console whatever the log settings (`bigr_jax.supervisor` passes these
  lines on from a worker's stderr)."""
  print(f"{WARNING.decode()}{message}", file=sys.stderr, flush=True)


def log_file(workdir, mode: str, process_index: int) -> pathlib.Path:
  return pathlib.Path(workdir) / "logs" / f"{mode}.process_{process_index}.log"


def start_log(path: pathlib.Path, argv):
  """Appends a header for this command to `path`; the open file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  stream = open(path, "a", buffering=1)  # pylint: disable=consider-using-with  (open for the process's life)
  stream.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} {' '.join(argv)}\n")
  return stream


def open_log(path: pathlib.Path, argv) -> None:
  """Starts the log and sends Python's logging there instead of the console (absl's handler, which the root
  logger uses)."""
  absl_logging.get_absl_handler().python_handler.stream = start_log(path, argv)


def append_traceback(path: pathlib.Path, error: BaseException) -> None:
  with open(path, "a") as stream:
    traceback.print_exception(error, file=stream)


def one_line(error: BaseException) -> str:
  """The message that names the cause: the outermost of the project's own errors in the chain (it names the file
  or setting), else the innermost cause's first line (libraries wrap the real error, e.g. an OSError)."""
  ours = [e for e in files.causes(error) if type(e).__module__.startswith("bigr_jax.")]
  return str(ours[0]).strip().splitlines()[0] if ours else files.first_cause(error)
