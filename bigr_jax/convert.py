"""Weights between the original PyTorch release and bigr_jax, both ways, for generators and the B-AE tokenizer.

  python -m bigr_jax.convert from-torch --config=configs/bigr_l.py:bits=24 --input=bigr_L_d24.pt --output=DIR
  python -m bigr_jax.convert from-torch --config=configs/bigr_l.py:bits=24 \
      --input=hf://haoosz/BiGR/gpt/bigr_L_d24.pt --output=DIR
  python -m bigr_jax.convert to-torch --config=configs/bigr_l.py:bits=24 --input=DIR --output=bigr_L_d24.pt

  python -m bigr_jax.convert from-torch --config=configs/bae_d24.py --input=binaryae_ema_1000000.th --output=DIR \
      [--disc-output=DISC_DIR]
  python -m bigr_jax.convert to-torch --config=configs/bae_d24.py --input=DIR [--disc-input=DISC_DIR] \
      --output=binaryae.th
  python -m bigr_jax.convert to-torch --config=configs/bae_d24.py --input=WORKDIR [--raw-params] --output=binaryae.th

The config's `family` field picks the model: "generator" or "tokenizer" (the B-AE). Its fields take the same
`--config.field=value` overrides as `bigr_jax.main` (e.g. `--config.model.dim=768`). `--input` also takes a file on
the Hugging Face hub by name, `hf://<owner>/<repo>/<path>[@revision]` (`bigr_jax.hub`).

Generators: `from-torch` reads a released checkpoint (a dict with "ema"), a plain state_dict, .npz or
.safetensors and writes a params-only orbax checkpoint (use it with --config.init_from=DIR, or for sampling).
`to-torch` reads such a directory, or a training workdir (its latest EMA params), and writes {"ema": state_dict}
(.pt) that the original `load_bigr` loads, or .safetensors / .npz; aliases and scheduler buffers are included.

Tokenizer (B-AE): `from-torch` reads a released `binaryae_ema_*.th` (the whole `BinaryGAN` state dict: `ae.*`,
`disc.*`, `perceptual.*`), a bare or `ae.`-prefixed state dict, .npz or .safetensors, and writes the B-AE params
alone to --output: the plain params tree that `artifacts.tokenizer_params` (--config.init_from, --mode=encode's
tokenizer.checkpoint) reads. The other groups are not part of that directory:
  * `disc.*` (the PatchGAN, sized by the config's disc.ndf / disc.n_layers) is converted only with
    --disc-output=DISC_DIR, into a second params-only directory {"params", "batch_stats"}; nothing in training
    reads it (a tokenizer run starts its discriminator afresh), it is there for inspection and round trips.
  * `perceptual.*` (LPIPS) is never converted: the released file can itself serve as --config.lpips.vgg_path,
    since the LPIPS reader takes the `perceptual.*` group of such a file.
The printed line says which groups the input held and what became of them.
`to-torch` reads a params directory (plus, with --disc-input, a discriminator directory from --disc-output), or
a tokenizer training workdir (its latest EMA params, or the raw ones with --raw-params, and always its
discriminator: `disc_params` and `disc_stats`), and writes a flat {`ae.*`, `disc.*`} state dict, the layout of
the released files without `perceptual.*`; the original's `load_pretrain` keeps exactly the `ae.*` keys.
BatchNorm step counters (`num_batches_tracked`) are written as 0.

`to-torch` refuses an existing output file unless given --overwrite; `from-torch` never writes into an existing
directory.
"""

import argparse
import pathlib
import sys

from bigr_jax import artifacts, hub, typed_config
from bigr_jax.weights import generator_weights, io, params_io, tokenizer_weights
from bigr_jax.models.config import GeneratorConfig, TokenizerConfig

FAMILIES = ("generator", "tokenizer")


def _load_config(args):
  """(family, the loaded ml_collections config with the --config.* overrides)."""
  config = typed_config.load_config_file(args.config, args.overrides)
  family = config.get("family", None)
  if family not in FAMILIES:
    raise ValueError(f"{args.config} is a config of family {family!r}; converting needs a generator or tokenizer "
                     "config (for the demo's models: configs/demo.py's generator or tokenizer settings)")
  return family, config


def _model_config(family, config):
  return (TokenizerConfig if family == "tokenizer" else GeneratorConfig).from_config(config.model)


def _disc_shape(config, model_config) -> dict:
  return dict(in_channels=model_config.n_channels, ndf=config.disc.ndf, n_layers=config.disc.n_layers)


def _refuse_disc_flags(args, family):
  for flag in ("disc_output", "disc_input"):
    if getattr(args, flag, None):
      raise ValueError(f"--{flag.replace('_', '-')} applies to tokenizer configs only, not to a {family} config")


# --- from-torch ----------------------------------------------------------------------------------------


def from_torch(args) -> None:
  family, config = _load_config(args)
  model_config = _model_config(family, config)
  if family == "tokenizer":
    return _tokenizer_from_torch(args, config, model_config)
  _refuse_disc_flags(args, family)
  state_dict = io.read_state_dict(hub.local_path(args.input, model_config), key=args.key)
  params = generator_weights.torch_to_flax(state_dict, model_config)  # validates before anything is written
  out = params_io.save_params(params, args.output)
  print(f"wrote {out} ({len(state_dict)} tensors read)")


def _tokenizer_from_torch(args, config, model_config) -> None:
  output = pathlib.Path(args.output).absolute()
  disc_output = pathlib.Path(args.disc_output).absolute() if args.disc_output else None
  for path in (output, disc_output):
    if path is not None and path.exists():
      raise FileExistsError(f"{path} exists; choose a new output directory")
  if disc_output is not None and (disc_output == output or output in disc_output.parents
                                  or disc_output in output.parents):
    raise ValueError(f"--disc-output={disc_output} must lie outside --output={output} (and vice versa)")
  state_dict = io.read_state_dict(hub.local_path(args.input, model_config), key=args.key)
  groups = tokenizer_weights.split_checkpoint(state_dict)
  # Everything is converted (and so validated) before anything is written.
  params = tokenizer_weights.torch_to_flax(state_dict, model_config)
  disc = None
  if disc_output is not None:
    if not groups["disc"]:
      raise ValueError(f"--disc-output: {args.input} holds no disc.* entries")
    disc = tokenizer_weights.discriminator_torch_to_flax(state_dict, **_disc_shape(config, model_config))
  out = params_io.save_params(params, output)
  n_ae = len(groups["ae"]) or len(groups[""])
  notes = [f"B-AE: {n_ae} of {len(state_dict)} tensors read"]
  if disc is not None:
    notes.append(f"disc.*: {len(groups['disc'])} tensors -> {params_io.save_params(disc, disc_output)}")
  elif groups["disc"]:
    notes.append(f"disc.*: {len(groups['disc'])} tensors not converted (--disc-output=DIR converts them)")
  if groups["perceptual"]:
    notes.append(f"perceptual.*: {len(groups['perceptual'])} LPIPS tensors not converted "
                 f"(--config.lpips.vgg_path={args.input} reads them)")
  print(f"wrote {out} ({'; '.join(notes)})")


# --- to-torch ------------------------------------------------------------------------------------------


def to_torch(args) -> None:
  output = pathlib.Path(args.output)
  if output.exists() and not args.overwrite:
    raise FileExistsError(f"{output} exists; choose a new output file, or pass --overwrite to replace it")
  family, config = _load_config(args)
  model_config = _model_config(family, config)
  if family == "tokenizer":
    return _tokenizer_to_torch(args, config, model_config)
  _refuse_disc_flags(args, family)
  params = artifacts.generator_params(args.input, model_config, use_ema=not args.raw_params)
  state_dict = generator_weights.flax_to_torch(params, model_config)
  generator_weights.validate(state_dict, model_config)
  out = io.write_state_dict(state_dict, output, wrap_key="ema", aliases=generator_weights.aliases(state_dict))
  print(f"wrote {out} ({len(state_dict)} entries)")


def _tokenizer_to_torch(args, config, model_config) -> None:
  source = pathlib.Path(args.input)
  if (source / "checkpoints").exists():
    if args.disc_input:
      raise ValueError(f"{source} is a training workdir: its own discriminator is exported; drop --disc-input")
    field = "params" if args.raw_params else "ema_params"
    state = params_io.train_state(source, fields=(field, "disc_params", "disc_stats"))
    params = state[field]
    disc = {"params": state["disc_params"], "batch_stats": state["disc_stats"]}
    what = "raw" if args.raw_params else "EMA"
  else:
    params = params_io.load_params(source)
    disc = params_io.load_params(args.disc_input) if args.disc_input else None
    what = "params"
  state_dict = tokenizer_weights.flax_to_torch(params, model_config, prefix="ae.")
  n_ae = len(state_dict)
  if disc is not None:
    state_dict.update(tokenizer_weights.discriminator_flax_to_torch(
        disc, **_disc_shape(config, model_config), prefix="disc."))
  out = io.write_state_dict(state_dict, args.output)
  print(f"wrote {out} ({n_ae} ae.* entries ({what}), {len(state_dict) - n_ae} disc.* entries)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m bigr_jax.convert", description=__doc__, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-torch", help="original generator or B-AE weights -> orbax params")
  p.add_argument("--config", required=True, help="config file with :args, e.g. configs/bigr_l.py:bits=24")
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True)
  p.add_argument("--key", default=None, help="entry of a torch dict to read (default: 'ema' when present)")
  p.add_argument("--disc-output", default=None,
                 help="tokenizer only: also convert the input's disc.* entries into this new directory")
  p.set_defaults(func=from_torch)
  p = sub.add_parser("to-torch", help="orbax params or a training workdir -> original weights")
  p.add_argument("--config", required=True)
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True, help=".pt/.pth/.th, .safetensors or .npz; must not exist")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --output (atomically)")
  p.add_argument("--raw-params", action="store_true", help="export the raw params of a workdir, not the EMA")
  p.add_argument("--disc-input", default=None,
                 help="tokenizer only: a discriminator directory (from --disc-output) to export as disc.*")
  p.set_defaults(func=to_torch)
  return parser


def parse_args(argv=None) -> argparse.Namespace:
  """The arguments, with the `--config.field=value` overrides (after the command) as `args.overrides`."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  args.overrides = [arg for arg in rest if arg.startswith("--config.")]
  if len(args.overrides) != len(rest):
    parser.error(f"unrecognized arguments: {' '.join(arg for arg in rest if arg not in args.overrides)} (config "
                 "overrides take the form --config.field=value)")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    args.func(args)
  except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
