"""Zero-shot applications on the tiny recorded generator (4 x 4 tokens, 8 bits), against the original's procedures;
the seamless cloning that ends the original's edits; the decoding-order strip."""

import cv2
import jax
import numpy as np
import pytest
from PIL import Image

from bigr_jax import images as images_lib
from bigr_jax.sampling import editing, sampler, schedules
from test_sampler import reference_complete, tiny  # noqa: F401  (tiny is a module fixture)

CONFIG = editing.EDIT_CONFIG.replace(num_iter=5, transcode_sizes=2)  # fewer padded sizes: faster to compile
# Row-major 4 x 4 grid: 6 tokens to regenerate (a 2 x 3 box), 10 known.
BOX = np.zeros((4, 4), bool)
BOX[1:3, 0:3] = True


def _input_bits(cfg, batch=2, seed=0):
  return np.random.default_rng(seed).integers(0, 2, (batch, cfg.seq_len, cfg.binary_size)).astype(np.float32)


@pytest.fixture(scope="module")
def inpainted(tiny):  # noqa: F811
  cfg, params = tiny
  bits = _input_bits(cfg)
  return bits, editing.inpaint(cfg, params, bits, BOX, jax.random.key(3), label=4, config=CONFIG)


def test_mask_from_image(tmp_path):
  image = np.zeros((256, 256, 3), np.uint8)
  image[40:130, 16:100] = 255
  path = tmp_path / "mask.png"
  Image.fromarray(image).save(path)
  want = np.zeros((16, 16), bool)
  want[3:9, 1:7] = True  # pixels 16 i: rows 48..128, columns 16..96
  np.testing.assert_array_equal(editing.mask_from_image(path), want)
  np.testing.assert_array_equal(editing.mask_from_image(image[..., 0]), want)  # one channel
  # A larger, non-square mask is centre-cropped (box halving + bicubic) first, as the original.
  big = np.zeros((512, 768), np.uint8)
  big[:, 128:] = 255
  got = editing.mask_from_image(big)
  assert got.shape == (16, 16) and got.all()


def test_token_mask_shapes_and_errors(tiny):  # noqa: F811
  cfg, _ = tiny
  flat = BOX.reshape(-1)
  for mask in (BOX, flat, np.stack([BOX, BOX]), np.stack([flat, flat]), BOX.astype(int)):
    np.testing.assert_array_equal(editing.token_mask(mask, 2, cfg), np.stack([flat, flat]))
  for bad in (np.zeros((3, 3), bool), np.zeros((15,), bool), np.zeros((3, 16), bool)):
    with pytest.raises(ValueError, match="token grid"):
      editing.token_mask(bad, 2, cfg)
  with pytest.raises(ValueError, match="boolean"):
    editing.token_mask(np.full((4, 4), 2), 2, cfg)


def test_inpaint_keeps_known_tokens(tiny, inpainted):  # noqa: F811
  cfg, _ = tiny
  bits, out = inpainted
  out_bits, decoded_at = np.asarray(out.bits), np.asarray(out.decoded_at)
  known = ~BOX.reshape(-1)
  np.testing.assert_array_equal(out_bits[:, known], bits[:, known])
  assert (decoded_at[:, known] == -1).all()
  # Every masked token decoded once, by the linear schedule over the masked count.
  counts = schedules.unmask_counts(int(BOX.sum()), CONFIG.num_iter, "linear")
  for row in decoded_at:
    np.testing.assert_array_equal(np.bincount(row[~known], minlength=CONFIG.num_iter), counts)


def test_inpaint_matches_reference(tiny, inpainted):  # noqa: F811
  cfg, params = tiny
  bits, out = inpainted
  regenerate = np.broadcast_to(BOX.reshape(1, -1), (2, cfg.seq_len)).copy()
  want = reference_complete(cfg, params, np.array([4, 4]), jax.random.key(3), bits, regenerate, CONFIG)
  np.testing.assert_array_equal(np.asarray(out.bits), want)


@pytest.mark.parametrize("known_more", [True, False], ids=["known>masked", "known<masked"])
def test_resample_known_matches_original_budget(tiny, known_more):  # noqa: F811
  """The original's budget (known count): re-samples known tokens, or fills leftovers in a final pass."""
  cfg, params = tiny
  bits = _input_bits(cfg, seed=1)
  mask = BOX if known_more else ~BOX
  out = editing.inpaint(cfg, params, bits, mask, jax.random.key(5), label=[2, 9],
                        config=CONFIG.replace(resample_known=True))
  regenerate = np.broadcast_to(mask.reshape(1, -1), (2, cfg.seq_len)).copy()
  want = reference_complete(cfg, params, np.array([2, 9]), jax.random.key(5), bits, regenerate,
                            CONFIG.replace(resample_known=True))
  np.testing.assert_array_equal(np.asarray(out.bits), want)
  decoded_at = np.asarray(out.decoded_at)
  assert (decoded_at[regenerate] >= 0).all()
  if known_more:
    assert (decoded_at[~regenerate] >= 0).any()  # known tokens were re-sampled
  else:
    assert (decoded_at == CONFIG.num_iter).any()  # the final pass ran


def test_rows_with_different_masks(tiny):  # noqa: F811
  cfg, params = tiny
  bits = _input_bits(cfg)
  masks = np.zeros((2, cfg.seq_len), bool)
  masks[0, :3] = True
  masks[1, 5:15] = True
  out = editing.inpaint(cfg, params, bits, masks, jax.random.key(1), label=4, config=CONFIG)
  decoded_at = np.asarray(out.decoded_at)
  for row, mask in zip(decoded_at, masks):
    assert (row[~mask] == -1).all()
    counts = schedules.unmask_counts(int(mask.sum()), CONFIG.num_iter, "linear")
    np.testing.assert_array_equal(np.bincount(row[mask], minlength=CONFIG.num_iter), counts)
  np.testing.assert_array_equal(np.asarray(out.bits)[~masks], bits[~masks])


def test_outpaint_and_class_edit(tiny):  # noqa: F811
  cfg, params = tiny
  bits = _input_bits(cfg, seed=2)
  out = editing.outpaint(cfg, params, bits, BOX, jax.random.key(0), label=4, config=CONFIG)
  box = BOX.reshape(-1)
  np.testing.assert_array_equal(np.asarray(out.bits)[:, box], bits[:, box])
  assert (np.asarray(out.decoded_at)[:, ~box] >= 0).all()
  edited = editing.edit_class(cfg, params, bits, BOX, 4, jax.random.key(0), config=CONFIG)
  np.testing.assert_array_equal(np.asarray(edited.bits)[:, ~box], bits[:, ~box])
  with pytest.raises(ValueError, match="out of range"):
    editing.edit_class(cfg, params, bits, BOX, cfg.num_classes + 1, jax.random.key(0), config=CONFIG)
  with pytest.raises(ValueError, match="token grid"):
    editing.inpaint(cfg, params, bits, np.ones((8, 8), bool), jax.random.key(0), config=CONFIG)


def test_interpolation_matches_reference(tiny):  # noqa: F811
  cfg, params = tiny
  config = editing.INTERPOLATE_CONFIG.replace(num_iter=4, transcode_sizes=2)
  weights = (1.0, 0.3, 0.0)
  out = editing.interpolate(cfg, params, 2, 7, jax.random.key(4), weights=weights, config=config)
  labels = np.array([[2, 7]] * 3)
  label_weights = np.array([[w, 1 - w] for w in weights], np.float32)
  shape = (3, cfg.seq_len)
  want = reference_complete(cfg, params, labels, jax.random.key(4), np.zeros(shape + (cfg.binary_size,)),
                            np.ones(shape, bool), config, label_weights=label_weights)
  np.testing.assert_array_equal(np.asarray(out.bits), want)
  with pytest.raises(ValueError, match="out of range"):
    editing.interpolate(cfg, params, 2, 70, jax.random.key(4), weights=weights, config=config)


def test_enrichment_masks_match_the_original_layout():
  grid, ds = 8, 2
  order = [2, 0, 3, 1]
  masks = editing.enrichment_masks(grid, ds, order)
  # The original: a (1, low, low, ds^2) mask, reshaped to (low, low, ds, ds), permuted (0, 1, 3, 2, 4).
  low = grid // ds
  for group, mask in enumerate(masks):
    sub = np.zeros((1, low, low, ds * ds))
    sub[..., order[group::4]] = 1
    want = sub.reshape(1, low, low, ds, ds).transpose(0, 1, 3, 2, 4).reshape(-1).astype(bool)
    np.testing.assert_array_equal(mask, want)
  np.testing.assert_array_equal(masks.sum(0), np.ones(grid * grid))
  with pytest.raises(ValueError, match="divisible"):
    editing.enrichment_masks(9, 2, order)


def test_enrich(tiny):  # noqa: F811
  cfg, params = tiny
  bits = _input_bits(cfg, seed=3)
  config = editing.ENRICH_CONFIG.replace(num_iter=4, transcode_sizes=2)
  out = np.asarray(editing.enrich(cfg, params, bits, jax.random.key(0), repeats=2, config=config))
  assert out.shape == bits.shape and set(np.unique(out)) <= {0.0, 1.0}
  assert (out != bits).any()
  again = np.asarray(editing.enrich(cfg, params, bits, jax.random.key(0), repeats=2, config=config))
  np.testing.assert_array_equal(out, again)


# -- seamless cloning, as apps/inpaint.py ends an edit --------------------------------------------------------


def _smooth_image(size=32, phase=0):
  rows, cols = np.mgrid[:size, :size]
  return np.stack([(cols * 7 + rows * 3 + phase) % 200 + 20, (rows * 5 + phase) % 200 + 20,
                   (cols * rows + phase) % 200 + 20], -1).astype(np.float32) / 255.0


@pytest.mark.parametrize("box", [(4, 12, 3, 20), (4, 13, 3, 21), (0, 16, 0, 32), (0, 15, 5, 32), (10, 32, 0, 17),
                                 (5, 32, 6, 32), (0, 32, 0, 32)])
def test_seamless_clone_lands_where_it_was_cut(box):
  """Cloning an image into itself returns it, for regions of odd and even sizes and regions touching the image
  border: the region is placed exactly where it was cut."""
  top, bottom, left, right = box
  mask = np.zeros((32, 32), bool)
  mask[top:bottom, left:right] = True
  image = _smooth_image()
  np.testing.assert_allclose(images_lib.seamless_clone(image, image, mask), image, atol=1.5 / 255)


def test_seamless_clone_changes_the_inside_only_and_agrees_with_the_original_on_its_boxes():
  source, destination = _smooth_image().transpose(1, 0, 2)[..., ::-1], _smooth_image()
  mask = np.zeros((32, 32), bool)
  mask[8:21, 5:24] = True  # 13 x 19: odd, as the original's adjust_mask makes every box, away from the border
  cloned = images_lib.seamless_clone(source, destination, mask)
  np.testing.assert_array_equal(cloned[~mask], images_lib.to_uint8(destination)[~mask] / np.float32(255))
  assert np.abs(cloned - destination)[mask].mean() > 0.03  # it took the source's gradients (measured 0.055)
  # The original's call: the centre is the mean of the mask's pixels.
  rows, cols = np.nonzero(mask)
  original = cv2.seamlessClone(images_lib.to_uint8(source), images_lib.to_uint8(destination),
                               mask.astype(np.uint8) * 255, (int(cols.mean()), int(rows.mean())), cv2.NORMAL_CLONE)
  np.testing.assert_array_equal(images_lib.to_uint8(cloned), original)


def test_seamless_clone_refuses_a_mask_too_thin_to_clone():
  mask = np.zeros((32, 32), bool)
  mask[:2] = True  # OpenCV clears the outermost ring: one row is left
  with pytest.raises(ValueError, match="too thin"):
    images_lib.seamless_clone(_smooth_image(), _smooth_image(), mask)


def test_check_rgb_names_what_is_not_a_colour_picture():
  rgb = Image.new("RGB", (4, 4), (10, 20, 30))
  assert images_lib.check_rgb(rgb) is rgb
  assert images_lib.check_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 255))).mode == "RGB"  # opaque: fine
  with pytest.raises(ValueError, match="has transparent pixels"):
    images_lib.check_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 128)), "the picture")
  with pytest.raises(ValueError, match="is L, not RGB"):
    images_lib.check_rgb(Image.new("L", (4, 4)), "the picture")


def test_decoding_strip_shows_each_iterations_tokens():
  images = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
  decoded_at = np.array([[0, 1, 2, -1], [2, 2, 0, 1]])  # 2 x 2 tokens of 4 x 4 pixels; -1: given
  strip = images_lib.decoding_strip(images, decoded_at, num_iter=3, padding=0)
  assert strip.shape == (16, 24, 3)
  frames = strip.reshape(2, 8, 3, 8, 3).transpose(0, 2, 1, 3, 4)  # (image, iteration, H, W, C)
  for b in range(2):
    for t in range(3):
      for token in range(4):
        r, c = divmod(token, 2)
        patch = frames[b, t, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
        want = images[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4] if decoded_at[b, token] <= t else np.full((4, 4, 3), 0.5)
        np.testing.assert_array_equal(patch, images_lib.to_uint8(want))


def test_seamless_clone_mean_center_is_the_originals():
  """clone_center="mean": apps/inpaint.py's adjust_mask and mean centre. On the top half (the demo's mask), which
  touches the image border, that lands a pixel off (cloning an image into itself changes it); "box" does not."""
  image = _smooth_image()
  mask = np.zeros((32, 32), bool)
  mask[:16] = True
  adjusted = mask.copy()
  adjusted[16] = True  # adjust_mask's extra row; its extra column, left of column 0, wraps to column 31
  rows, cols = np.nonzero(adjusted)
  original = cv2.seamlessClone(images_lib.to_uint8(image), images_lib.to_uint8(image), adjusted.astype(np.uint8) * 255,
                               (int(cols.mean()), int(rows.mean())), cv2.NORMAL_CLONE)
  np.testing.assert_array_equal(images_lib.to_uint8(images_lib.seamless_clone(image, image, mask, "mean")), original)
  assert np.abs(original.astype(float) - images_lib.to_uint8(image)).max() > 100  # a pixel off
  np.testing.assert_allclose(images_lib.seamless_clone(image, image, mask, "box"), image, atol=1.5 / 255)
