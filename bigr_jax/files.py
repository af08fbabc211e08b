"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, never half of one.
And the error for an input file that cannot be used, with the one line of a failure's cause that messages quote."""

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
  """Yields a temporary path beside `path` (same suffix, so numpy and torch keep the name as given); on
  success it replaces `path`, on an error it is removed and `path` is left as it was."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
  os.close(handle)
  try:
    yield tmp
    descriptor = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(descriptor)  # the data is on disk before the name points at it
    finally:
      os.close(descriptor)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path, obj: Any) -> pathlib.Path:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=_plain)
  return pathlib.Path(path)


def _plain(value):
  # numpy scalars and arrays, tuples in dataclasses: written as JSON numbers and lists.
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def read_json(path) -> Any:
  with open(path) as f:
    return json.load(f)


class UnusableFile(ValueError):
  """An input file (weights, a checkpoint) that is truncated, damaged or of the wrong kind. Its message names the
  file and the cause; the command line prints it as one line."""


def causes(error: BaseException) -> list:
  """`error` and the errors behind it, outermost first (as a traceback shows them, from the bottom up)."""
  chain = [error]
  while chain[-1].__cause__ is not None or (chain[-1].__context__ is not None and
                                            not chain[-1].__suppress_context__):
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def first_cause(error: BaseException) -> str:
  """The innermost cause's first line: orbax wraps the real error (e.g. `No space left on device`), and
  tensorstore appends its whole JSON spec, which names nothing the cause does not."""
  error = causes(error)[-1]
  text = str(error).strip().splitlines()
  line = text[0].split(" [tensorstore_spec")[0] if text else ""
  return f"{type(error).__name__}: {line}" if line else type(error).__name__
