"""B-AE d32-512: the released 32-bit binary tokenizer at 512 px (61.3M params, 32x32 tokens of 32 bits).

Attention sits at the nominal resolution 16, which no level of a 512 px model reaches: only the mid blocks
of encoder and decoder attend. The released file is the EMA at step 720k.

Arguments: `runlocal` (a tiny autoencoder on the embedded digits), `quantizer=binary|lfq` (lfq: our own variant),
`chips=N` (batch 3 per chip on N chips, BLD's 3 per GPU; default 8, batch 24; for the 16- and 32-chip slices of
the README's TPU section), `tpu=v5e|v4|v6e` (16 and 32 GiB chips: `model.remat`, the same gradients; at 3 per
chip it needs 35 GiB per chip without it on v5p-32, and with it 12.6 GiB on v5e-32 with `chips=32`, 12.7 and
12.0 GiB on v4-32 and v6e-16 with `chips=16`).
Example: python -m bigr_jax.main --config=configs/bae_d32_512.py --workdir=/mnt/bucket/bae_d32_512
"""

from bigr_jax import config_lib

TPU_VARIANTS = dict.fromkeys(("v5e", "v4", "v6e"), {"model": {"remat": True}})


def get_config(arg=None):
  return config_lib.base_tokenizer_config(bits=32, image_size=512, total_steps=720_000, arg=arg,
                                          tpu_variants=TPU_VARIANTS)
