"""Entry point: `python -m bigr_jax.main --config=configs/X.py[:args] --workdir=DIR [--mode=...]`.

Modes: train (the config's model family decides which trainer), sample, encode, edit, features, evaluate,
demo (the embedded default end to end). Any config field can be overridden: --config.optim.lr=2e-4.
"""

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (with optional :args).",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs (created if missing).")
flags.DEFINE_string("mode", None, "Overrides config.mode: train | sample | encode | edit | features | evaluate | demo.")
flags.mark_flags_as_required(["workdir"])


def run(config, workdir: str, mode: str):
  from bigr_jax import parallel
  parallel.maybe_initialize_distributed()
  family = config.get("family", "generator")
  if mode == "train" and family == "generator":
    from bigr_jax.train import generator
    return generator.train_and_evaluate(config, workdir)
  if mode == "train" and family == "tokenizer":
    from bigr_jax.train import tokenizer
    return tokenizer.train_and_evaluate(config, workdir)
  if mode == "encode" and family == "tokenizer":
    from bigr_jax.train import tokenizer
    return tokenizer.encode_dataset(config, workdir)
  if mode == "demo":
    from bigr_jax import demo
    return demo.run(config, workdir)
  if mode == "sample":
    from bigr_jax.sampling import run_sample
    return run_sample.sample_to_workdir(config, workdir)
  if mode == "features":
    from bigr_jax import evaluation
    evaluation.extract_features(config, workdir)
    return evaluation.probe_features(config, workdir)
  if mode == "evaluate":
    from bigr_jax import evaluation
    from bigr_jax.sampling import run_sample
    return evaluation.evaluate_samples(config, workdir, sample_batch=run_sample.evaluation_samples(config, workdir))
  if mode == "edit":
    from bigr_jax.sampling import run_sample
    return run_sample.edit_to_workdir(config, workdir)
  raise ValueError(f"mode {mode!r} is not available for a {family} config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain are chatty at INFO
  from bigr_jax.train.checkpoints import Preempted
  config = FLAGS.config
  try:
    run(config, FLAGS.workdir, FLAGS.mode or config.get("mode", "train"))
  except Preempted as e:
    print(e, flush=True)
    raise SystemExit(143)  # 128 + SIGTERM: the run did not finish


if __name__ == "__main__":
  app.run(main)
