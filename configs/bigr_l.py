"""BiGR-L (336M): 24 layers, width 1024, transcoder 3 x 1024. Paper: batch 1024, 400 epochs, 20 iterations, gumbel 0.17.

Arguments: `bits=24|32` (B-AE code width), `runlocal` (a tiny model on synthetic codes, for a CPU), `tpu=v5e`
(16 GiB chips: full remat and splash attention; `--mode=compile` on v5e-32 at batch 1024: 8.6 GiB per chip, where
the default, no remat, needs 28 GiB of temporaries), `tpu=v6e` (32 GiB chips: "dots" remat, splash attention,
state sharded over every chip; `tpu=v4` is the same, for v4's 32 GiB chips; the README's TPU section has their
figures).
Example: python -m bigr_jax.main --config=configs/bigr_l.py:bits=24 --workdir=/mnt/bucket/bigr_l
"""

from bigr_jax import config_lib

TPU_VARIANTS = {
    "v5e": {"model": {"remat_policy": "full", "attention": "splash"}},
    "v6e": {"model": {"remat_policy": "dots", "attention": "splash"}, "mesh": {"data": 1, "fsdp": -1}},
}
TPU_VARIANTS["v4"] = TPU_VARIANTS["v6e"]  # 32 GiB chips as well: compiled to fit v4-32


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, bits=24, runlocal=False, tpu="")
  c = config_lib.base_generator_config()
  c.model = config_lib.generator_model("L", arg.bits, dtype="bfloat16", remat_policy="none")
  c.batch_size = 1024
  c.data.image_size = 256
  c.sample.num_iter = 20
  c.sample.gumbel_temp = 0.17
  config_lib.apply_tpu_variant(c, arg.tpu, TPU_VARIANTS)
  if arg.runlocal:
    config_lib.shrink_for_cpu(c)
  return c
