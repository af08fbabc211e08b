"""The typed sections of a run's config: every field a section may hold, its default and its check.

Config files (`configs/*.py`, through `bigr_jax.config_lib`) declare their sections from these dataclasses, and the
code reads them back with `from_config`; this module imports nothing but the config machinery, so loading a config
file builds no trainer, sampler, evaluator or data pipeline. The model's own fields are `bigr_jax.models.config`.
"""

import dataclasses
import itertools
import math
import pathlib

import ml_collections
import numpy as np

from bigr_jax import typed_config


# --- the mesh and the chips (bigr_jax.parallel, bigr_jax.chips) ---

@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (`config.mesh`); one of data / fsdp / tensor may be -1 (the remaining devices).
  dcn_data > 1 spreads `data` over that many slices (multi-slice TPU)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1

  @classmethod
  def from_config(cls, section) -> "MeshConfig":
    return typed_config.from_section(cls, section, "config.mesh")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
  """`config.compile`: the chips `--mode=compile` compiles for.

  topology: a TPU slice by libtpu's name, "<generation>:<shape>" (v5e:4x8, v5p:2x4x4, v4:2x2x4, v6e:4x4);
    compiled on any host, a CPU included, with libtpu installed (the `tpu` extra). Empty: this host's devices.
  num_slices: slices joined over the data-center network (multislice); the mesh spans all of them.
  """
  topology: str = ""
  num_slices: int = 1

  def __post_init__(self):
    if self.num_slices < 1:
      raise ValueError(f"compile.num_slices={self.num_slices} must be >= 1")
    if self.topology and ":" not in self.topology:
      raise ValueError(f"compile.topology={self.topology!r}: expected '<generation>:<shape>', e.g. 'v5e:2x2'")

  @classmethod
  def from_config(cls, section) -> "CompileConfig":
    return typed_config.from_section(cls, section, "config.compile")


# --- training (bigr_jax.train) ---

SCHEDULES = ("constant", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`config.optim` (and a tokenizer's `config.disc_optim`). Defaults: the original generator's AdamW.

  schedule: "constant" (the original generator), "cosine" (to min_lr_ratio * lr at the last step), or
  "step" (x decay_factor at step decay_step, as Binary Latent Diffusion trains the B-AE); any of them
  after `warmup_steps` of linear warmup. grad_clip: global-norm clipping (0: none). warmup_decayed: the warmup
  reaches every tensor (ours); False is the original generator's `train_ddp.py`, whose warmup rewrites the lr of
  its first parameter group only, the undecayed one, so decayed tensors train at the full rate from step 0 (no
  release used a warmup).
  """
  name: str = "adamw"
  lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 2e-2
  grad_clip: float = 1.0
  schedule: str = "constant"
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0
  decay_step: int = 0
  decay_factor: float = 0.1
  grad_accum_steps: int = 1
  warmup_decayed: bool = True

  def __post_init__(self):
    if self.name not in ("adamw", "adam"):
      raise ValueError(f"unknown optimizer {self.name!r}: use 'adamw' or 'adam'")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown lr schedule {self.schedule!r}; expected one of {SCHEDULES}")
    if self.schedule == "step" and self.decay_step < 1:
      raise ValueError("schedule='step' needs decay_step >= 1")
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"optimizer lr={self.lr} must be a finite positive number")
    if self.grad_accum_steps < 1 or self.warmup_steps < 0 or self.grad_clip < 0:
      raise ValueError(f"grad_accum_steps must be >= 1, warmup_steps and grad_clip >= 0: {self}")

  @classmethod
  def from_config(cls, section, where: str = "config.optim") -> "OptimConfig":
    return typed_config.from_section(cls, section, where)


# --- data (bigr_jax.data) ---

ON_BAD_IMAGE_CHOICES = ("raise", "skip")
MIN_IMAGE_SIZE = 16  # px on the shorter side; below it an image counts as bad (data.min_image_size)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """`config.data`: which records a run reads, and how (see `build_source` for each field)."""
  name: str = "digits"
  data_dir: str = ""
  split: str = "train"
  eval_split: str = "validation"  # tokenizer training: the held-out images of its reconstruction grids
  image_size: int = 32
  flip: bool = False
  worker_count: int = 0  # grain worker processes (0: in the main process)
  on_bad_image: str = "raise"
  min_image_size: int = MIN_IMAGE_SIZE
  tfds_name: str = "imagenet2012"
  code_bits: int = 0
  code_grid: int = 16
  allow_partial_codes: bool = False

  def __post_init__(self):
    if self.on_bad_image not in ON_BAD_IMAGE_CHOICES:
      raise ValueError(f"data.on_bad_image={self.on_bad_image!r}; expected one of {ON_BAD_IMAGE_CHOICES}")
    if self.min_image_size < 0 or self.worker_count < 0 or self.image_size < 1:
      raise ValueError(f"data.min_image_size / worker_count must be >= 0 and image_size >= 1: {self}")

  @classmethod
  def from_config(cls, section, **overrides) -> "DataConfig":
    return typed_config.from_section(cls, section, "config.data", **overrides)


# --- sampling and editing (bigr_jax.sampling) ---

MASK_SCHEDULES = ("cosine", "linear")
CFG_SCHEDULES = ("constant", "linear")
GUMBEL_SCHEDULES = ("constant", "down", "up")
ORDERINGS = ("confidence", "entropy", "random")
TOKEN_SAMPLING = ("bernoulli", "threshold")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampling hyper-parameters. Defaults: the release's `script/sample.sh` (cfg 3, 20 iterations, tau 0.01).

  ordering: "confidence" (the original: mean |2p - 1| over bits), "entropy" (minus the mean binary
    entropy of the bits) or "random" (a uniform order, ignoring the model: the baseline the others are measured
    against). token_sampling: "bernoulli" (the original) or "threshold" (p > 0.5).
  transcode_sizes: the still-masked tokens are transcoded in the smallest padded size, a multiple of
    ceil(N / transcode_sizes), that holds them; 1 transcodes every token every iteration, as the original.
  resample_known: when completing given tokens (inpainting, ...), the original's budget: counts for the
    number of *known* tokens, so that once the masked ones run out, known (or decoded) tokens are re-sampled
    (lowest index first among equals); leftovers get one final pass. False (ours): known tokens stay fixed.
    No effect on class-conditional generation, where every token is masked.
  """
  num_iter: int = 20
  cfg_scale: float = 3.0
  cfg_schedule: str = "constant"
  gumbel_temp: float = 0.01
  gumbel_schedule: str = "constant"
  mask_schedule: str = "cosine"
  ordering: str = "confidence"
  token_sampling: str = "bernoulli"
  temperature: float = 1.0
  infer_steps: int = 100
  transcode_sizes: int = 8
  resample_known: bool = False

  def __post_init__(self):
    if self.num_iter < 1:
      raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
    if self.infer_steps < 1:
      raise ValueError(f"infer_steps must be >= 1, got {self.infer_steps}")
    if self.transcode_sizes < 1:
      raise ValueError(f"transcode_sizes must be >= 1, got {self.transcode_sizes}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    for name, value, allowed in (("ordering", self.ordering, ORDERINGS),
                                 ("token_sampling", self.token_sampling, TOKEN_SAMPLING),
                                 ("mask_schedule", self.mask_schedule, MASK_SCHEDULES),
                                 ("cfg_schedule", self.cfg_schedule, CFG_SCHEDULES),
                                 ("gumbel_schedule", self.gumbel_schedule, GUMBEL_SCHEDULES)):
      if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

  @property
  def guidance(self) -> bool:
    """Whether the null half runs: with cfg <= 1 the original's CFG would be a no-op (or crash)."""
    return self.cfg_scale > 1.0

  def replace(self, **changes) -> "SamplerConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, section, where: str = "config.sample") -> "SamplerConfig":
    return typed_config.from_section(cls, section, where)


@dataclasses.dataclass(frozen=True)
class SampleRun:
  """What `--mode=sample` draws, besides the sampler's settings (both live in `config.sample`)."""
  labels: tuple = (207, 360, 387, 974, 88, 979, 417, 279)
  per_class: int = 0  # > 0: every class this many times, in class order (instead of `labels`)
  batch_size: int = 8  # images per sampler call (0: all at once); rounded up to the mesh's batch shards
  seed: int = 0
  use_ema: bool = True  # a training workdir's EMA params (False: the raw params)

  def class_labels(self, num_classes: int) -> np.ndarray:
    if self.per_class > 0:
      return np.repeat(np.arange(num_classes, dtype=np.int32), self.per_class)
    return np.asarray(self.labels, np.int32)


CLONE_CENTERS = ("box", "mean")


EDIT_TASKS = ("inpaint", "outpaint", "edit", "interpolate", "enrich")
MASK_TASKS = ("inpaint", "outpaint", "edit")  # the tasks that read a mask, and can be cloned seamlessly


@dataclasses.dataclass(frozen=True)
class EditConfig:
  """`config.edit`, for `--mode=edit`.

  task: inpaint | outpaint | edit (class edit) | interpolate | enrich. image: the input picture (not for
  interpolate); mask: a PNG, white = regenerate (outpaint: white = keep). sampler: overrides of the task's
  sampler settings, which default to the original apps' (`editing.TASK_SAMPLERS`); unset fields are None.
  seamless_clone: also blend each result into the input with OpenCV's Poisson cloning, as the original's
  apps/inpaint.py does (`images.seamless_clone`): inpaint and edit clone the masked region of the result into
  the input, outpaint the kept region of the input into the result (mask tasks only; the `app` extra).
  clone_center: "box" (ours: the region lands where it was cut) or "mean" (the original's; see
  `images.seamless_clone`).
  """
  task: str = "inpaint"
  image: str = ""
  mask: str = ""
  target_class: int = 0
  class_a: int = 0
  class_b: int = 1
  batch: int = 4
  seed: int = 0
  seamless_clone: bool = False
  clone_center: str = "box"
  sampler: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.task not in EDIT_TASKS:
      raise ValueError(f"unknown edit.task {self.task!r}; expected one of {EDIT_TASKS}")
    if self.clone_center not in CLONE_CENTERS:
      raise ValueError(f"unknown edit.clone_center {self.clone_center!r}; expected one of {CLONE_CENTERS}")
    if self.seamless_clone and self.task not in MASK_TASKS:
      raise ValueError(f"edit.seamless_clone applies to the tasks {MASK_TASKS}, not {self.task!r}")
    unknown = sorted(set(self.sampler) - set(typed_config.field_names(SamplerConfig)))
    if unknown:
      raise ValueError(f"unknown config.edit.sampler field(s) {unknown}; known: "
                       f"{sorted(typed_config.field_names(SamplerConfig))}")

  def check_inputs(self) -> None:
    """The files the task reads are named and exist."""
    if self.task != "interpolate" and not self.image:
      raise ValueError(f"edit.task={self.task!r} needs --config.edit.image=<picture>")
    if self.task in MASK_TASKS and not self.mask:
      raise ValueError(f"edit.task={self.task!r} needs --config.edit.mask=<PNG, white = regenerate>")
    for path in (self.image, self.mask):
      if path and not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"no file {path} (config.edit)")


def edit_section() -> ml_collections.ConfigDict:
  """`config.edit` as config files declare it: sampler fields are typed placeholders (None: the task's own)."""
  section = typed_config.to_section(EditConfig())
  section.sampler = ml_collections.ConfigDict(
      {f.name: ml_collections.config_dict.placeholder(type(f.default))
       for f in dataclasses.fields(SamplerConfig)})
  return section


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """`config.sweep`. grid: {sample field: values}; every combination is one setting (the other fields stay as
  `config.sample` has them). per_class: images of each class per setting. min_images_per_s: the speed budget of
  the best-setting line (0: none)."""
  grid: dict = dataclasses.field(default_factory=dict)
  per_class: int = 10
  min_images_per_s: float = 0.0

  def settings(self) -> list[dict]:
    if not self.grid:
      raise ValueError("config.sweep.grid is empty: give sample fields and their values, e.g. "
                       "--config.sweep.grid.num_iter='(4, 8, 16)'")
    names = list(self.grid)
    values = [v if isinstance(v, (tuple, list)) else (v,) for v in self.grid.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


# --- evaluation (bigr_jax.evaluation) ---

CONDITIONS = ("null", "label")
PR_K = 3
OPTIMIZERS = ("lars", "sgd", "lbfgs")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Probe recipe (MAE linear-probe defaults)."""
  epochs: int = 90
  batch_size: int = 16384
  base_lr: float = 0.1  # lr = base_lr * batch_size / 256
  min_lr: float = 0.0
  warmup_epochs: float = 10.0
  weight_decay: float = 0.0
  momentum: float = 0.9
  trust_coefficient: float = 1e-3
  optimizer: str = "lars"  # lars | sgd (momentum SGD, for comparison) | lbfgs (the convex fit; fields below)
  bn_eps: float = 1e-6
  bn_momentum: float = 0.1  # torch convention: new = (1 - m) * old + m * batch
  init_std: float = 0.01
  eval_batch_size: int = 16384
  seed: int = 0
  # lbfgs only: the L2 penalties (on the mean loss) to choose from, the held-out share of the training split
  # that chooses, and when a fit stops.
  l2_grid: tuple = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
  val_fraction: float = 0.2
  max_iter: int = 5000
  tol: float = 1e-5

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"probe optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
    if min(self.epochs, self.batch_size, self.eval_batch_size, self.max_iter) < 1:
      raise ValueError(f"probe epochs / batch sizes / max_iter must be positive: {self}")
    if not self.l2_grid or min(self.l2_grid) < 0 or not 0 < self.val_fraction < 1:
      raise ValueError(f"probe l2_grid must be non-empty and >= 0, val_fraction in (0, 1): {self}")

  @property
  def lr(self) -> float:
    return self.base_lr * self.batch_size / 256


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """`config.evaluation`: every field the entry points read (see the module docstring)."""
  layers: tuple = ()
  condition: str = "null"
  batch_size: int = 256
  splits: tuple = ("train", "validation")
  features_dir: str = ""
  batches_per_chunk: int = 50
  params: str = ""
  use_ema: bool = True
  probe: ProbeConfig = ProbeConfig()
  sample_batch: str = ""
  reference_batch: str = ""
  reference_stats: str = "recompute"
  inception_weights: str = ""
  num_samples: int = 0
  pr_k: int = PR_K
  distance_dtype: str = "float32"

  def __post_init__(self):
    if self.condition not in CONDITIONS:
      raise ValueError(f"evaluation.condition={self.condition!r}; expected one of {CONDITIONS}")
    if self.reference_stats not in ("recompute", "file"):
      raise ValueError(f"evaluation.reference_stats={self.reference_stats!r}; expected 'recompute' or 'file'")
    if self.distance_dtype not in ("float32", "float16"):
      raise ValueError(f"evaluation.distance_dtype={self.distance_dtype!r}; expected 'float32' or 'float16'")

  @classmethod
  def from_config(cls, section) -> "EvaluationConfig":
    return typed_config.from_section(cls, section, "config.evaluation")
