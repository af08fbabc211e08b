"""Typed configs from ml_collections sections: each concern is a frozen dataclass whose defaults are the only
defaults; a config section becomes one with `from_section`, which rejects keys the dataclass does not have.
Also: loading a config file outside absl flags."""

import dataclasses
import pathlib
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
  path = spec.partition(":")[0]
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"no config file {path}")
  argv = ["load_config_file", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except (AttributeError, KeyError) as e:  # a field the config lacks: a KeyError names it and the nearest
    key_error = e if isinstance(e, KeyError) else e.__context__
    cause = key_error.args[0] if isinstance(key_error, KeyError) else str(e)
    raise ValueError(f"unknown config field in {' '.join(overrides)}: {' '.join(str(cause).split())}") from e
  except flags.Error as e:  # a value of the wrong type, or not a --config.* flag
    raise ValueError(str(e)) from e
  return values.config
