"""Entry point: `python -m bigr_jax.main --config=configs/X.py[:args] --workdir=DIR [--mode=...]`.

Any config field can be overridden (--config.optim.lr=2e-4); a misspelled one is an error. `MODES` lists each
mode, the config families it accepts and what it runs; the config's `family` field names its family.
"""

import functools
import gc
import logging
import os
import sys
from typing import Callable, NamedTuple

import jax
from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from bigr_jax import aot, artifacts, config_lib, demo, evaluation, files, hub, parallel, typed_config, workdir_lock
from bigr_jax.models.config import GeneratorConfig, TokenizerConfig
from bigr_jax.sampling import run_sample
from bigr_jax.train import checkpoints, generator, metrics, tokenizer

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, sys_argv=None) -> None:
  """The command's flags, on `flag_values` (another set than FLAGS parses a command line given as `sys_argv`)."""
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (with optional :args).",
                                  flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs (created if missing).",
                      flag_values=flag_values)
  flags.DEFINE_string("mode", None, "Overrides config.mode; one of bigr_jax.main.MODES.", flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace the finished outputs of encode (codes) and of a generator's "
                    "evaluate (evaluation.json and its generated samples); without it they are refused before any "
                    "work.", flag_values=flag_values)
  flags.mark_flags_as_required(["workdir"], flag_values=flag_values)


define_flags()


def _evaluate(config, workdir, overwrite: bool = False):
  evaluation.refuse_finished_evaluation(workdir, overwrite)  # before the samples are drawn
  return evaluation.evaluate_samples(config, workdir, overwrite=overwrite,
                                     sample_batch=run_sample.evaluation_samples(config, workdir, overwrite))


class Mode(NamedTuple):
  help: str
  entries: dict  # family -> entry(config, workdir)
  overwrites: tuple = ()  # families whose entry takes overwrite=: it refuses finished outputs without it


MODES = {
    "train": Mode("train (or resume) a model in the workdir",
                  {"generator": generator.train_and_evaluate, "tokenizer": tokenizer.train_and_evaluate,
                   "demo": demo.run}),
    "encode": Mode("bit codes of config.data (and of the flipped images) with a B-AE",
                   {"tokenizer": tokenizer.encode_dataset, "demo": demo.encode}, overwrites=("tokenizer", "demo")),
    "sample": Mode("class-conditional samples: PNG grid and ADM-layout .npz",
                   {"generator": run_sample.sample_to_workdir, "demo": demo.on_generator(run_sample.sample_to_workdir)}),
    "edit": Mode("inpaint, outpaint, class edit, interpolation or enrichment (config.edit)",
                 {"generator": run_sample.edit_to_workdir, "demo": demo.on_generator(run_sample.edit_to_workdir)}),
    "features": Mode("pooled features of the code splits and a linear probe on them",
                     {"generator": evaluation.features_and_probe, "demo": demo.features}),
    "evaluate": Mode("score samples: FID / IS / precision-recall with the Inception (ImageNet); the digit "
                     "classifier's verdict for the demo (redrawn and rewritten each time)",
                     {"generator": _evaluate, "demo": demo.evaluate}, overwrites=("generator",)),
    "sweep": Mode("the sampler's speed / quality frontier over config.sweep.grid: table, plot, best setting "
                  "within a speed budget", {"demo": demo.sweep}),
    "demo": Mode("the embedded demo end to end: tokenizer, codes, generator, samples, verdict",
                 {"demo": demo.run}),
    "compile": Mode("compile every program of the run for config.compile's chips (a TPU topology, from any host): "
                    "HBM, FLOPs, collectives and time bounds per chip; exit 1 if one does not fit",
                    {"generator": aot.run, "tokenizer": aot.run, "demo": demo.compile_programs}),
}


def entry_point(config, mode: str, overwrite: bool = False) -> Callable:
  """The function that runs `mode` for this config, as entry(config, workdir); a mode the config's family
  lacks, or --overwrite where it means nothing, is an error before any work starts."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
  family = config.get("family", None)
  if family is None:
    raise ValueError("the config declares no `family` (generator, tokenizer or demo)")
  entries = MODES[mode].entries
  if family not in entries:
    modes = [name for name, m in MODES.items() if family in m.entries]
    raise ValueError(f"--mode={mode} needs a config of family {' or '.join(entries)}; this config is a {family} "
                     f"config, which runs the modes {', '.join(modes)}")
  if family in MODES[mode].overwrites:
    return functools.partial(entries[family], overwrite=overwrite)
  if overwrite:
    where = [f"{name} ({', '.join(m.overwrites)})" for name, m in MODES.items() if m.overwrites]
    raise ValueError(f"--overwrite means nothing to --mode={mode} on a {family} config; it applies to the modes "
                     f"(families) {', '.join(where)}")
  return entries[family]


def check_models(config) -> None:
  """Builds the config's model sections before any work, so that a nonsense shape field (dim, heads, layers,
  bits, grid), count or learning rate is a message naming it rather than an error deep inside a run; and refuses
  a released file named `hf://...` for a model it does not fit, before anything is downloaded."""
  stages = [config.tokenizer, config.generator] if config.get("family", None) == "demo" else [config]
  for stage in stages:
    model = (TokenizerConfig if stage.family == "tokenizer" else GeneratorConfig).from_config(stage.model)
    config_lib.check_training_fields(stage)
    weights = [stage.get("init_from", ""), stage.get("evaluation", {}).get("params", "")]
    for source in filter(None, weights):
      hub.check_pairing(source, model)
    checkpoint = stage.get("tokenizer", {}).get("checkpoint", "")
    if checkpoint and stage.family == "tokenizer":
      hub.check_pairing(checkpoint, model)
    elif checkpoint and stage.tokenizer.get("config", ""):
      hub.check_pairing(checkpoint, artifacts.tokenizer_model_config(stage.tokenizer))


def check_workdir(workdir: str) -> None:
  if not workdir.strip():
    raise ValueError("--workdir is empty: name the run's directory (created if missing)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory")


def run(config, workdir: str, mode: str, overwrite: bool = False):
  entry = entry_point(config, mode, overwrite)
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
    entry_point(config, mode, FLAGS.overwrite)
    check_models(config)
  except ValueError as e:  # one line, not absl's usage text: the message names the setting and its choices
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1)
  try:
    run(config, FLAGS.workdir, mode, FLAGS.overwrite)
  except checkpoints.Preempted as e:
    print(e, flush=True)
    raise SystemExit(143)  # 128 + SIGTERM: the run did not finish
  except (checkpoints.SaveFailed, checkpoints.ConfigChanged, workdir_lock.WorkdirInUse, metrics.WriteFailed,
          files.UnusableFile, FileExistsError, FileNotFoundError, aot.DoesNotFit) as e:
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
