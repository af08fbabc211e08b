"""`--mode=sample`: class-conditional images from a trained (or converted) generator, as PNG grids and .npz."""

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from bigr_jax import images as images_lib, parallel
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.models import tokenizer as tokenizer_lib
from bigr_jax.sampling import sampler


def sampler_config(sample_config) -> sampler.SamplerConfig:
  fields = {f: sample_config[f] for f in ("num_iter", "cfg_scale", "cfg_schedule", "gumbel_temp", "gumbel_schedule",
                                          "infer_steps", "ordering", "token_sampling") if f in sample_config}
  return sampler.SamplerConfig(**fields)


@functools.lru_cache(maxsize=8)
def _decoder(model_config: tokenizer_lib.TokenizerConfig):
  return jax.jit(lambda p, b: tokenizer_lib.BinaryAutoEncoder(model_config).apply(
      {"params": p}, b, method=tokenizer_lib.BinaryAutoEncoder.decode))


def decode_bits(model_config: tokenizer_lib.TokenizerConfig, params, bits) -> np.ndarray:
  """Generator bits (B, N, K), row-major tokens -> images (B, H, W, 3) in [0, 1] through the B-AE decoder."""
  grid = int(round(bits.shape[1] ** 0.5))
  latent = jnp.asarray(bits, jnp.float32).reshape(bits.shape[0], grid, grid, bits.shape[-1])
  return np.clip(np.asarray(_decoder(model_config)(params, latent)), 0.0, 1.0)


def generate_images(gen_config: GeneratorConfig, gen_params, tok_config, tok_params, labels, sample_config, seed,
                    mesh=None, batch_size: int = 0):
  """Images (B, H, W, 3) in [0, 1] and bits for `labels`, in batches of `batch_size` (0: all at once)."""
  labels = np.asarray(labels, np.int32)
  batch_size = batch_size or len(labels)
  config = sampler_config(sample_config)
  all_bits, all_images = [], []
  shards = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    padded = np.pad(chunk, (0, -len(chunk) % shards), mode="edge")  # a last batch the mesh cannot split
    key = jax.random.fold_in(jax.random.key(seed), start)
    out = sampler.generate(gen_config, gen_params, padded, key, config, mesh=mesh,
                           batch_axes=parallel.BATCH_AXES if mesh is not None else ("data",))
    bits = np.asarray(out.bits)[:len(chunk)]
    all_bits.append(bits)
    all_images.append(decode_bits(tok_config, tok_params, bits))
  return np.concatenate(all_images), np.concatenate(all_bits)


def load_models(config, workdir):
  """(generator config, EMA params, tokenizer config, tokenizer params) for sampling and editing.

  Generator weights: `config.init_from` (converted params) or the workdir's latest EMA params. Tokenizer:
  `config.tokenizer.config` (a bae_* config file; or `config.tokenizer.model`, its model fields) and
  `config.tokenizer.checkpoint` (a released .th file, a params directory or a tokenizer workdir).
  """
  from bigr_jax import config_lib
  from bigr_jax.convert import params_io
  from bigr_jax.train import tokenizer as tokenizer_train
  gen_config = GeneratorConfig(**config.model.to_dict())
  tok = config.tokenizer
  if not tok.get("checkpoint") or not (tok.get("config") or tok.get("model")):
    raise ValueError("sampling decodes with a B-AE: set --config.tokenizer.config=configs/bae_d24.py and "
                     "--config.tokenizer.checkpoint=<binaryae .th file, params dir or tokenizer workdir>")
  # The B-AE architecture: a bae_* config file, or its `model` fields given inline.
  tok_config = tokenizer_train.tokenizer_config(tok if tok.get("model") else config_lib.load_config_file(tok.config))
  if tok_config.codebook_size != gen_config.binary_size:
    raise ValueError(f"the tokenizer has {tok_config.codebook_size} bits, the generator {gen_config.binary_size}")
  if config.get("init_from"):
    gen_params = params_io.load_params(config.init_from)
  else:
    gen_params = params_io.train_state_params(workdir, use_ema=config.sample.get("use_ema", True))
  tok_params = tokenizer_train.load_tokenizer_params(config.tokenizer.checkpoint, tok_config)
  return gen_config, gen_params, tok_config, tok_params


def sample_to_workdir(config, workdir: str):
  """Samples `config.sample.labels`; writes workdir/samples/{samples.png, samples.npz, samples.json}."""
  workdir = pathlib.Path(workdir)
  gen_config, gen_params, tok_config, tok_params = load_models(config, workdir)
  labels = np.asarray(config.sample.labels, np.int32)
  if labels.min() < 0 or labels.max() > gen_config.num_classes:
    raise ValueError(f"class labels must be in [0, {gen_config.num_classes}] ({gen_config.num_classes} = null)")
  mesh = parallel.make_mesh(config.mesh)
  start = time.perf_counter()
  images, bits = generate_images(gen_config, gen_params, tok_config, tok_params, labels, config.sample,
                                 config.sample.get("seed", 0), mesh, config.sample.get("batch_size", 0))
  seconds = time.perf_counter() - start
  out = workdir / "samples"
  images_lib.save_grid(images, out / "samples.png", nrow=min(8, len(images)))
  np.savez(out / "samples.npz", arr_0=images_lib.to_uint8(images), arr_1=labels, bits=bits.astype(np.uint8))
  summary = {"num_images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds,
             **{k: v for k, v in config.sample.to_dict().items() if k != "labels"}}
  (out / "samples.json").write_text(json.dumps(summary, indent=2, default=str))
  print(f"wrote {out / 'samples.png'} ({len(images)} images, {seconds:.1f} s)", flush=True)
  return images


def edit_to_workdir(config, workdir: str):
  """`--mode=edit`: config.edit.task = inpaint | outpaint | edit | interpolate | enrich on config.edit.image
  (and config.edit.mask, a PNG, white = regenerate; for outpaint white = keep). Writes workdir/edit/<task>.png
  (the input first, then config.edit.batch results) and <task>.npz."""
  from bigr_jax.sampling import editing
  workdir = pathlib.Path(workdir)
  edit = config.edit
  gen_config, gen_params, tok_config, tok_params = load_models(config, workdir)
  key = jax.random.key(edit.get("seed", 0))
  batch = int(edit.get("batch", 4))
  inputs = []
  if edit.task == "interpolate":
    out = editing.interpolate(gen_config, gen_params, edit.class_a, edit.class_b, key)
  else:
    image = images_lib.load_image(edit.image, tok_config.img_size)
    inputs = [image]
    _, bits = jax.jit(lambda p, x: tokenizer_lib.BinaryAutoEncoder(tok_config).apply(
        {"params": p}, x, rngs={"sample": jax.random.fold_in(key, 1)},
        method=tokenizer_lib.BinaryAutoEncoder.encode))(tok_params, np.repeat(image[None], batch, 0))
    bits = np.asarray(bits).reshape(batch, -1, tok_config.codebook_size)  # sampled codes, as the original
    if edit.task == "enrich":
      out_bits = editing.enrich(gen_config, gen_params, bits, key)
    else:
      mask = editing.mask_from_image(edit.mask, gen_config.grid_size, tok_config.img_size)
      if edit.task == "inpaint":
        out = editing.inpaint(gen_config, gen_params, bits, mask, key)
      elif edit.task == "outpaint":
        out = editing.outpaint(gen_config, gen_params, bits, mask, key)
      elif edit.task == "edit":
        out = editing.edit_class(gen_config, gen_params, bits, mask, edit.target_class, key)
      else:
        raise ValueError(f"unknown edit.task {edit.task!r}: inpaint | outpaint | edit | interpolate | enrich")
  if edit.task != "enrich":
    out_bits = out.bits
  images = decode_bits(tok_config, tok_params, np.asarray(out_bits))
  path = workdir / "edit" / f"{edit.task}.png"
  images_lib.save_grid(np.concatenate([np.stack(inputs), images]) if inputs else images, path,
                       nrow=min(8, len(images) + len(inputs)))
  np.savez(path.with_suffix(".npz"), arr_0=images_lib.to_uint8(images))
  print(f"wrote {path}", flush=True)
  return images


def evaluation_samples(config, workdir: str) -> str:
  """The ADM-layout sample batch to evaluate: `evaluation.sample_batch` if set, else workdir/samples/fid.npz,
  generated here if missing (`evaluation.num_samples` images, classes in turn, 50 per class for 50k).

  Resumable: each batch is kept in samples/fid_parts/ as it is made, and a rerun skips the batches present.
  """
  from bigr_jax.evaluation import metrics as metrics_lib
  path = config.get("evaluation", {}).get("sample_batch", "")
  if path:
    return path
  out = pathlib.Path(workdir) / "samples" / "fid.npz"
  if out.exists():
    return str(out)
  gen_config, gen_params, tok_config, tok_params = load_models(config, pathlib.Path(workdir))
  num = int(config.get("evaluation", {}).get("num_samples", 0) or 50 * gen_config.num_classes)
  labels = np.arange(num) % gen_config.num_classes
  batch = int(config.sample.get("batch_size", 0) or 64)
  mesh = parallel.make_mesh(config.mesh)
  parts = out.parent / "fid_parts"
  parts.mkdir(parents=True, exist_ok=True)
  for start in range(0, num, batch):
    part = parts / f"{start:08d}.npy"
    if part.exists():
      continue
    chunk, _ = generate_images(gen_config, gen_params, tok_config, tok_params, labels[start:start + batch],
                               config.sample, config.sample.get("seed", 0) + start, mesh)
    np.save(parts / f".{start:08d}.tmp.npy", images_lib.to_uint8(chunk))
    (parts / f".{start:08d}.tmp.npy").rename(part)  # a part is either whole or absent
    print(f"evaluation samples: {min(start + batch, num)}/{num}", flush=True)
  images = np.concatenate([np.load(parts / f"{start:08d}.npy") for start in range(0, num, batch)])
  metrics_lib.write_sample_batch(str(out), images, labels)
  return str(out)
