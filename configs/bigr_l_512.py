"""BiGR-L at 512 px (373M): 32x32 tokens of 32 bits, transcoder 6 x 1280.

Arguments: `bits=24|32` (B-AE code width), `runlocal` (a tiny model on synthetic codes, for a CPU).
Example: python -m bigr_jax.main --config=configs/bigr_l_512.py:bits=24 --workdir=/mnt/bucket/bigr_l_512
"""

from bigr_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, bits=32, runlocal=False)
  c = config_lib.base_generator_config()
  c.model = config_lib.generator_model("L-512", arg.bits, dtype="bfloat16", remat_policy="none")
  c.batch_size = 512
  c.data.image_size = 512
  c.sample.num_iter = 20
  c.sample.gumbel_temp = 0.01
  if arg.runlocal:
    config_lib.shrink_for_cpu(c)
  return c
