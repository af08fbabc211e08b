"""The model families and their modes: `family(config.family).modes[mode].entry(config, workdir)` is what
`python -m bigr_jax.main --mode=<mode>` runs. Each family declares, in its own module, its modes, the check of
its config before any work, its programs for `--mode=compile`, and what the web app samples with:

- `tokenizer`: the B-AE (configs/bae_*.py);
- `generator`: BiGR on B-AE codes (configs/bigr_*.py);
- `demo`: both on a small digits set, end to end (configs/demo.py, configs/mnist.py).
"""

import functools
import importlib
from typing import Callable

from bigr_jax.families.base import Family

# Each is the module bigr_jax.families.<name>, which declares FAMILY. A command imports its config's family only:
# the demo's classifier and plots (scikit-learn, matplotlib) cost a generator's command seconds it never uses.
FAMILY_NAMES = ("tokenizer", "generator", "demo")


@functools.cache
def family(name: str) -> Family:
  if name not in FAMILY_NAMES:
    raise ValueError(f"the config's family is {name!r}; families: {', '.join(FAMILY_NAMES)}")
  return importlib.import_module(f"bigr_jax.families.{name}").FAMILY


def mode_names() -> tuple:
  """Every family's modes, each once, in the families' order."""
  return tuple(dict.fromkeys(mode for name in FAMILY_NAMES for mode in family(name).modes))


def family_of(config) -> Family:
  return family(config.get("family", None))


def _having(mode: str, overwrite: bool = False) -> list:
  return [name for name in FAMILY_NAMES
          if mode in family(name).modes and (family(name).modes[mode].overwrite or not overwrite)]


def entry_point(config, mode: str, overwrite: bool = False) -> Callable:
  """The function that runs `mode` for this config, as entry(config, workdir); a mode the config's family
  lacks, or --overwrite where it means nothing, is an error before any work starts."""
  own = family_of(config)
  if mode not in own.modes:  # (only then are the other families imported, for the message)
    if mode not in mode_names():
      raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(mode_names())}")
    raise ValueError(f"--mode={mode} needs a config of family {' or '.join(_having(mode))}; this config is a "
                     f"{own.name} config, which runs the modes {', '.join(own.modes)}")
  chosen = own.modes[mode]
  if chosen.overwrite:
    return functools.partial(chosen.entry, overwrite=overwrite)
  if overwrite:
    where = [f"{name} ({', '.join(_having(name, overwrite=True))})" for name in mode_names()
             if _having(name, overwrite=True)]
    raise ValueError(f"--overwrite means nothing to --mode={mode} on a {own.name} config; it applies to the modes "
                     f"(families) {', '.join(where)}")
  return chosen.entry


def check_models(config) -> None:
  """The family's check of its config before any work: a nonsense shape field (dim, heads, layers, bits, grid),
  count or learning rate is a message naming it rather than an error deep inside a run, and a released file named
  `hf://...` for a model it does not fit is refused before anything is downloaded."""
  family_of(config).check(config)
