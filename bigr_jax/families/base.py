"""What a model family declares: its modes, the check of its config before any work, and (for the web app) the
generator it samples with."""

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Mode:
  help: str
  entry: Callable  # entry(config, workdir)
  overwrite: bool = False  # entry takes overwrite= and refuses finished outputs without it


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  modes: dict  # mode name -> Mode
  check: Callable  # check(config): the model sections and counts, and the weights named, before any work
  # base_config(...) -> the ConfigDict its config files start from (config_lib); None where a file composes others.
  base_config: Optional[Callable] = None
  # generator_stage(config, workdir) -> (generator config, its workdir, held-out images or None): what the web app
  # samples and edits with; None where the family has no generator.
  generator_stage: Optional[Callable] = None
