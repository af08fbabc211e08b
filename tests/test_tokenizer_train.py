"""B-AE training end to end: it learns to reconstruct real photos, writes grids, resumes; code extraction."""

import json
import os

import jax
import numpy as np
import pytest

from bigr_jax import config_sections, data, parallel, typed_config
from bigr_jax.train import state as state_lib, tokenizer_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_config(**changes):
  c = typed_config.load_config_file(os.path.join(ROOT, "configs", "bae_d24.py") + ":runlocal")
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.tensorboard = False
  c.update(changes)
  return c


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo_crops(count, size, seed, part):
  """Random crops of photos that ship inside scikit-image (downscaled 4x so a crop holds a scene), from
  the left 70% of each photo (part="train") or the right 30% (part="held_out")."""
  skdata = pytest.importorskip("skimage.data")
  from PIL import Image
  rng = np.random.default_rng(seed)
  photos = []
  for name in PHOTOS:
    photo = Image.fromarray(getattr(skdata, name)())
    photo = np.asarray(photo.resize((photo.width // 4, photo.height // 4), Image.BICUBIC), np.float32) / 255
    split = int(0.7 * photo.shape[1])
    photos.append(photo[:, :split] if part == "train" else photo[:, split:])
  crops = []
  for i in range(count):
    photo = photos[i % len(photos)]
    top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
    crops.append(photo[top:top + size, left:left + size])
  return np.stack(crops)


@pytest.mark.slow
def test_learns_to_reconstruct_held_out_photo_crops():
  config = local_config()
  config.mesh.update(data=1)
  config.optim.lr = 2e-3
  config.loss.disc_start_step = 10_000  # L1 only: a GAN needs far more than a few hundred steps
  config.model.deterministic = True  # thresholded bits: sampled ones slow a short run down
  size = config.model.img_size
  train = photo_crops(2048, size, seed=0, part="train")
  held_out = photo_crops(64, size, seed=1, part="held_out")  # regions never trained on
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  steps = 200
  trainer = tokenizer_trainer.TokenizerTrainer(config, mesh, total_steps=steps)
  state = trainer.init(jax.random.key(0))

  def held_out_psnr(params):
    recon = np.clip(np.asarray(trainer.reconstruct(params, held_out)), 0, 1)
    return float(10 * np.log10(1.0 / np.mean((recon - held_out) ** 2)))

  before = held_out_psnr(state.params)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    for _ in range(steps):
      batch = {"image": train[rng.integers(0, len(train), config.batch_size)]}
      state, metrics = trainer.train_step(state, parallel.to_global(batch, mesh), jax.random.key(1))
  after = held_out_psnr(state.params)
  print(f"held-out PSNR: {before:.2f} dB at step 0 -> {after:.2f} dB after {steps} steps")
  assert after > before + 5.0  # 7.5 -> 14.5 dB measured: the error's RMS falls 2x, and more


def test_train_resume_grids_and_encode(tmp_path):
  config = local_config(total_steps=6, log_every=3)
  config.loss.disc_start_step = 3  # the GAN branch and the discriminator update run too
  workdir = tmp_path / "bae"
  state = tokenizer_trainer.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 6
  grids = sorted((workdir / "reconstructions").glob("*.png"))
  assert [g.name for g in grids] == ["step_0000003.png", "step_0000006.png"]
  config.total_steps = 7
  assert int(tokenizer_trainer.train_and_evaluate(config, str(workdir)).step) == 7  # resumed, not restarted

  config.data.split = "test"
  out = tokenizer_trainer.encode_dataset(config, str(workdir))
  with pytest.raises(FileExistsError, match="finished codes.*--overwrite"):  # before any weights are read
    tokenizer_trainer.encode_dataset(config, str(workdir))
  before = (out / "codes.npy").read_bytes()
  config.seed += 1  # other Bernoulli draws: the codes written again differ
  assert tokenizer_trainer.encode_dataset(config, str(workdir), overwrite=True) == out
  assert (out / "codes.npy").read_bytes() != before
  codes = data.CodesSource(str(out), flip=False)
  record = codes[0]
  grid = config.model.img_size // 8
  assert record["codes"].shape == (grid * grid, config.model.codebook_size)
  assert set(np.unique(record["codes"])) <= {0, 1}
  assert len(codes) == len(data.DigitsSource(split="test", image_size=config.model.img_size))


def test_skipped_images_are_counted_in_the_metrics(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in ("train", "validation"):
    for i in range(6):
      path = tmp_path / split / f"class{i % 2}" / f"{i}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
  (tmp_path / "train" / "class0" / "broken.png").write_bytes(b"not a png")
  Image.new("RGB", (8, 8)).save(tmp_path / "train" / "class1" / "tiny.png")  # below min_image_size=16
  config = local_config(total_steps=5, log_every=1, checkpoint_every=5)
  config.data.update(name="folder", data_dir=str(tmp_path), eval_split="validation", on_bad_image="skip")
  config.batch_size = 8  # a batch is an epoch of the 8 files, with its 2 bad ones
  tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "bae"))
  lines = [json.loads(line) for line in (tmp_path / "bae" / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
  assert sum(line["skipped_images"] for line in lines) == 10


def test_missing_lpips_weights_is_a_clear_error():
  config = local_config()
  config.loss.perceptual_weight = 1.0
  with pytest.raises(ValueError, match="lpips.vgg_path"):
    tokenizer_trainer.TokenizerTrainer(config, parallel.make_mesh(config.mesh, jax.devices()[:2]), 10)


def test_optimizer_settings_reach_the_tokenizer():
  """`config.optim` reaches the trainer's optimizer whole (it once swapped in a bare Adam whenever decay_step
  was set, as every B-AE config does): a clip far below the gradient norm, or a warmup, shrink the first step."""
  first_step = {}
  for name, changes in (("plain", {}), ("clipped", {"grad_clip": 1e-12}), ("warmup", {"warmup_steps": 10})):
    config = local_config()
    config.optim.update(changes)
    trainer = tokenizer_trainer.TokenizerTrainer(config, parallel.make_mesh(config.mesh), total_steps=10)
    params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), trainer.abstract_state.params)
    grads = jax.tree_util.tree_map(np.ones_like, params)
    updates, _ = trainer.optimizer.update(grads, trainer.optimizer.init(params), params)
    first_step[name] = max(float(np.max(np.abs(u))) for u in jax.tree_util.tree_leaves(updates))
  assert first_step["plain"] == pytest.approx(config.optim.lr, rel=1e-3)  # Adam's first step: lr * sign(g)
  assert first_step["clipped"] < 1e-3 * first_step["plain"]
  assert first_step["warmup"] == 0.0  # the warmup starts at lr 0


def test_step_decay_schedule_is_the_original_piecewise_constant():
  optim = config_sections.OptimConfig.from_config(
      typed_config.load_config_file(os.path.join(ROOT, "configs", "bae_d24.py")).optim)
  assert optim.schedule == "step" and optim.decay_step == 1_500_000
  schedule = state_lib.learning_rate_schedule(optim, total_steps=1_000_000)
  assert float(schedule(1_499_999)) == pytest.approx(optim.lr)
  assert float(schedule(1_500_000)) == pytest.approx(optim.lr * 0.1)


def test_remat_from_the_config_reaches_the_train_step():
  """`config.model.remat=True` puts the blocks of the trainer's step under jax.checkpoint (its effect on
  gradients and memory: tests/test_tokenizer.py)."""
  checkpointed = {}
  for remat in (False, True):
    config = local_config()
    config.model.remat = remat
    trainer = tokenizer_trainer.TokenizerTrainer(config, parallel.make_mesh(config.mesh), total_steps=10)
    images = jax.ShapeDtypeStruct((config.batch_size, config.model.img_size, config.model.img_size, 3), np.float32)
    step = trainer._train_step  # pylint: disable=protected-access
    jaxpr = jax.make_jaxpr(step)(trainer.abstract_state, {"image": images}, jax.random.key(0))
    checkpointed[remat] = str(jaxpr).count("prevent_cse=")  # a parameter of each remat (checkpoint) call
  assert checkpointed[False] == 0 and checkpointed[True] > 0, checkpointed
