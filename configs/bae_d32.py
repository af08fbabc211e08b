"""B-AE d32: the released 32-bit binary tokenizer at 256 px (65.5M params, 16x16 tokens of 32 bits).

The released file is the EMA at step 950k.

Arguments: `runlocal` (a tiny autoencoder on the embedded digits), `quantizer=binary|lfq` (lfq: our own variant),
`chips=N` (batch 3 per chip on N chips, BLD's 3 per GPU; default 8, batch 24; for the 16- and 32-chip slices of
the README's TPU section).
Example: python -m bigr_jax.main --config=configs/bae_d32.py --workdir=/mnt/bucket/bae_d32
"""

from bigr_jax import config_lib


def get_config(arg=None):
  return config_lib.base_tokenizer_config(bits=32, image_size=256, total_steps=950_000, arg=arg)
