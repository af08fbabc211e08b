"""The tokenizer family (configs/bae_*.py): the binary autoencoder (B-AE) that turns images into bits; it trains
and encodes datasets into codes. Its modes, its config check and its program for `--mode=compile`."""

import jax
import jax.numpy as jnp
import numpy as np

from bigr_jax import config_lib, hub, parallel
from bigr_jax.compile import report
from bigr_jax.config_sections import CompileConfig
from bigr_jax.families.base import Family, Mode
from bigr_jax.models.config import TokenizerConfig
from bigr_jax.models.lpips import LPIPS
from bigr_jax.train import tokenizer_trainer


def check(config) -> None:
  """The model's fields, the loop's counts and the optimizers; a released `hf://` file named for a model it does
  not fit (init_from, the weights --mode=encode encodes with), before anything is downloaded."""
  model = TokenizerConfig.from_config(config.model)
  config_lib.check_training_fields(config)
  for source in filter(None, [config.get("init_from", ""), config.get("tokenizer", {}).get("checkpoint", "")]):
    hub.check_pairing(source, model)


def programs(config, mesh) -> list:
  """The B-AE's train step (encoder, decoder, PatchGAN, LPIPS: no loops, so the compiled FLOPs are whole)."""
  model = TokenizerConfig.from_config(config.model)
  lpips = None
  if config.loss.perceptual_weight > 0:  # its shapes matter, not its values: no weights file is read
    lpips = jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                jnp.zeros((1, 64, 64, 3))))["params"]
    lpips = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), lpips)
  trainer = tokenizer_trainer.TokenizerTrainer(config, mesh, max(1, int(config.total_steps or 1000)), lpips)
  batch = config.batch_size
  images = {"image": jax.ShapeDtypeStruct((batch, model.img_size, model.img_size, model.n_channels), jnp.float32,
                                          sharding=parallel.batch_sharding(mesh, 4))}
  lower = lambda: trainer.train_step.lower(trainer.abstract_state, images, report.abstract_key())  # noqa: E731
  return [report.Program("train_step", lower, batch)]


def fit_suggestions(config, mesh) -> list:
  """What would make the step fit: recomputing the blocks first, then the general ones."""
  hint = [] if config.model.remat else [
      "--config.model.remat=True: recompute each residual and attention block's activations"]
  return hint + report.fit_suggestions(config, mesh)


def compile_report(config, compile_config: CompileConfig) -> dict:
  return report.compile_programs(config, compile_config, "tokenizer", programs, fit_suggestions,
                                 batch_hint="the B-AE configs' `:chips={shards}`")


def compile_mode(config, workdir) -> dict:
  """`--mode=compile`: the B-AE's train step for `config.compile`'s chips."""
  return report.publish(compile_report(config, CompileConfig.from_config(config.compile)), workdir)


FAMILY = Family(
    name="tokenizer",
    modes={
        "train": Mode("train (or resume) a model in the workdir", tokenizer_trainer.train_and_evaluate),
        "encode": Mode("bit codes of config.data (and of the flipped images) with a B-AE",
                       tokenizer_trainer.encode_dataset, overwrite=True),
        "compile": Mode("compile the train step for config.compile's chips (a TPU topology, from any host): HBM, "
                        "FLOPs, collectives and time bounds per chip; exit 1 if it does not fit", compile_mode),
    },
    check=check,
    base_config=config_lib.base_tokenizer_config)
