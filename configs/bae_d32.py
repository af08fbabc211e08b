"""B-AE d32: the released 32-bit binary tokenizer at 256 px (65.5M params, 16x16 tokens of 32 bits).

Training recipe of Binary Latent Diffusion as far as the original shows it: L1 + LPIPS + hinge GAN with an
adaptive weight, Adam, EMA 0.995 every 10 steps (BiGR's exact B-AE schedule was not released).
Arguments: `runlocal` (a tiny autoencoder for a CPU), `quantizer=binary|lfq` (lfq: our own variant).
Example: python -m bigr_jax.main --config=configs/bae_d32.py --workdir=gs://bucket/bae_d32
"""

import dataclasses

import ml_collections

from bigr_jax import config_lib
from bigr_jax.models.tokenizer import TokenizerConfig

BITS, IMAGE_SIZE = 32, 256


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, quantizer="binary")
  c = ml_collections.ConfigDict()
  c.family = "tokenizer"
  c.mode = "train"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dataclasses.asdict(TokenizerConfig(
      codebook_size=BITS, img_size=IMAGE_SIZE, quantizer=arg.quantizer, dtype="bfloat16")))
  c.batch_size = 24  # BiGR's B-AE batch is unknown; BLD runs 3 per GPU (here 8 x 3)
  c.total_steps = 950_000  # the released d32 file is the EMA at step 950k
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=4.5e-6 * 3, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0, decay_step=1_500_000,
      decay_factor=0.1))  # BLD: lr = 4.5e-6 x per-GPU batch (3); x0.1 at 1.5M
  c.disc_optim = ml_collections.ConfigDict(dict(name="adam", lr=4.5e-6 * 3, b1=0.9, b2=0.999, eps=1e-8))
  c.ema_decay = 0.995
  c.ema_every = 10
  c.loss = ml_collections.ConfigDict(dict(
      perceptual_weight=1.0, disc_weight_max=1.0, disc_start_step=30001, code_weight=0.0, entropy_weight=0.0))
  c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3, diff_aug=""))
  c.lpips = ml_collections.ConfigDict(dict(vgg_path="", lin_path=""))  # torchvision vgg16 + lpips vgg.pth
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
  c.logical_axis_rules = ()  # empty: bigr_jax.parallel.DEFAULT_RULES
  c.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir="", split="train", image_size=IMAGE_SIZE, flip=True, worker_count=4,
      on_bad_image="raise", min_image_size=0))
  c.init_from = ""  # e.g. a released binaryae_ema_*.th
  c.log_every = 100
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.tensorboard = True
  if arg.runlocal:
    # 32 px through 3 downsamplings: a 4x4 grid of 32-bit tokens, attention at the last level.
    c.model.update(img_size=32, nf=32, ch_mult=(1, 1, 2, 2), res_blocks=1, attn_resolutions=(4,), emb_dim=32,
                   dtype="float32")
    c.batch_size = 4
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.loss.disc_start_step = 10
    c.disc.ndf = 16
    c.data.update(name="synthetic", image_size=32, worker_count=0)
  return c
