"""Entry points for `--mode=features` and `--mode=evaluate`: config -> files in the workdir.

All settings live in `config.evaluation`, the fields of `EvaluationConfig` (their defaults are its defaults):

  layers              blocks to pool (0-based; negative from the end; empty: the middle block n_layer // 2)
  condition           "null" (the null class, default) or "label" (the data's labels) as the class input
  batch_size          global batch of feature extraction and of the Inception (rounded up to the shards)
  splits              code splits to extract, (train split, eval split) for the probe
  features_dir        where features go (empty: <workdir>/features/<split>)
  batches_per_chunk   batches per chunk file (a crash loses at most one chunk)
  params              an orbax params checkpoint (`python -m bigr_jax.convert from-torch`); empty: the
                      latest training checkpoint in the workdir
  use_ema             take the EMA params of a training checkpoint
  probe               linear-probe recipe, the fields of `config_sections.ProbeConfig` (MAE's LARS by default;
                      optimizer="lbfgs" fits features that fit in memory to convergence)
  sample_batch        ADM-layout .npz of samples (empty: <workdir>/samples/fid.npz, which --mode=evaluate
                      generates first when it is missing)
  reference_batch     ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
  reference_stats     "recompute" (default: statistics of arr_0 through this Inception, so both sides use
                      the same network) or "file" (the batch's precomputed mu / sigma / mu_s / sigma_s,
                      computed by ADM with the TF graph)
  inception_weights   path of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights)
  num_samples         evaluate the first N samples (0: all)
  pr_k                nearest neighbours of the precision / recall manifolds (ADM: 3)
  distance_dtype      "float32" or "float16" (ADM's choice, with a float32 fallback) for P / R distances

The data of `--mode=features` is `config.data` with `split` replaced by each of `evaluation.splits`: a
code source ("codes", "original_codes") or "synthetic" (the runlocal stand-in). The mesh is `config.mesh`.
"""

import json
import os
from typing import Any, Optional

import jax
import numpy as np

from bigr_jax import artifacts, data, files, parallel
from bigr_jax.config_sections import DataConfig, EvaluationConfig
from bigr_jax.evaluation import features as features_lib
from bigr_jax.evaluation import inception
from bigr_jax.evaluation import linear_probe
from bigr_jax.evaluation import adm_metrics
from bigr_jax.models.config import GeneratorConfig


def evaluation_config(config) -> EvaluationConfig:
  """The run's `config.evaluation` (all defaults when the config has none)."""
  return EvaluationConfig.from_config(config.get("evaluation", None) if config is not None else None)


def _mesh(config, mesh):
  if mesh is not None:
    return mesh
  return parallel.make_mesh(config.get("mesh", None) if config is not None else None)


def load_generator_params(config, workdir: str, model_config: GeneratorConfig):
  """evaluation.params (any weights source of `artifacts`), else the workdir's latest training checkpoint."""
  ev = evaluation_config(config)
  try:
    return artifacts.generator_params(ev.params or workdir, model_config, use_ema=ev.use_ema)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}: train in this workdir first, or set evaluation.params to a converted "
                            "params checkpoint or a released file") from e


def _code_source(config, split: str):
  if config.data.name == "synthetic":
    model = config.model
    # One pattern set (one seed) for both splits; the eval split reads the records after the train split's.
    codes = data.SyntheticCodes(model.seq_len, model.binary_size, model.num_classes, size=1024, seed=config.seed)
    return _Slice(codes, 0 if split == "train" else 512, 512)
  data_config = DataConfig.from_config(config.data, split=split)
  if data_config.name not in data.builder.CODE_SOURCES:
    raise ValueError(f"feature extraction reads bit codes: data.name={data_config.name!r} is an image source. "
                     "Extract codes first (--mode=encode with a tokenizer config), then set data.name='codes'.")
  return data.build_source(data_config)


class _Slice:
  """Records [start, start + size) of a random-access source."""

  def __init__(self, source, start: int, size: int):
    self.source, self.start, self.size = source, start, size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int):
    return self.source[self.start + int(index)]


def features_dir(config, workdir: str, split: str) -> str:
  ev = evaluation_config(config)
  return os.path.join(ev.features_dir or str(artifacts.output_path(workdir, artifacts.FEATURES_DIR)), split)


def extract_features(config, workdir: str, *, params=None, splits=None, mesh=None) -> dict[str, str]:
  """Pooled features of `evaluation.layers` for each split of codes -> {split: directory}.

  Resumable: a run that stopped goes on from its last complete chunk. Reads `config.model`, `config.data`,
  `config.mesh` and `config.evaluation` (layers, condition, batch_size, splits, features_dir,
  batches_per_chunk, params, use_ema). `params` (unboxed) skips loading them from files.
  """
  ev = evaluation_config(config)
  model_config = GeneratorConfig.from_config(config.model)
  mesh = _mesh(config, mesh)
  if params is None:
    params = load_generator_params(config, workdir, model_config)
  extractor = features_lib.FeatureExtractor(model_config, params, tuple(ev.layers), mesh=mesh,
                                            condition=ev.condition,
                                            rules=parallel.rules_from_config(config))
  batch_size = parallel.round_up_to_shards(ev.batch_size, mesh)
  out = {}
  for split in splits or ev.splits:
    source = _code_source(config, split)
    directory = features_dir(config, workdir, split)
    print(f"features: split {split}, {len(source)} examples, layers {extractor.layers}, condition {ev.condition} "
          f"-> {directory}", flush=True)
    features_lib.write_features(
        extractor, lambda start, s=source: features_lib.batches_from_source(s, batch_size, start=start),
        directory, batches_per_chunk=ev.batches_per_chunk, num_examples=len(source))
    out[split] = directory
  return out


def probe_features(config, workdir: str, *, mesh=None, baselines: Optional[dict] = None) -> dict:
  """Linear probe of every extracted layer (train on splits[0], evaluate on splits[1]), and of each baseline
  (name -> (train features, train labels, eval features, eval labels), e.g. raw pixels) with the same recipe.

  Writes `<workdir>/linear_probe.json` and returns {"layers": {layer: {top1, top5, train_top1, final_loss, ...}},
  "best_layer", "best_top1", "best_top5", "baselines": {name: {...}}}.
  """
  ev = evaluation_config(config)
  if len(ev.splits) < 2:
    raise ValueError(f"evaluation.splits={tuple(ev.splits)} needs a train and an eval split for the probe")
  train_feats, train_labels = features_lib.load_features(features_dir(config, workdir, ev.splits[0]))
  eval_feats, eval_labels = features_lib.load_features(features_dir(config, workdir, ev.splits[1]))
  probe_config = ev.probe
  num_classes = config.model.get("num_classes", None) if config.get("model", None) else None
  mesh = _mesh(config, mesh)
  result = linear_probe.layer_sweep(train_feats, train_labels, eval_feats, eval_labels, probe_config,
                                    mesh=mesh, num_classes=num_classes)
  result["baselines"] = {name: linear_probe.train_probe(*arrays, probe_config, mesh=mesh, num_classes=num_classes)
                         for name, arrays in (baselines or {}).items()}
  _write_json(os.path.join(workdir, "linear_probe.json"),
              {**result, "layers": {str(k): v for k, v in result["layers"].items()},
               "probe": probe_config.__dict__, "condition": ev.condition})
  return result


def probe_summary(result: dict) -> str:
  """One line per probed layer and baseline: test and train top-1, the best layer marked."""
  lines = [f"linear probe ({len(result['layers'])} layers): best block {result['best_layer']}, top-1 "
           f"{result['best_top1']:.1f}%"]
  rows = [(f"block {layer}", r) for layer, r in result["layers"].items()] + list(result.get("baselines", {}).items())
  for name, r in rows:
    lines.append(f"  {name:<8} test top-1 {r['top1']:5.1f}%  train top-1 {r['train_top1']:5.1f}%  "
                 f"loss {r['final_loss']:.3f}" + ("  (did not fit)" if r["fit_warning"] else ""))
  return "\n".join(lines)


def features_and_probe(config, workdir: str, baselines: Optional[dict] = None) -> dict:
  """`--mode=features`: pooled features of `evaluation.splits`, then the probe of every layer (and baseline);
  prints the table and writes `<workdir>/linear_probe.json`."""
  extract_features(config, workdir)
  result = probe_features(config, workdir, baselines=baselines)
  print(f"{probe_summary(result)}\n({os.path.join(workdir, 'linear_probe.json')})", flush=True)
  return result


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    files.write_json(path, obj)


def reference_activations(runner: adm_metrics.InceptionRunner, reference_batch: str, cache_dir: str,
                          weights_tag: str) -> adm_metrics.Activations:
  """Pool and spatial activations of a reference batch, cached in `cache_dir` (keyed by file and weights)."""
  stat = os.stat(reference_batch)
  tag = f"{os.path.abspath(reference_batch)}|{stat.st_size}|{int(stat.st_mtime)}|{weights_tag}"
  cache = os.path.join(cache_dir, os.path.basename(reference_batch).replace(".npz", "") + ".activations.npz")
  if os.path.isfile(cache):
    with np.load(cache) as data:
      if str(data["tag"]) == tag:
        print(f"evaluate: reference activations from {cache}", flush=True)
        return adm_metrics.Activations(data["pool"], data["spatial"], None)
  acts = runner.npz_activations(reference_batch, probs=False)
  if jax.process_index() == 0:
    with files.atomic_path(cache) as tmp:
      np.savez(tmp, pool=acts.pool, spatial=acts.spatial, tag=np.asarray(tag))
  return acts


def refuse_finished_evaluation(workdir, overwrite: bool) -> None:
  path = artifacts.output_path(workdir, artifacts.EVALUATION_RESULT)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists: this workdir is evaluated already. Pass --overwrite to evaluate again "
                          f"(it replaces that file, and redraws {artifacts.EVALUATION_SAMPLES} if it was drawn here)")


def evaluate_samples(config, workdir: str, *, sample_batch: Optional[str] = None, inception_params=None,
                     mesh=None, overwrite: bool = False) -> dict:
  """FID, sFID, IS, precision and recall of an ADM-layout sample batch against the reference batch.

  Reads `config.evaluation` (sample_batch, reference_batch, reference_stats, inception_weights, num_samples,
  batch_size, pr_k, distance_dtype) and `config.mesh`. Writes `<workdir>/evaluation.json` (an existing one is
  refused unless `overwrite`) and returns the metrics dict (fid, sfid, inception_score, precision, recall,
  num_samples, num_reference).
  `inception_params` (Flax) skips reading the weights file.
  """
  refuse_finished_evaluation(workdir, overwrite)
  ev = evaluation_config(config)
  sample_batch = sample_batch or ev.sample_batch or str(artifacts.output_path(workdir, artifacts.EVALUATION_SAMPLES))
  if not os.path.isfile(sample_batch):
    raise FileNotFoundError(f"no sample batch at {sample_batch!r}: sample first (--mode=sample) or set "
                            "evaluation.sample_batch")
  if not ev.reference_batch or not os.path.isfile(ev.reference_batch):
    raise FileNotFoundError(f"evaluation.reference_batch={ev.reference_batch!r} does not exist (ADM's "
                            "VIRTUAL_imagenet256_labeled.npz for ImageNet 256)")
  weights_tag = "given"
  if inception_params is None:
    inception_params = inception.load_params(ev.inception_weights)
    weights_tag = os.path.abspath(ev.inception_weights)
  runner = adm_metrics.InceptionRunner(inception_params, _mesh(config, mesh), ev.batch_size)
  reference = reference_activations(runner, ev.reference_batch, os.path.join(workdir, "evaluation_cache"),
                                    weights_tag)
  reference_stats = None
  if ev.reference_stats == "file":
    reference_stats = adm_metrics.read_reference_statistics(ev.reference_batch)
    if reference_stats is None:
      raise ValueError(f"{ev.reference_batch} holds no mu / sigma; use evaluation.reference_stats='recompute'")
  samples = runner.npz_activations(sample_batch, limit=ev.num_samples or None)
  result = adm_metrics.compute_metrics(reference, samples, reference_stats=reference_stats, k=ev.pr_k,
                                       distance_dtype=ev.distance_dtype)
  result.update(sample_batch=sample_batch, reference_batch=ev.reference_batch, reference_stats=ev.reference_stats)
  print(f"evaluate: {json.dumps(result)}", flush=True)
  _write_json(str(artifacts.output_path(workdir, artifacts.EVALUATION_RESULT)), result)
  return result
