"""The embedded default: BiGR end to end on scikit-learn's handwritten digits, sized for a 2-core CPU.

Trains a tiny B-AE on the digits (16 px, 4x4 tokens of 16 bits), extracts the codes of the training and the
held-out digits, trains a tiny BiGR generator on them, samples every class and scores the samples with a
classifier trained on real digits. Everything lands in the workdir: tokenizer/, generator/, samples.png,
samples.npz, demo.json. Then every other mode runs on that workdir (see bigr_jax/families/demo.py):
  python -m bigr_jax.main --config=configs/demo.py --workdir=workdir/demo --mode=sample|edit|features|evaluate
The tokenizer's settings are `--config.tokenizer.*`, the generator's (and its sampler's, `generator.sample.*`)
`--config.generator.*`.
Arguments: `quick` (200 B-AE and 600 generator steps, for tests).
"""

import ml_collections

from bigr_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  c = ml_collections.ConfigDict()
  c.family = "demo"
  c.mode = "demo"
  c.peer_timeout_s = config_lib.PEER_TIMEOUT_S  # on several processes: see bigr_jax/supervisor.py

  tok = config_lib.base_tokenizer_config(bits=16, image_size=256, total_steps=0, arg="runlocal")
  tok.total_steps = 600
  # The digits are 8x8 scans: 16 px through 2 downsamplings keeps them whole, at a quarter of 32 px's cost.
  tok.model.update(img_size=16, nf=32, ch_mult=(1, 2, 2), res_blocks=1, attn_resolutions=(4,), emb_dim=32)
  tok.data.image_size = 16
  tok.batch_size = 32
  tok.log_every = 200
  tok.checkpoint_every = 300
  tok.optim.lr = 2e-3
  tok.ema_decay, tok.ema_every = 0.99, 1  # the release's 0.995 every 10 steps would lag a 600-step run
  tok.loss.disc_start_step = 10**9  # L1 only: a GAN needs far longer than a demo
  tok.model.deterministic = True  # thresholded bits: a tiny B-AE converges faster than with sampled ones
  tok.model.grayscale = True  # the digits are grey: so are reconstructions and samples
  c.tokenizer = tok

  gen = config_lib.base_generator_config()
  gen.model = config_lib.generator_model("L", bits=16)
  config_lib.shrink_for_cpu(gen)
  gen.model.update(binary_size=16, dim=128, n_layer=4, n_head=4, denoise_hidden_dim=128, num_block_mlp=2,
                   block_size=16, seq_len=16, num_classes=10, scan_layers=False)  # 4 blocks: unrolled is faster
  gen.batch_size = 32
  gen.total_steps = 3000
  gen.log_every = 250
  gen.checkpoint_every = 1000
  gen.optim.lr = 2e-3
  gen.ema_decay = 0.999
  gen.data.update(name="codes", split="train", flip=False, worker_count=0)  # data_dir: the workdir's codes
  # The demo's own B-AE decodes; its checkpoint is the workdir's tokenizer/ unless set.
  gen.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", config="", model=tok.model))
  # Chosen by sweeps on the demo's workdir (docs/quality.md): guidance rising linearly to 2.0 over 8 iterations
  # makes the digits recognisable (99%) at the lowest FD (1.2x the floor's).
  gen.sample.update(per_class=10, batch_size=0, num_iter=8, cfg_scale=2.0, cfg_schedule="linear", gumbel_temp=1.0,
                    infer_steps=100)
  # --mode=sweep: every combination, 10 samples of each class per setting (bigr_jax/sampling/sweep.py).
  gen.sweep = ml_collections.ConfigDict(dict(
      grid=dict(num_iter=(4, 8, 20), cfg_scale=(1.0, 2.5, 4.0), gumbel_temp=(0.0, 0.17, 1.0), infer_steps=(20, 100),
                ordering=("confidence",)),  # e.g. --config.generator.sweep.grid.ordering='("confidence", "random")'
      per_class=10, min_images_per_s=50.0))
  # --mode=features: every block, probed by the convex fit (MAE's LARS recipe needs ImageNet's thousands of steps).
  gen.evaluation.update(splits=("train", "test"), batch_size=64, layers=tuple(range(gen.model.n_layer)))
  gen.evaluation.probe.update(optimizer="lbfgs")
  c.generator = gen

  if arg.quick:  # about 2 minutes on 2 cores; its samples are still mostly recognisable
    tok.total_steps, tok.log_every, tok.checkpoint_every = 200, 100, 200
    gen.total_steps, gen.log_every, gen.checkpoint_every = 600, 200, 600
    gen.ema_decay = 0.95
    # 50 samples: enough that a class accuracy above chance is not luck.
    gen.sample.update(per_class=5, num_iter=4, cfg_scale=2.0, cfg_schedule="constant", gumbel_temp=0.0,
                      infer_steps=20)
    gen.sweep.update(grid=dict(num_iter=(2, 4), cfg_scale=(2.5,), gumbel_temp=(0.0,), infer_steps=(20,),
                               ordering=("confidence",)), per_class=2)
  return c
