"""Typed configs from ml_collections sections: each concern is a frozen dataclass whose defaults are the only
defaults; a config section becomes one with `from_section`, which rejects keys the dataclass does not have.
Also: loading a config file outside absl flags."""

import dataclasses
import pathlib
import traceback
import typing
from typing import Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


def _as_dict(section) -> dict:
  if section is None:
    return {}
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  return dict(section)


def _coerce(kind, value):
  # Config files and JSON give lists where the dataclasses hold (hashable) tuples.
  origin = typing.get_origin(kind)
  if (kind is tuple or origin is tuple) and isinstance(value, list):
    return tuple(value)
  return value


def field_names(cls) -> tuple:
  return tuple(f.name for f in dataclasses.fields(cls))


def from_section(cls, section, where: str, **overrides):
  """`cls(**section)`; a key `cls` does not declare is an error naming `where` and the known keys. An instance
  of `cls` passes through (with `overrides` replaced), so callers take either."""
  if isinstance(section, cls):
    return dataclasses.replace(section, **overrides)
  values = {**_as_dict(section), **overrides}
  known = field_names(cls)
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(f"unknown {where} field(s) {unknown}; known: {sorted(known)}")
  hints = typing.get_type_hints(cls)
  built = {}
  for key, value in values.items():
    kind = hints.get(key)
    if dataclasses.is_dataclass(kind) and not dataclasses.is_dataclass(value):
      built[key] = from_section(kind, value, f"{where}.{key}")  # a nested section, e.g. evaluation.probe
    else:
      built[key] = _coerce(kind, value)
  return cls(**built)


def split_section(section, where: str, *classes) -> tuple:
  """One section that holds the fields of several dataclasses (e.g. `config.sample`: the sampler's and the
  run's): one instance of each, from its own keys; a key none of them declares is an error."""
  values = _as_dict(section)
  known = {name for cls in classes for name in field_names(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown {where} field(s) {unknown}; known: {sorted(known)}")
  return tuple(from_section(cls, {k: v for k, v in values.items() if k in field_names(cls)}, where)
               for cls in classes)


def to_section(*instances) -> ml_collections.ConfigDict:
  """The ConfigDict a config file declares: every field of the instances (their defaults, where built with
  none), so that each is overridable from the command line."""
  fields: dict = {}
  for instance in instances:
    fields.update(_to_plain(dataclasses.asdict(instance)))
  return ml_collections.ConfigDict(fields)


def _to_plain(values: Mapping) -> dict:
  return {k: (ml_collections.ConfigDict(_to_plain(v)) if isinstance(v, Mapping) else v) for k, v in values.items()}


def load_config_file(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:args]' with `--config.field=value` overrides exactly as `bigr_jax.main`'s
  --config does (for tools outside its flags); locked, so that a misspelled field is an error."""
  argv = ["load_config_file", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True, sys_argv=argv)
  parse_flags(values, argv)
  return values.config


def parse_flags(values: flags.FlagValues, argv: Sequence[str]) -> list:
  """`values(argv)`, the remaining arguments; a missing config file, an error inside it, an unknown field or a
  value of the wrong type is one ValueError line (absl and ml_collections raise chains of tracebacks)."""
  for arg in argv[1:]:
    path = arg.partition("=")[2].partition(":")[0] if arg.startswith("--config=") else ""
    if path and not pathlib.Path(path).is_file():
      raise FileNotFoundError(f"no config file {path}")
  try:
    return values(list(argv))
  except Exception as e:  # noqa: BLE001 (whatever the config file raises: reported in one line)
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
      chain.append(chain[-1].__cause__ or chain[-1].__context__)
    key_errors = [c for link in chain for c in (link, *link.args) if isinstance(c, KeyError)]
    if key_errors:  # a field the config lacks; ml_collections names the nearest
      raise ValueError(f"unknown config field {' '.join(str(key_errors[0].args[0]).split())}") from e
    if isinstance(e, flags.Error):  # a value of the wrong type, or an unknown flag: absl's message names it
      raise ValueError(str(e)) from e
    root, where = chain[-1], traceback.extract_tb(chain[-1].__traceback__)
    place = f" ({where[-1].filename}, line {where[-1].lineno})" if where and not isinstance(root, SyntaxError) else ""
    raise ValueError(f"{type(root).__name__}: {' '.join(str(root).split())}{place}") from e


def parse_flags_or_exit(values: flags.FlagValues, argv: Sequence[str]) -> list:
  """`parse_flags` for a command's `absl.app.run(flags_parser=...)`: a bad command line is one line, exit 1."""
  try:
    return parse_flags(values, argv)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
