"""`--mode=sample`, `--mode=edit` and the sample batch of `--mode=evaluate`: images from a trained (or
converted) generator, as PNG grids and .npz, with the settings of `config.sample` / `config.edit`."""

import dataclasses
import functools
import shutil
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bigr_jax import artifacts, files, images as images_lib, parallel, typed_config
from bigr_jax.config_sections import EditConfig, SampleRun, SamplerConfig
from bigr_jax.evaluation import adm_metrics, protocols as evaluation_protocols
from bigr_jax.models import tokenizer as tokenizer_lib
from bigr_jax.sampling import editing, sampler


def sample_settings(sample_section) -> tuple:
  """`config.sample` -> (SamplerConfig, SampleRun); a field neither declares is an error."""
  if "resample_known" in sample_section:
    raise ValueError("config.sample.resample_known does nothing when every token is generated; it is an "
                     "editing setting: config.edit.sampler.resample_known")
  return typed_config.split_section(sample_section, "config.sample", SamplerConfig, SampleRun)


@functools.lru_cache(maxsize=8)
def _decoder(model_config: tokenizer_lib.TokenizerConfig):
  return jax.jit(lambda p, b: tokenizer_lib.BinaryAutoEncoder(model_config).apply(
      {"params": p}, b, method=tokenizer_lib.BinaryAutoEncoder.decode))


def decode_bits(model_config: tokenizer_lib.TokenizerConfig, params, bits) -> np.ndarray:
  """Generator bits (B, N, K), row-major tokens -> images (B, H, W, 3) in [0, 1] through the B-AE decoder."""
  grid = int(round(bits.shape[1] ** 0.5))
  latent = jnp.asarray(bits, jnp.float32).reshape(bits.shape[0], grid, grid, bits.shape[-1])
  return np.clip(np.asarray(_decoder(model_config)(params, latent)), 0.0, 1.0)


class Generated(NamedTuple):
  images: np.ndarray  # (B, H, W, 3) in [0, 1]
  bits: np.ndarray  # (B, N, K)
  decoded_at: np.ndarray  # (B, N): the sampler iteration that decoded each token


def generate_images(models: artifacts.SamplingModels, labels, config: SamplerConfig, seed: int,
                    mesh=None, batch_size: int = 0) -> Generated:
  """Images and bits for `labels`, in batches of `batch_size` (0: all at once), each padded to the mesh's
  batch shards."""
  labels = np.asarray(labels, np.int32)
  batch_size = batch_size or len(labels)
  parts = []
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    padded = parallel.pad_to_shards(chunk, mesh) if mesh is not None else chunk
    key = jax.random.fold_in(jax.random.key(seed), start)
    out = sampler.generate(models.generator_config, models.generator_params, padded, key, config, mesh=mesh,
                           batch_axes=parallel.BATCH_AXES if mesh is not None else ("data",))
    bits = parallel.to_host(out.bits)[:len(chunk)]
    parts.append(Generated(decode_bits(models.tokenizer_config, models.tokenizer_params, bits), bits,
                           parallel.to_host(out.decoded_at)[:len(chunk)]))
  return Generated(*(np.concatenate(arrays) for arrays in zip(*parts)))


class Drawn(NamedTuple):
  images: np.ndarray  # (B, H, W, 3) in [0, 1]
  bits: np.ndarray  # (B, N, K)
  decoded_at: np.ndarray  # (B, N)
  labels: np.ndarray
  models: artifacts.SamplingModels
  sampler_config: SamplerConfig
  run: SampleRun
  seconds: float  # sampling and decoding, after loading


def draw_samples(config, workdir) -> Drawn:
  """The samples `config.sample` asks for (labels or per_class), from the run's generator and B-AE, on
  `config.mesh`."""
  sampler_config, run = sample_settings(config.sample)
  mesh = parallel.make_mesh(config.mesh)
  models = artifacts.sampling_models(config, workdir, use_ema=run.use_ema)
  labels = run.class_labels(models.generator_config.num_classes)
  sampler.check_labels(models.generator_config, labels)
  start = time.perf_counter()
  generated = generate_images(models, labels, sampler_config, run.seed, mesh, run.batch_size)
  return Drawn(*generated, labels, models, sampler_config, run, time.perf_counter() - start)


def sample_to_workdir(config, workdir: str):
  """Samples `config.sample` (`draw_samples`); writes workdir/samples/{samples.png, samples.npz,
  samples.json} and decoding_order.png (each sample's tokens as the sampler decoded them, iteration by
  iteration; the first 8 samples)."""
  drawn = draw_samples(config, workdir)
  images, run, seconds = drawn.images, drawn.run, drawn.seconds
  if jax.process_index() != 0:
    return images  # every process holds the same samples; process 0 writes them
  out = artifacts.output_path(workdir, artifacts.SAMPLES_DIR)
  images_lib.save_grid(images, out / "samples.png", nrow=run.per_class or min(8, len(images)))
  Image.fromarray(images_lib.decoding_strip(images[:8], drawn.decoded_at[:8], drawn.sampler_config.num_iter)
                  ).save(out / "decoding_order.png")
  np.savez(out / "samples.npz", arr_0=images_lib.to_uint8(images), arr_1=drawn.labels,
           bits=drawn.bits.astype(np.uint8))
  summary = {"num_images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds,
             **dataclasses.asdict(drawn.sampler_config), **{k: v for k, v in dataclasses.asdict(run).items()
                                                            if k != "labels"}}
  files.write_json(out / "samples.json", summary)
  print(f"wrote {out / 'samples.png'} ({len(images)} images, {seconds:.1f} s) and {out / 'decoding_order.png'}",
        flush=True)
  return images


@functools.lru_cache(maxsize=8)
def _encoder(model_config: tokenizer_lib.TokenizerConfig):
  return jax.jit(lambda p, x, key: tokenizer_lib.BinaryAutoEncoder(model_config).apply(
      {"params": p}, x, rngs={"sample": key}, method=tokenizer_lib.BinaryAutoEncoder.encode)[1])


def encode_image(models: artifacts.SamplingModels, image: np.ndarray, batch: int, key) -> np.ndarray:
  """Sampled B-AE bits (batch, N, K) of one image (H, W, 3) in [0, 1], as the original apps encode."""
  bits = _encoder(models.tokenizer_config)(models.tokenizer_params, np.repeat(image[None], batch, 0), key)
  return np.asarray(bits).reshape(batch, -1, models.tokenizer_config.codebook_size)


class Edited(NamedTuple):
  images: np.ndarray  # (B, H, W, 3) in [0, 1]: the task's results
  decoded_at: Optional[np.ndarray]  # (B, N): the iteration that decoded each token (-1: given; enrich: None)
  source: Optional[np.ndarray]  # (H, W, 3): the input picture at the tokenizer's size (None: interpolate)
  cloned: Optional[np.ndarray]  # (B, H, W, 3): the results cloned seamlessly (`seamless_clone`), else None


def edit_images(models: artifacts.SamplingModels, edit: EditConfig, mesh, image=None, mask=None) -> Edited:
  """`edit`'s task with `models` on `mesh`. image: (H, W, 3) in [0, 1] at the tokenizer's size, default the
  file `edit.image`; mask: anything `editing.pixel_mask` reads (white = regenerate; outpaint: keep), default
  the file `edit.mask`. An empty mask is a ValueError."""
  gen_config, gen_params, tok_config = models.generator_config, models.generator_params, models.tokenizer_config
  kwargs = dict(config=editing.task_sampler(edit), mesh=mesh, batch_axes=parallel.BATCH_AXES)
  key = jax.random.key(edit.seed)
  # Batches are padded to the mesh's batch shards; the padding is dropped below.
  if edit.task == "interpolate":
    count = len(editing.INTERPOLATION_WEIGHTS)
    weights = parallel.pad_to_shards(np.asarray(editing.INTERPOLATION_WEIGHTS, np.float32), mesh)
    out = editing.interpolate(gen_config, gen_params, edit.class_a, edit.class_b, key, weights=weights, **kwargs)
    return Edited(decode_bits(tok_config, models.tokenizer_params, parallel.to_host(out.bits)[:count]),
                  parallel.to_host(out.decoded_at)[:count], None, None)
  count = edit.batch
  image = images_lib.load_image(edit.image, tok_config.img_size) if image is None else image
  bits = encode_image(models, image, parallel.round_up_to_shards(edit.batch, mesh), jax.random.fold_in(key, 1))
  pixels = None
  if edit.task == "enrich":
    out_bits = editing.enrich(gen_config, gen_params, bits, key, **kwargs)
    decoded_at = None  # sixteen passes over the grid: no one order to show
  else:
    pixels = editing.pixel_mask(edit.mask if mask is None else mask, tok_config.img_size)
    tokens = editing.pixel_mask_to_tokens(pixels, gen_config.grid_size)
    if not tokens.any():
      raise ValueError("the mask is empty: mark the region to regenerate (outpaint: to keep) in white")
    if edit.task == "edit":
      out = editing.edit_class(gen_config, gen_params, bits, tokens, edit.target_class, key, **kwargs)
    else:
      task = editing.inpaint if edit.task == "inpaint" else editing.outpaint
      out = task(gen_config, gen_params, bits, tokens, key, **kwargs)
    out_bits, decoded_at = out.bits, parallel.to_host(out.decoded_at)
  images = decode_bits(tok_config, models.tokenizer_params, parallel.to_host(out_bits)[:count])
  cloned = None
  if edit.seamless_clone:
    # As apps/inpaint.py: the regenerated region goes into the input; for outpaint the input's kept region
    # goes into the result.
    pairs = ((image, result) if edit.task == "outpaint" else (result, image) for result in images)
    cloned = np.stack([images_lib.seamless_clone(source, destination, pixels, edit.clone_center)
                       for source, destination in pairs])
  return Edited(images, None if decoded_at is None else decoded_at[:count], image, cloned)


def edit_to_workdir(config, workdir: str):
  """`--mode=edit` (see `EditConfig`) on `config.mesh`. Writes workdir/edit/<task>.png (the input first,
  then the results; with `seamless_clone`, a second row of the cloned results) and <task>.npz (arr_0: the
  results; cloned)."""
  edit = typed_config.from_section(EditConfig, config.edit, "config.edit")
  edit.check_inputs()
  _, run = sample_settings(config.sample)
  mesh = parallel.make_mesh(config.mesh)
  models = artifacts.sampling_models(config, workdir, use_ema=run.use_ema)
  edited = edit_images(models, edit, mesh)
  if jax.process_index() != 0:
    return edited.images  # every process holds the same results; process 0 writes them
  rows = [edited.images] if edited.source is None else [edited.source[None], edited.images]
  if edited.cloned is not None:
    rows += [edited.source[None], edited.cloned]
  path = artifacts.output_path(workdir, artifacts.EDIT_DIR) / f"{edit.task}.png"
  images_lib.save_grid(np.concatenate(rows), path, nrow=min(8, len(edited.images) + (edited.source is not None)))
  arrays = {"arr_0": images_lib.to_uint8(edited.images)}
  if edited.cloned is not None:
    arrays["cloned"] = images_lib.to_uint8(edited.cloned)
  np.savez(path.with_suffix(".npz"), **arrays)
  print(f"wrote {path}", flush=True)
  return edited.images


def evaluation_samples(config, workdir: str, overwrite: bool = False) -> str:
  """The ADM-layout sample batch to evaluate: `evaluation.sample_batch` if set, else workdir/samples/fid.npz,
  generated here if missing (`evaluation.num_samples` images, classes in turn, 50 per class for 50k), with
  the sampler settings of `config.sample`; `overwrite` draws it again.

  Resumable: each batch is kept in samples/fid_parts/ as it is made, and a rerun skips the batches present.
  """
  ev = evaluation_protocols.evaluation_config(config)
  if ev.sample_batch:
    return ev.sample_batch
  out = artifacts.output_path(workdir, artifacts.EVALUATION_SAMPLES)
  parts = artifacts.output_path(workdir, artifacts.EVALUATION_PARTS)
  if overwrite:
    out.unlink(missing_ok=True)
    shutil.rmtree(parts, ignore_errors=True)
  if out.exists():
    return str(out)
  sampler_config, run = sample_settings(config.sample)
  mesh = parallel.make_mesh(config.mesh)
  models = artifacts.sampling_models(config, workdir, use_ema=run.use_ema)
  num_classes = models.generator_config.num_classes
  num = ev.num_samples or 50 * num_classes
  labels = np.arange(num) % num_classes
  batch = parallel.round_up_to_shards(run.batch_size or 64, mesh)
  parts.mkdir(parents=True, exist_ok=True)
  for start in range(0, num, batch):
    part = parts / f"{start:08d}.npy"
    if part.exists():
      continue
    chunk = generate_images(models, labels[start:start + batch], sampler_config, run.seed + start, mesh).images
    with files.atomic_path(part) as tmp:  # a part is whole or absent
      np.save(tmp, images_lib.to_uint8(chunk))
    print(f"evaluation samples: {min(start + batch, num)}/{num}", flush=True)
  images = np.concatenate([np.load(parts / f"{start:08d}.npy") for start in range(0, num, batch)])
  adm_metrics.write_sample_batch(str(out), images, labels)
  return str(out)
