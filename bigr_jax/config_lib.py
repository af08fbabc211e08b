"""Shared pieces of the config files in configs/ (big_vision style `get_config(arg)`).

Every section a run reads is declared here from its typed config (`bigr_jax.typed_config`), so the
defaults live in the dataclasses alone and every field can be overridden on the command line.
"""

import math
from typing import Optional

import ml_collections

from bigr_jax import config_sections, typed_config
from bigr_jax.models.config import MODEL_SIZES, GeneratorConfig, TokenizerConfig


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,flag' config arguments against typed defaults; a bare name sets a bool to True."""
  out = ml_collections.ConfigDict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def apply_tpu_variant(c: ml_collections.ConfigDict, name: str, variants: dict) -> None:
  """`tpu=<name>`: a config's settings for one TPU generation, as `--mode=compile` showed them to fit.
  `variants`: name -> {"model": {...}, "mesh": {...}} updates; an empty name keeps the config as shipped."""
  if not name:
    return
  if name not in variants:
    raise ValueError(f"tpu={name!r}: the variants are {', '.join('tpu=' + v for v in variants)} (or none)")
  for section, fields in variants[name].items():
    c[section].update(fields)


def generator_model(size: str, bits: int, **overrides) -> ml_collections.ConfigDict:
  """The original's model of that size (L, XL, XXL, L-512) with the released flags, as a ConfigDict."""
  if size not in MODEL_SIZES:
    raise ValueError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
  return typed_config.to_section(GeneratorConfig(binary_size=bits, **MODEL_SIZES[size], **overrides))


POSITIVE_FIELDS = ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "peer_timeout_s")
NON_NEGATIVE_FIELDS = ("total_steps", "num_epochs", "resume_step")
# A multi-process job ends when a process sends no heartbeat for this long (bigr_jax.supervisor); a few minutes
# outlast a slow checkpoint save or compile, which still send heartbeats, and bound a hung host's wait.
PEER_TIMEOUT_S = 300.0


def check_training_fields(c: ml_collections.ConfigDict) -> None:
  """The loop's counts and the optimizers, before any work: a count below its bound, or a learning rate that is
  not a finite positive number, is one error naming the field (not a ZeroDivisionError or a NaN loss later)."""
  for name in POSITIVE_FIELDS + NON_NEGATIVE_FIELDS:
    value = c.get(name, None)
    low = 1 if name in POSITIVE_FIELDS else 0
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
      raise ValueError(f"{name}={value} must be {'at least 1' if low else 'a non-negative number'}")
  for section in ("optim", "disc_optim"):
    if section in c:
      config_sections.OptimConfig.from_config(c[section], f"config.{section}")


def _training_fields(c: ml_collections.ConfigDict, family: str) -> None:
  """Fields both trainers read (the loop's), with their defaults."""
  c.family = family
  c.mode = "train"
  c.seed = 0
  c.total_steps = 0  # 0: derived from num_epochs and the dataset size
  c.num_epochs = 0.0
  c.mesh = typed_config.to_section(config_sections.MeshConfig())
  c.compile = typed_config.to_section(config_sections.CompileConfig())  # --mode=compile: the chips to compile for
  c.logical_axis_rules = ()  # empty: bigr_jax.parallel.DEFAULT_RULES
  c.init_from = ""
  c.resume_step = 0  # 0: the newest checkpoint that restores; N: that step (later ones are set aside)
  c.log_every = 100
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.tensorboard = True
  c.peak_flops_per_device = 0.0  # bf16 FLOP/s of one chip for MFU; 0: from the device kind (bigr_jax.chips)
  c.peer_timeout_s = PEER_TIMEOUT_S


def base_generator_config() -> ml_collections.ConfigDict:
  """Training settings of the original (AdamW 0.9/0.95, lr 1e-4 constant, wd 2e-2, clip 1, EMA 0.9999), and
  every field that sampling, editing and evaluation read."""
  c = ml_collections.ConfigDict()
  _training_fields(c, "generator")
  c.batch_size = 1024
  c.num_epochs = 400.0
  c.optim = typed_config.to_section(config_sections.OptimConfig())
  c.ema_decay = 0.9999
  c.data = typed_config.to_section(config_sections.DataConfig(name="codes", image_size=256, flip=True, worker_count=4))
  # The B-AE that decodes samples: `config` a bae_* config file (or `model`, its model fields inline), and
  # `checkpoint` a released .th file, a converted params directory or a tokenizer workdir.
  c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", config=""))
  c.sample = typed_config.to_section(config_sections.SamplerConfig(cfg_scale=2.5, gumbel_temp=0.17),
                                     config_sections.SampleRun())
  del c.sample["resample_known"]  # editing only: config.edit.sampler.resample_known
  c.edit = config_sections.edit_section()
  c.evaluation = typed_config.to_section(config_sections.EvaluationConfig())
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`:runlocal`: the same model family at a size a 2-core CPU trains in seconds."""
  c.model.update(dim=64, n_layer=2, n_head=4, denoise_hidden_dim=64, num_block_mlp=2, block_size=16, seq_len=16,
                 num_classes=10, scan_layers=True, dtype="float32", remat_policy="none")
  c.batch_size = 8
  c.optim.lr = 1e-3
  c.total_steps = 20
  c.log_every = 5
  c.checkpoint_every = 10
  c.data.name = "synthetic"
  c.data.worker_count = 0
  c.sample.update(labels=(0, 1, 2, 3), num_iter=4, batch_size=4)
  return c


BLD_PER_GPU_BATCH, BLD_GPUS = 3, 8  # Binary Latent Diffusion's B-AE recipe: 3 images on each of 8 GPUs


def base_tokenizer_config(bits: int, image_size: int, total_steps: int, arg=None,
                          tpu_variants: Optional[dict] = None) -> ml_collections.ConfigDict:
  """A B-AE config: the original's architecture and Binary Latent Diffusion's recipe as far as it is known.

  Arguments: `runlocal` (a tiny autoencoder on the embedded digits, for a CPU), `quantizer=binary|lfq`
  (lfq is our own variant), `chips=N` (BLD's 3 images per GPU on N chips: batch 3N, default 8, i.e. 24; BLD's
  learning rate is set by the per-GPU batch, so it is unchanged), and `tpu=<name>` where the config has
  `tpu_variants` (as `apply_tpu_variant`). BiGR's exact B-AE batch and schedule were not released.
  """
  arg = parse_arg(arg, runlocal=False, quantizer="binary", chips=BLD_GPUS, **({"tpu": ""} if tpu_variants else {}))
  if arg.chips < 1:
    raise ValueError(f"chips={arg.chips}: the number of chips the batch of {BLD_PER_GPU_BATCH} per chip spans, at "
                     "least 1")
  c = ml_collections.ConfigDict()
  _training_fields(c, "tokenizer")
  c.model = typed_config.to_section(TokenizerConfig(codebook_size=bits, img_size=image_size, quantizer=arg.quantizer,
                                                    dtype="bfloat16"))
  c.batch_size = BLD_PER_GPU_BATCH * arg.chips
  c.total_steps = total_steps
  lr = 4.5e-6 * BLD_PER_GPU_BATCH  # BLD's rule, by the per-GPU batch; x0.1 at 1.5M
  c.optim = typed_config.to_section(config_sections.OptimConfig(
      name="adam", lr=lr, b1=0.9, b2=0.999, grad_clip=0.0, schedule="step", decay_step=1_500_000))
  c.disc_optim = typed_config.to_section(config_sections.OptimConfig(name="adam", lr=lr, b1=0.9, b2=0.999, grad_clip=0.0))
  c.ema_decay = 0.995
  c.ema_every = 10
  c.loss = ml_collections.ConfigDict(dict(
      perceptual_weight=1.0, disc_weight_max=1.0, disc_start_step=30001, code_weight=0.0, entropy_weight=0.0))
  c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3))
  c.lpips = ml_collections.ConfigDict(dict(vgg_path="", lin_path="", random_init=False))
  c.data = typed_config.to_section(config_sections.DataConfig(name="imagenet", image_size=image_size, flip=True,
                                                       worker_count=4))
  c.tokenizer = ml_collections.ConfigDict(dict(checkpoint=""))  # for --mode=encode: weights to encode with
  c.encode_batch_size = 64
  c.encode_flipped = True
  if tpu_variants:
    apply_tpu_variant(c, arg.tpu, tpu_variants)
  if arg.runlocal:
    if arg.chips != BLD_GPUS:
      raise ValueError(f"chips={arg.chips} sets the full-size B-AE's batch; runlocal has its own (8)")
    # 3 downsamplings of the digits at 32 px (64 px for the 512 model): attention at the last level.
    local_size = 32 * image_size // 256
    c.model.update(img_size=local_size, nf=32, ch_mult=(1, 1, 2, 2), res_blocks=1, attn_resolutions=(4,),
                   emb_dim=32, dtype="float32")
    c.batch_size = 8
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.loss.update(disc_start_step=10, perceptual_weight=0.0)
    c.optim.lr = c.disc_optim.lr = 1e-3
    c.disc.ndf = 16
    c.data.update(name="digits", split="train", eval_split="test", image_size=local_size, flip=False,
                  worker_count=0)
    c.encode_batch_size = 64
  return c
