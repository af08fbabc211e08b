"""Zero-shot applications on the tiny recorded generator (4 x 4 tokens, 8 bits), against the original's procedures."""

import jax
import numpy as np
import pytest
from PIL import Image

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
