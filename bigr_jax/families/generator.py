"""The generator family (configs/bigr_*.py): BiGR trained on B-AE codes; it samples, edits, extracts features for
the linear probe and is scored by FID. Its modes, its config check and its programs for `--mode=compile`."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigr_jax import artifacts, config_lib, evaluation, hub, parallel
from bigr_jax.compile import report
from bigr_jax.config_sections import CompileConfig
from bigr_jax.evaluation import features as features_lib
from bigr_jax.families.base import Family, Mode
from bigr_jax.models import bigr
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.sampling import drawing, sampler
from bigr_jax.train import generator_trainer


def check(config) -> None:
  """The model's fields, the loop's counts and the optimizer; a released `hf://` file named for a model it does
  not fit (weights, evaluation params, the B-AE where its config file is named), before anything is downloaded."""
  model = GeneratorConfig.from_config(config.model)
  config_lib.check_training_fields(config)
  for source in filter(None, [config.get("init_from", ""), config.get("evaluation", {}).get("params", "")]):
    hub.check_pairing(source, model)
  checkpoint = config.get("tokenizer", {}).get("checkpoint", "")
  if checkpoint and config.tokenizer.get("config", ""):
    hub.check_pairing(checkpoint, artifacts.tokenizer_model_config(config.tokenizer))


def evaluate(config, workdir, overwrite: bool = False):
  """`--mode=evaluate`: refuses finished outputs before any sample is drawn, then draws and scores them."""
  evaluation.refuse_finished_evaluation(workdir, overwrite)
  return evaluation.evaluate_samples(config, workdir, overwrite=overwrite,
                                     sample_batch=drawing.evaluation_samples(config, workdir, overwrite))


# --- --mode=compile ----------------------------------------------------------------------------------------------


def with_model(config, **model_changes):
  """A copy of the config with `model` fields changed (e.g. the depth the per-block figures compile at)."""
  variant = config.copy_and_resolve_references()
  variant.model.update(model_changes)
  return variant


def generator_train_step(config, mesh, batch: int) -> Callable[[], "jax.stages.Lowered"]:
  """What lowers the generator's train step of `config` at a global `batch` on `mesh` (abstract: nothing allocated)."""
  trainer = generator_trainer.GeneratorTrainer(config, mesh, total_steps=max(1, int(config.total_steps or 1000)))
  key = report.abstract_key()
  return lambda: trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(batch), key)


def _param_shapes(model: GeneratorConfig, sharding_of) -> dict:
  """The generator's params as ShapeDtypeStructs, each with `sharding_of(path, shape)`."""
  shapes = nn.meta.unbox(bigr.param_shapes(model))
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                sharding_of(shapes))


def programs(config, mesh) -> list:
  """The run's programs as `--mode=compile` compiles them: the train step, the sampler, the feature extractor."""
  model = GeneratorConfig.from_config(config.model)
  n = mesh.devices.size
  batch = config.batch_size

  per_block = None
  if model.scan_layers and model.n_layer > 1:  # the scanned stack's FLOPs, bytes and collectives, by trip count
    per_block = (generator_train_step(with_model(config, n_layer=1, scan_layers=False), mesh, batch),
                 generator_train_step(with_model(config, n_layer=2, scan_layers=False), mesh, batch), model.n_layer)
  out = [report.Program("train_step", generator_train_step(config, mesh, batch), batch,
                        bigr.train_flops_per_image(model) * batch / n, per_block)]

  # Sampling as --mode=sample runs it: checkpoint params (float32) on every chip, the batch split.
  sampler_config, run = drawing.sample_settings(config.sample)
  sample_batch = parallel.round_up_to_shards(run.batch_size or model.num_classes, mesh)
  replicated = lambda shapes: jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), shapes)
  sample_params = _param_shapes(model, replicated)
  out.append(report.Program(
      "sample", lambda: sampler.lower_generate(model, sample_params, sample_batch, sampler_config, mesh,
                                               parallel.BATCH_AXES),
      sample_batch, sampler.flops_per_image(model, sampler_config) * sample_batch / n, loop_bodies_once=True))

  # Features as --mode=features extracts them: the model cut after the deepest probed block.
  ev = evaluation.evaluation_config(config)
  layers = features_lib.resolve_layers(tuple(ev.layers), model.n_layer)
  truncated = model.replace(n_layer=max(layers) + 1)
  feature_batch = parallel.round_up_to_shards(ev.batch_size, mesh)
  bits = jax.ShapeDtypeStruct((feature_batch, model.seq_len, model.binary_size), jnp.float32,
                              sharding=parallel.batch_sharding(mesh, 3))
  labels = jax.ShapeDtypeStruct((feature_batch,), jnp.int32, sharding=parallel.batch_sharding(mesh, 1))

  def features(variant, variant_layers):
    pooled, shardings = features_lib.pooled_program(variant, variant_layers, mesh, ev.condition)
    return lambda: pooled.lower(_param_shapes(variant, lambda _: shardings), bits, labels)

  per_block = None
  if truncated.scan_layers and truncated.n_layer > 1:
    per_block = (features(truncated.replace(n_layer=1, scan_layers=False), [0]),
                 features(truncated.replace(n_layer=2, scan_layers=False), [1]), truncated.n_layer)
  f = bigr.forward_flops(truncated)
  out.append(report.Program("features", features(truncated, layers), feature_batch,
                            (f.embed + truncated.n_layer * f.block) * feature_batch / n, per_block))
  return out


def fit_suggestions(config, mesh) -> list:
  """What would make a program fit: recomputing activations first, then the general ones."""
  hint = []
  if config.model.remat_policy != "full":
    hint.append(f"--config.model.remat_policy=full (now {config.model.remat_policy!r}): recompute activations")
  return hint + report.fit_suggestions(config, mesh)


def compile_report(config, compile_config: CompileConfig) -> dict:
  return report.compile_programs(config, compile_config, "generator", programs, fit_suggestions)


def compile_mode(config, workdir) -> dict:
  """`--mode=compile`: the train step, the sampler and the feature extractor for `config.compile`'s chips."""
  return report.publish(compile_report(config, CompileConfig.from_config(config.compile)), workdir)


FAMILY = Family(
    name="generator",
    modes={
        "train": Mode("train (or resume) a model in the workdir", generator_trainer.train_and_evaluate),
        "sample": Mode("class-conditional samples: PNG grid and ADM-layout .npz", drawing.sample_to_workdir),
        "edit": Mode("inpaint, outpaint, class edit, interpolation or enrichment (config.edit)",
                     drawing.edit_to_workdir),
        "features": Mode("pooled features of the code splits and a linear probe on them",
                         evaluation.features_and_probe),
        "evaluate": Mode("score samples: FID / IS / precision-recall with the Inception", evaluate, overwrite=True),
        "compile": Mode("compile every program of the run for config.compile's chips (a TPU topology, from any "
                        "host): HBM, FLOPs, collectives and time bounds per chip; exit 1 if one does not fit",
                        compile_mode),
    },
    check=check,
    base_config=config_lib.base_generator_config,
    generator_stage=lambda config, workdir: (config, workdir, None))
