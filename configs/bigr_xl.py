"""BiGR-XL (799M): 36 layers, width 1280, transcoder 6 x 1280. Paper: batch 512, 400 epochs, 25 iterations, gumbel 0.25.

Arguments: `bits=24|32` (B-AE code width), `runlocal` (a tiny model on synthetic codes, for a CPU), `tpu=v5e`
(16 GiB chips: full remat, params, EMA and optimizer state sharded over every chip; as shipped
it needs 36 GiB of temporaries on v5e-32 at batch 512), `tpu=v6e` (the same settings, as compiled to fit v6e-16
at batch 512; "dots" remat there raises the HBM-traffic bound 13%), `tpu=v4|v5p` ("dots" remat, state over every
chip: 24 GiB on v4-32 and v5p-32, 6% and 4% below full remat's HBM-traffic bound). The README's TPU section has
the variants' figures.
Example: python -m bigr_jax.main --config=configs/bigr_xl.py:bits=24 --workdir=/mnt/bucket/bigr_xl
"""

from bigr_jax import config_lib

# XLA attention: with splash the compiled step's HBM-traffic bound is 2.6% higher (README, TPU section).
FSDP_OVER_EVERY_CHIP = {"data": 1, "fsdp": -1}
TPU_VARIANTS = {**dict.fromkeys(("v5e", "v6e"), {"model": {"remat_policy": "full"}, "mesh": FSDP_OVER_EVERY_CHIP}),
                **dict.fromkeys(("v4", "v5p"), {"model": {"remat_policy": "dots"}, "mesh": FSDP_OVER_EVERY_CHIP})}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, bits=24, runlocal=False, tpu="")
  c = config_lib.base_generator_config()
  c.model = config_lib.generator_model("XL", arg.bits, dtype="bfloat16", remat_policy="none")
  c.batch_size = 512
  c.data.image_size = 256
  c.sample.num_iter = 25
  c.sample.gumbel_temp = 0.25
  config_lib.apply_tpu_variant(c, arg.tpu, TPU_VARIANTS)
  if arg.runlocal:
    config_lib.shrink_for_cpu(c)
  return c
