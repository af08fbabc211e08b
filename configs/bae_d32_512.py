"""B-AE d32-512: the released 32-bit binary tokenizer at 512 px (61.3M params, 32x32 tokens of 32 bits).

Attention sits at the nominal resolution 16, which no level of a 512 px model reaches: only the mid blocks
of encoder and decoder attend. The released file is the EMA at step 720k.

Arguments: `runlocal` (a tiny autoencoder on the embedded digits), `quantizer=binary|lfq` (lfq: our own variant),
`chips=N` (batch 3 per chip on N chips, BLD's 3 per GPU; default 8, batch 24; for the 16- and 32-chip slices of
the README's TPU section).
Example: python -m bigr_jax.main --config=configs/bae_d32_512.py --workdir=/mnt/bucket/bae_d32_512
"""

from bigr_jax import config_lib


def get_config(arg=None):
  return config_lib.base_tokenizer_config(bits=32, image_size=512, total_steps=720_000, arg=arg)
