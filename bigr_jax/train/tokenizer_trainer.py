"""Training of the binary tokenizer (B-AE), loading its weights, and encoding a dataset into bit codes.

Loss, as Binary Latent Diffusion trains the B-AE: L1 + w_p LPIPS + lambda (-mean D(x_rec)) [+ code / entropy
terms], lambda = |grad L_nll| / (|grad L_g| + 1e-4) at the last decoder conv, clamped to [0, disc_weight_max]
and 0 before `disc_start_step`; a PatchGAN trained with the hinge loss from that step on; EMA every
`ema_every` steps.
"""

import pathlib
from typing import Any

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigr_jax import artifacts, config_sections, console, data, images as images_lib, parallel
from bigr_jax.weights import tokenizer_weights
from bigr_jax.models import tokenizer as tokenizer_lib
from bigr_jax.models.discriminator import Discriminator, hinge_d_loss
from bigr_jax.models.config import TokenizerConfig
from bigr_jax.models.lpips import LPIPS
from bigr_jax.train import loop, state as state_lib


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  disc_params: Any
  disc_stats: Any
  disc_opt_state: Any


def _last_decoder_kernel(params):
  """Path of the decoder's output conv kernel (the adaptive GAN weight is measured there)."""
  names = [k for k in params["generator"] if k.startswith("blocks_")]
  return ("generator", max(names, key=lambda k: int(k.split("_")[1])), "kernel")


class TokenizerTrainer:
  """Compiled init and train step of the B-AE + discriminator on one mesh."""

  def __init__(self, config, mesh, total_steps: int, lpips_params=None):
    self.config = config
    self.model_config = TokenizerConfig.from_config(config.model)
    self.total_steps = total_steps
    self.model = tokenizer_lib.BinaryAutoEncoder(self.model_config)
    self.disc = Discriminator(self.model_config.n_channels, config.disc.ndf, config.disc.n_layers)
    self.lpips = LPIPS()
    self.lpips_params = lpips_params
    if config.loss.perceptual_weight > 0 and lpips_params is None:
      raise ValueError("LPIPS needs weights: set lpips.vgg_path and lpips.lin_path (or loss.perceptual_weight=0)")
    self.optimizer = state_lib.make_optimizer(config.optim, total_steps)
    self.disc_optimizer = state_lib.make_optimizer(
        config_sections.OptimConfig.from_config(config.disc_optim, "config.disc_optim"), total_steps)
    self.kernel_path = None
    rules = parallel.rules_from_config(config)
    self.init, self.shardings, self.abstract_state = state_lib.sharded_init(self._init_boxed, mesh, rules)
    self.mesh = mesh
    self.train_step = parallel.MeshJit(self._train_step, mesh, in_shardings=(self.shardings, None, None),
                                       out_shardings=(self.shardings, parallel.replicated(mesh)), donate_argnums=0)
    # Split over the batch axes like a train batch; the few images come back whole to every process.
    self._reconstruct = parallel.MeshJit(
        lambda params, x: self.model.apply({"params": params}, x, deterministic=True)[0], mesh,
        in_shardings=(self.shardings.params, parallel.batch_sharding(mesh, 4)), out_shardings=parallel.replicated(mesh))

  def reconstruct(self, params, images: np.ndarray) -> np.ndarray:
    """Reconstructions of host images (B, H, W, 3), every process calling with the same images."""
    images = np.asarray(images, np.float32)
    padded = parallel.from_same_on_every_host(parallel.pad_to_shards(images, self.mesh), self.mesh)
    return np.asarray(self._reconstruct(params, padded))[:len(images)]

  def _init_boxed(self, key):
    ae_key, disc_key = jax.random.split(key)
    images = tokenizer_lib.init_inputs(self.model_config, batch=2)[0]
    params = self.model.init({"params": ae_key}, images, deterministic=True)["params"]
    disc_vars = self.disc.init({"params": disc_key}, images, train=False)
    plain, disc_plain = nn.meta.unbox(params), nn.meta.unbox(disc_vars["params"])
    return TokenizerState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
        opt_state=state_lib.box_like_params(self.optimizer.init(plain), params),
        disc_params=disc_vars["params"], disc_stats=disc_vars["batch_stats"],
        disc_opt_state=state_lib.box_like_params(self.disc_optimizer.init(disc_plain), disc_vars["params"]))

  def _train_step(self, state: TokenizerState, batch, key):
    cfg, loss_cfg = self.config, self.config.loss
    key = jax.random.fold_in(key, state.step)
    images = batch["image"]
    gan_on = state.step >= loss_cfg.disc_start_step
    disc_vars = {"params": state.disc_params, "batch_stats": state.disc_stats}

    def forward(params):
      recon, aux = self.model.apply({"params": params}, images, rngs={"sample": key})
      extra = loss_cfg.code_weight * aux["code_loss"] + loss_cfg.entropy_weight * aux["entropy_loss"]
      return recon, extra

    (recon, extra), pullback = jax.vjp(forward, state.params)

    def nll_of(recon):
      l1 = jnp.mean(jnp.abs(images - recon))
      perceptual = jnp.zeros(())
      if loss_cfg.perceptual_weight > 0:
        perceptual = jnp.mean(self.lpips.apply({"params": self.lpips_params}, images, recon))
      return l1 + loss_cfg.perceptual_weight * perceptual, (l1, perceptual)

    def g_of(recon):
      logits, _ = self.disc.apply(disc_vars, recon, train=True, mutable=["batch_stats"])
      return -jnp.mean(logits)

    (nll, (l1, perceptual)), d_nll = jax.value_and_grad(nll_of, has_aux=True)(recon)
    grads_nll = pullback((d_nll, jnp.ones_like(extra)))[0]

    def d_loss_fn(disc_params):
      both = jnp.concatenate([images, jax.lax.stop_gradient(recon)])
      logits, updated = self.disc.apply({"params": disc_params, "batch_stats": state.disc_stats}, both,
                                        train=True, mutable=["batch_stats"])
      real, fake = jnp.split(logits, 2)
      return hinge_d_loss(real, fake), updated["batch_stats"]

    def with_gan():
      g_loss, d_g = jax.value_and_grad(g_of)(recon)
      grads_g = pullback((d_g, jnp.zeros_like(extra)))[0]
      path = _last_decoder_kernel(state.params)
      kernel = lambda grads: traverse_util.flatten_dict(grads)[path]  # noqa: E731
      ratio = jnp.linalg.norm(kernel(grads_nll)) / (jnp.linalg.norm(kernel(grads_g)) + 1e-4)
      adaptive = jnp.clip(ratio, 0.0, loss_cfg.disc_weight_max)
      grads = jax.tree_util.tree_map(lambda a, b: a + adaptive * b, grads_nll, grads_g)
      (d_loss, disc_stats), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
      d_updates, disc_opt_state = self.disc_optimizer.update(d_grads, state.disc_opt_state, state.disc_params)
      disc = (optax.apply_updates(state.disc_params, d_updates), disc_stats, disc_opt_state)
      return grads, disc, (g_loss, d_loss, adaptive)

    def without_gan():  # before disc_start_step: no discriminator work at all
      zero = jnp.zeros((), jnp.float32)
      return grads_nll, (state.disc_params, state.disc_stats, state.disc_opt_state), (zero, zero, zero)

    if loss_cfg.disc_start_step < self.total_steps:
      grads, disc, (g_loss, d_loss, adaptive) = jax.lax.cond(gan_on, with_gan, without_gan)
    else:  # the discriminator starts after this run ends: none is compiled (the digits demo's B-AE, MNIST's)
      grads, disc, (g_loss, d_loss, adaptive) = without_gan()
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    ema = jax.lax.cond(step % cfg.ema_every == 0,
                       lambda: state_lib.ema_update(state.ema_params, params, cfg.ema_decay),
                       lambda: state.ema_params)
    new_state = TokenizerState(step=step, params=params, ema_params=ema, opt_state=opt_state,
                               disc_params=disc[0], disc_stats=disc[1], disc_opt_state=disc[2])
    loss = nll + extra + adaptive * g_loss
    metrics = {"loss": loss, "l1": l1, "perceptual": perceptual, "g_loss": g_loss, "d_loss": d_loss,
               "adaptive_weight": adaptive, "psnr": _psnr(images, recon)}
    return new_state, metrics


def _psnr(images, recon):
  mse = jnp.mean(jnp.square(jnp.clip(recon, 0, 1) - images))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def image_feed(config):
  data_config = config_sections.DataConfig.from_config(config.data)
  source = data.build_source(data_config)
  loader = data.make_loader(source, global_batch_size=config.batch_size, seed=config.seed, shuffle=True,
                            num_epochs=None, transforms=data.build_transforms(data_config),
                            worker_count=data_config.worker_count)
  iterator = iter(loader)
  images = ({key: b[key] for key in ("image", "skipped") if key in b} for b in iterator)
  return loop.Feed(images, iterator, len(source))


def held_out_images(config, count: int = 8) -> np.ndarray:
  """The first `count` images of `data.eval_split`, center-cropped, unflipped: the same on every process."""
  data_config = config_sections.DataConfig.from_config(config.data, split=config.data.eval_split, flip=False)
  source = data.build_source(data_config)
  records = [source[i] for i in range(min(count, len(source)))]
  for transform in data.build_transforms(data_config):  # deterministic without the flip
    records = [transform.map(r) for r in records]
  return np.stack([r["image"] for r in records])


def _lpips_params(config):
  if config.loss.perceptual_weight <= 0:
    return None
  paths = [p for p in (config.lpips.vgg_path, config.lpips.lin_path) if p]
  if paths:
    return tokenizer_weights.read_lpips_params(paths)
  if config.lpips.random_init:  # tests only: a perceptual loss without meaning
    console.warn("LPIPS with random weights (lpips.random_init=True): for tests only")
    shape = (1, 64, 64, 3)
    return LPIPS().init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape))["params"]
  return None


def train_and_evaluate(config, workdir: str) -> TokenizerState:
  """Trains (or resumes) a B-AE in `workdir`; writes reconstruction grids (EMA weights) at every log step."""
  mesh = parallel.make_mesh(config.mesh)
  parallel.batch_size_per_process(config.batch_size, mesh)
  feed = image_feed(config)
  steps = loop.total_steps(config, feed.num_examples)
  trainer = TokenizerTrainer(config, mesh, steps, _lpips_params(config))
  held_out = held_out_images(config)
  workdir = pathlib.Path(workdir)

  def init():
    state = trainer.init(jax.random.key(config.seed))
    if config.init_from:
      params = artifacts.tokenizer_params(config.init_from, trainer.model_config)
      state = state.replace(params=params, ema_params=params)
    return state

  def on_log(step, state):
    recon = trainer.reconstruct(state.ema_params, held_out)  # every process: the params are sharded
    if jax.process_index() == 0:
      images_lib.save_grid(np.concatenate([held_out, recon]), workdir / "reconstructions" / f"step_{step:07d}.png",
                           nrow=len(held_out))

  return loop.train(config, workdir, mesh=mesh, feed=feed, steps=steps, init=init,
                  abstract_state=trainer.abstract_state, train_step=trainer.train_step, on_log=on_log)


def encode_dataset(config, workdir: str, overwrite: bool = False):
  """`--mode=encode`: bit codes (and codes of the flipped images) of `config.data` into workdir/codes/<split>.

  The tokenizer comes from `config.tokenizer.checkpoint` (any source `artifacts.tokenizer_params` reads),
  or, if that is empty, from this workdir's own tokenizer training (EMA). Resumable: a rerun continues where
  it stopped. Finished codes are refused unless `overwrite`, before anything is loaded.
  """
  return write_codes(config, workdir, if_complete="overwrite" if overwrite else "refuse")


def write_codes(config, workdir: str, if_complete: str = "keep"):
  """`encode_dataset` with the choice of `data.encode_to_codes`' `if_complete` (the demo keeps finished codes)."""
  data_config = config_sections.DataConfig.from_config(config.data)
  source = data.build_source(data_config)
  out = pathlib.Path(workdir) / "codes" / (data_config.split or "train")
  if if_complete == "refuse":  # before the weights are read
    data.codes.refuse_complete(str(out), len(source))
  model_config = TokenizerConfig.from_config(config.model)
  params = artifacts.tokenizer_params(config.tokenizer.checkpoint or workdir, model_config)
  mesh = parallel.make_mesh(config.mesh)
  model = tokenizer_lib.BinaryAutoEncoder(model_config)
  seed_key = jax.random.key(config.seed)
  calls = [0]

  @jax.jit
  def encode(params, images, key):
    _, bits = model.apply({"params": params}, images, deterministic=model_config.deterministic,
                          rngs={"sample": key}, method=tokenizer_lib.BinaryAutoEncoder.encode)
    return bits.reshape(bits.shape[0], -1, bits.shape[-1]).astype(jnp.uint8)  # row-major tokens

  def encode_fn(images):
    # The original trains on Bernoulli-sampled codes; each call gets its own key.
    calls[0] += 1
    batch = images.shape[0]
    images = parallel.pad_to_shards(images, mesh, mode="constant")
    with jax.set_mesh(mesh):
      bits = encode(params, parallel.from_same_on_every_host(images, mesh), jax.random.fold_in(seed_key, calls[0]))
    return parallel.to_host(bits)[:batch]

  # On several processes every host reads every image and they encode each batch together; process 0 writes.
  writes = jax.process_index() == 0
  writer = data.encode_to_codes(source, encode_fn, str(out), image_size=model_config.img_size,
                                batch_size=config.encode_batch_size, with_flipped=config.encode_flipped,
                                if_complete=if_complete, write=writes)
  if writes:
    print(f"codes: {writer.count} records in {out}", flush=True)
  return out
