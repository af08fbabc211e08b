"""BiGR-L at 512 px (373M): 32x32 tokens of 32 bits, transcoder 6 x 1280.

Arguments: `bits=24|32` (B-AE code width), `runlocal` (a tiny model on synthetic codes, for a CPU), `tpu=v5e`
(16 GiB chips: full remat and splash attention; as shipped it needs 77 GiB of temporaries on v5e-32 at batch
512; `tpu=v4` and `tpu=v6e`, for their 32 GiB chips, are the same), `tpu=v5p` (95 GiB chips: "dots" remat and
splash attention, 41 GiB per chip on v5p-32). The README's TPU section has the variants' figures.
Example: python -m bigr_jax.main --config=configs/bigr_l_512.py:bits=24 --workdir=/mnt/bucket/bigr_l_512
"""

from bigr_jax import config_lib

TPU_VARIANTS = {"v5e": {"model": {"remat_policy": "full", "attention": "splash"}},
                "v5p": {"model": {"remat_policy": "dots", "attention": "splash"}}}
TPU_VARIANTS["v4"] = TPU_VARIANTS["v6e"] = TPU_VARIANTS["v5e"]  # compiled to fit v4-32 and v6e-16 at 32 per chip


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, bits=32, runlocal=False, tpu="")
  c = config_lib.base_generator_config()
  c.model = config_lib.generator_model("L-512", arg.bits, dtype="bfloat16", remat_policy="none")
  c.batch_size = 512
  c.data.image_size = 512
  c.sample.num_iter = 20
  c.sample.gumbel_temp = 0.01
  config_lib.apply_tpu_variant(c, arg.tpu, TPU_VARIANTS)
  if arg.runlocal:
    config_lib.shrink_for_cpu(c)
  return c
