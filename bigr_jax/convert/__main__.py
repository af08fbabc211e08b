"""Weights between the original PyTorch release and bigr_jax, both ways.

  python -m bigr_jax.convert from-torch --config=configs/bigr_l.py:bits=24 --input=bigr_L_d24.pt --output=DIR
  python -m bigr_jax.convert to-torch --config=configs/bigr_l.py:bits=24 --input=DIR --output=bigr_L_d24.pt

`from-torch` reads a released checkpoint (a dict with "ema"), a plain state_dict, .npz or .safetensors and
writes a params-only orbax checkpoint (use it with --config.init_from=DIR, or for sampling). `to-torch` reads
such a directory, or a training workdir (its latest EMA params), and writes {"ema": state_dict} (.pt) that
the original `load_bigr` loads, or .safetensors / .npz; aliases and scheduler buffers are included.
"""

import argparse
import sys

import numpy as np


def _generator_config(spec):
  from bigr_jax import config_lib
  from bigr_jax.models.config import GeneratorConfig
  return GeneratorConfig(**config_lib.load_config_file(spec).model.to_dict())


def from_torch(args) -> None:
  from bigr_jax.convert import generator_weights, io, params_io
  config = _generator_config(args.config)
  state_dict = io.read_state_dict(args.input, key=args.key)
  params = generator_weights.torch_to_flax(state_dict, config)  # validates before anything is written
  out = params_io.save_params(params, args.output)
  print(f"wrote {out} ({len(state_dict)} tensors read)")


def to_torch(args) -> None:
  import pathlib
  from bigr_jax.convert import generator_weights, io, params_io
  config = _generator_config(args.config)
  source = pathlib.Path(args.input)
  if (source / "checkpoints").exists():
    params = params_io.train_state_params(source, use_ema=not args.raw_params)
  else:
    params = params_io.load_params(source)
  state_dict = generator_weights.flax_to_torch(params, config)
  generator_weights.validate(state_dict, config)
  out = io.write_state_dict(state_dict, args.output, wrap_key="ema", aliases=generator_weights.aliases(state_dict))
  print(f"wrote {out} ({len(state_dict)} entries)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m bigr_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-torch", help="original generator weights -> orbax params")
  p.add_argument("--config", required=True, help="config file with :args, e.g. configs/bigr_l.py:bits=24")
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True)
  p.add_argument("--key", default=None, help="entry of a torch dict to read (default: 'ema' when present)")
  p.set_defaults(func=from_torch)
  p = sub.add_parser("to-torch", help="orbax params or a training workdir -> original weights")
  p.add_argument("--config", required=True)
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True, help=".pt/.pth, .safetensors or .npz")
  p.add_argument("--raw-params", action="store_true", help="export the raw params of a workdir, not the EMA")
  p.set_defaults(func=to_torch)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
