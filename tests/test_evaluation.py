"""Evaluation: FID Inception parity with PyTorch, FID / IS / precision-recall formulas, ADM batches,
resumable and sharded feature extraction, and a linear probe on scikit-learn digits.

The PyTorch reference of the FID Inception is written below with plain torch.nn from pytorch-fid's published
architecture (`pytorch_fid.inception.fid_inception_v3`: torchvision's Inception3 with FIDInceptionA/C/E_1/E_2),
because pytorch-fid and torch-fidelity need torchvision, which does not import beside torch 2.13 CPU. Where
pytorch-fid *is* importable (BIGR_PYTORCH_FID_PATH on sys.path; torchvision's meta registrations stubbed),
`test_torch_reference_is_pytorch_fid` checks that this reference equals it.
"""

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from bigr_jax import artifacts, config_sections, parallel
from bigr_jax.evaluation import features as features_lib
from bigr_jax.evaluation import inception
from bigr_jax.evaluation import linear_probe
from bigr_jax.evaluation import adm_metrics
from bigr_jax.evaluation import protocols
from bigr_jax.models import bigr
from bigr_jax.models.config import GeneratorConfig

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

# --- a PyTorch FID Inception (pytorch-fid's architecture, plain torch.nn) ---------------------------------


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for name in ("branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"):
      bd = getattr(self, name)(bd)
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.max_pool:
      pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x):
    """x: NCHW in [0, 1] -> (pool, logits, spatial NHWC[..., :7]), as pytorch-fid's InceptionV3 forward."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
    x = self.Mixed_6c(self.Mixed_6b(x))
    spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1)
    x = self.Mixed_6e(self.Mixed_6d(x))
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool, self.fc(pool), spatial


def _randomize(model, seed=0):
  """Random BatchNorm statistics and affine terms (convs keep torch's random init), eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  return model.eval()


def _close(got, want, name, tol=1e-5):
  err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
  scale = max(1e-3, float(np.max(np.abs(want))))
  assert err <= tol * scale, f"{name}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def torch_inception(tmp_path_factory):
  """(torch model with random weights, path of its state dict in the pt_inception file layout)."""
  torch.manual_seed(0)
  model = _randomize(TorchFIDInception())
  path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE
  torch.save(model.state_dict(), path)
  return model, str(path)


@pytest.fixture(scope="module")
def flax_inception(torch_inception):
  params = inception.load_params(torch_inception[1])
  apply = jax.jit(lambda p, x: inception.FIDInceptionV3().apply({"params": p}, x))
  return params, apply


@pytest.fixture(scope="module")
def parity_images():
  # Non-square and not 299: exercises pytorch-fid's bilinear resize.
  return np.random.default_rng(0).random((2, 83, 101, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_outputs(torch_inception, parity_images):
  with torch.no_grad():
    pool, logits, spatial = torch_inception[0](torch.from_numpy(parity_images.transpose(0, 3, 1, 2)))
    unbiased = pool @ torch_inception[0].fc.weight.T  # ADM's softmax input: pool_3 @ W, no bias
  return {"pool": pool.numpy(), "logits": logits.numpy(), "spatial": spatial.numpy(),
          "logits_unbiased": unbiased.numpy()}


def test_inception_matches_torch(flax_inception, torch_outputs, parity_images):
  params, apply = flax_inception
  out = apply(params, jnp.asarray(parity_images))
  assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17, 17, 7)
  for name in ("pool", "logits", "logits_unbiased", "spatial"):
    _close(out[name], torch_outputs[name], name)


def test_torch_reference_is_pytorch_fid(torch_inception, parity_images, torch_outputs):
  """Our torch.nn reference equals pytorch-fid's own network (only where pytorch-fid can be imported)."""
  extra = os.environ.get("BIGR_PYTORCH_FID_PATH")
  if extra and extra not in sys.path:
    sys.path.insert(0, extra)
  # torchvision built for another torch fails only in its meta-kernel registrations, which FID never uses.
  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
  try:
    from pytorch_fid import inception as pfi
  except Exception as e:  # noqa: BLE001  (ImportError, or torchvision failing to load)
    pytest.skip(f"pytorch-fid not importable: {e}")
  real = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  real.Mixed_5b, real.Mixed_5c, real.Mixed_5d = (pfi.FIDInceptionA(192, 32), pfi.FIDInceptionA(256, 64),
                                                 pfi.FIDInceptionA(288, 64))
  real.Mixed_6b, real.Mixed_6c = pfi.FIDInceptionC(768, 128), pfi.FIDInceptionC(768, 160)
  real.Mixed_6d, real.Mixed_6e = pfi.FIDInceptionC(768, 160), pfi.FIDInceptionC(768, 192)
  real.Mixed_7b, real.Mixed_7c = pfi.FIDInceptionE_1(1280), pfi.FIDInceptionE_2(2048)
  real.load_state_dict(torch.load(torch_inception[1], weights_only=True), strict=True)
  original = pfi.fid_inception_v3
  pfi.fid_inception_v3 = lambda: real  # no download: the network with our random weights
  try:
    net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  finally:
    pfi.fid_inception_v3 = original
  with torch.no_grad():
    pool = net(torch.from_numpy(parity_images.transpose(0, 3, 1, 2)))[0].flatten(1).numpy()
  np.testing.assert_array_equal(pool, torch_outputs["pool"])


def test_converter_rejects_other_state_dicts(torch_inception):
  state_dict = torch.load(torch_inception[1], weights_only=True)
  assert "Mixed_5b.branch1x1.bn.num_batches_tracked" in state_dict  # ignored by the converter
  broken = dict(state_dict)
  del broken["Mixed_6d.branch1x1.conv.weight"]
  with pytest.raises(ValueError, match="missing params"):
    inception.params_from_torch(broken)
  broken = dict(state_dict, **{"Mixed_5b.extra.conv.weight": torch.zeros(1)})
  with pytest.raises(ValueError, match="unknown keys"):
    inception.params_from_torch(broken)
  with pytest.raises(FileNotFoundError, match="inception_weights"):
    inception.load_params("/nonexistent/" + inception.WEIGHTS_FILE)


def test_resize_matches_torch_interpolate():
  x = np.random.default_rng(1).random((2, 40, 517, 3)).astype(np.float32)  # upsampled rows, downsampled cols
  want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
                       align_corners=False).numpy().transpose(0, 2, 3, 1)
  _close(inception.resize_bilinear(jnp.asarray(x)), want, "resize", tol=1e-6)


# --- metric formulas ----------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero():
  acts = np.random.default_rng(0).standard_normal((300, 32)) @ np.random.default_rng(1).standard_normal((32, 32))
  stats_ = adm_metrics.FIDStatistics.from_activations(acts)
  assert abs(stats_.frechet_distance(stats_)) < 1e-6 * np.trace(stats_.sigma)


def _closed_form_fid(mu1, sigma1, mu2, sigma2):
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  trace_sqrt = np.sum(np.sqrt(np.clip(inner, 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def test_fid_of_two_gaussians_matches_the_closed_form():
  rng = np.random.default_rng(0)
  d = 6
  a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  sigma1, sigma2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
  exact = _closed_form_fid(mu1, sigma1, mu2, sigma2)
  got = adm_metrics.frechet_distance(adm_metrics.FIDStatistics(mu1, sigma1), adm_metrics.FIDStatistics(mu2, sigma2))
  assert got == pytest.approx(exact, rel=1e-8)
  # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2.
  s1, s2 = rng.random(d) + 0.5, rng.random(d) + 0.5
  got = adm_metrics.frechet_distance(adm_metrics.FIDStatistics(mu1, np.diag(s1)), adm_metrics.FIDStatistics(mu2, np.diag(s2)))
  assert got == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2), rel=1e-8)
  # From samples: the estimate converges to the Gaussians' distance.
  x1 = rng.multivariate_normal(mu1, sigma1, size=200000)
  x2 = rng.multivariate_normal(mu2, sigma2, size=200000)
  sampled = adm_metrics.FIDStatistics.from_activations(x1).frechet_distance(adm_metrics.FIDStatistics.from_activations(x2))
  assert sampled == pytest.approx(exact, rel=0.02)


def test_inception_score_matches_reference_formula():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((23, 11)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  split = 7  # 23 = 7 + 7 + 7 + 2: the last, short split counts as ADM's does
  want = np.mean([np.exp(np.mean([stats.entropy(p, part.mean(0)) for p in part]))
                  for part in (probs[i:i + split] for i in range(0, len(probs), split))])
  assert adm_metrics.inception_score(probs, split_size=split) == pytest.approx(want, rel=1e-10)
  uniform = np.full((10, 5), 0.2)
  assert adm_metrics.inception_score(uniform) == pytest.approx(1.0)
  one_hot = np.eye(5)[np.arange(10) % 5] * (1 - 5e-9) + 1e-9
  assert adm_metrics.inception_score(one_hot) == pytest.approx(5.0, rel=1e-6)


def _reference_precision_recall(ref, samples, k):
  from scipy.spatial.distance import cdist
  radii_ref = np.sort(cdist(ref, ref, "sqeuclidean"), axis=1)[:, k]
  radii_samples = np.sort(cdist(samples, samples, "sqeuclidean"), axis=1)[:, k]
  d = cdist(ref, samples, "sqeuclidean")
  precision = np.mean((d <= radii_ref[:, None]).any(axis=0))
  recall = np.mean((d <= radii_samples[None, :]).any(axis=1))
  return precision, recall


@pytest.mark.parametrize("block", [16, 10000])
def test_precision_recall_matches_reference(block):
  rng = np.random.default_rng(0)
  ref = rng.standard_normal((45, 8)).astype(np.float32)
  samples = (rng.standard_normal((37, 8)) * 1.4 + 0.5).astype(np.float32)
  want = _reference_precision_recall(ref.astype(np.float64), samples.astype(np.float64), 3)
  got = adm_metrics.precision_recall(ref, samples, k=3, block=block)
  assert got == pytest.approx(want)
  assert 0 < got[0] < 1 and 0 < got[1] < 1
  assert adm_metrics.precision_recall(ref, ref, k=3, block=block) == (1.0, 1.0)
  half = adm_metrics.precision_recall(ref, samples, k=3, block=block, dtype="float16")
  assert half == pytest.approx(want, abs=0.05)


def test_adm_npz_layout_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (9, 80, 76, 3), dtype=np.uint8)
  labels = rng.integers(0, 1000, 9)
  path = adm_metrics.write_sample_batch(str(tmp_path / "samples.npz"), images, labels)
  with np.load(path) as data:
    np.testing.assert_array_equal(data["arr_0"], images)
    np.testing.assert_array_equal(data["arr_1"], labels)
  np.testing.assert_array_equal(np.concatenate(list(adm_metrics.iterate_npz_array(path, batch_size=4))), images)
  assert [len(b) for b in adm_metrics.iterate_npz_array(path, batch_size=4, limit=6)] == [4, 2]
  np.savez_compressed(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(3), sigma=np.eye(3))
  compressed = adm_metrics.iterate_npz_array(str(tmp_path / "ref.npz"), batch_size=5)
  np.testing.assert_array_equal(np.concatenate(list(compressed)), images)
  assert adm_metrics.read_reference_statistics(str(tmp_path / "ref.npz"))[0].sigma.shape == (3, 3)
  assert adm_metrics.read_reference_statistics(path) is None
  with pytest.raises(ValueError, match="nothing was saved"):
    with adm_metrics.SampleBatchWriter(str(tmp_path / "short.npz"), 5, (8, 8)) as writer:
      writer.append(images[:2, :8, :8], labels[:2])
  assert not os.path.exists(tmp_path / "short.npz")
  np.testing.assert_array_equal(adm_metrics.images_to_uint8(np.array([0.0, 0.5, 1.0, 1.2])), [0, 128, 255, 255])


def _cheap_frechet(stats1, stats2, eps=1e-6):
  """Stands in for the Frechet distance, whose 2048-d sqrtm takes minutes on a 2-core machine; it still
  depends on both statistics, so the comparison below checks them. The formula is tested above."""
  del eps
  return float(np.sum((stats1.mu - stats2.mu) ** 2) + np.trace(stats1.sigma) - np.trace(stats2.sigma))


def test_evaluate_samples_end_to_end(tmp_path, flax_inception, parity_images, monkeypatch):
  """Reference and sample batches on disk -> metrics, through the Inception sharded over 2 devices."""
  monkeypatch.setattr(adm_metrics, "frechet_distance", _cheap_frechet)
  rng = np.random.default_rng(0)
  # The parity images' shape, so the unsharded comparison below reuses the compiled network.
  reference = rng.integers(0, 256, (6,) + parity_images.shape[1:], dtype=np.uint8)
  samples = np.concatenate([reference[:3], rng.integers(0, 256, (3,) + parity_images.shape[1:], dtype=np.uint8)])
  np.savez(tmp_path / "ref.npz", arr_0=reference)
  # Where --mode=evaluate puts (and finds) its sample batch.
  adm_metrics.write_sample_batch(str(artifacts.output_path(tmp_path, artifacts.EVALUATION_SAMPLES)), samples, np.arange(6))
  config = ml_collections.ConfigDict({"evaluation": {"reference_batch": str(tmp_path / "ref.npz"), "batch_size": 2},
                                      "mesh": {"data": 2, "fsdp": 1, "tensor": 1}})
  mesh = _mesh(2, 1, 1, jax.devices()[:2])
  result = protocols.evaluate_samples(config, str(tmp_path), inception_params=flax_inception[0], mesh=mesh)
  assert set(result) >= {"fid", "sfid", "inception_score", "precision", "recall"}
  assert json.loads((tmp_path / "evaluation.json").read_text())["fid"] == pytest.approx(result["fid"])
  with pytest.raises(FileExistsError, match="evaluation.json exists"):  # a finished evaluation is kept
    protocols.evaluate_samples(config, str(tmp_path), inception_params=flax_inception[0], mesh=mesh)
  (tmp_path / "evaluation.json").write_text("{}")
  again = protocols.evaluate_samples(config, str(tmp_path), inception_params=flax_inception[0], mesh=mesh,
                                   overwrite=True)
  assert json.loads((tmp_path / "evaluation.json").read_text())["fid"] == pytest.approx(again["fid"])
  # The same metrics from unsharded activations.
  params, apply = flax_inception
  acts = {}
  for name, images in (("ref", reference), ("samples", samples)):
    outs = [apply(params, jnp.asarray(images[i:i + 2], jnp.float32) / 255.0) for i in range(0, 6, 2)]
    acts[name] = adm_metrics.Activations(
        np.concatenate([o["pool"] for o in outs]), np.concatenate([o["spatial"] for o in outs]).reshape(6, -1),
        np.concatenate([jax.nn.softmax(o["logits_unbiased"]) for o in outs]))
  want = adm_metrics.compute_metrics(acts["ref"], acts["samples"])
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert result[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
  # A second evaluation takes the reference activations from the cache (the runner is not called).
  class NoRunner:
    def npz_activations(self, *args, **kwargs):
      raise AssertionError("reference activations were recomputed")

  cached = protocols.reference_activations(NoRunner(), str(tmp_path / "ref.npz"), str(tmp_path / "evaluation_cache"),
                                         "given")
  np.testing.assert_allclose(cached.pool, acts["ref"].pool, rtol=1e-4, atol=1e-5)


# --- features -----------------------------------------------------------------------------------------------

TINY = GeneratorConfig(dim=64, n_layer=3, n_head=4, denoise_hidden_dim=64, num_block_mlp=2, block_size=16,
                       seq_len=16, num_classes=10, binary_size=16)


def _mesh(data, fsdp, tensor, devices=None):
  return parallel.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices)


@pytest.fixture(scope="module")
def tiny_params():
  import flax.linen as flax_nn
  params = flax_nn.meta.unbox(jax.jit(bigr.init_params, static_argnums=0)(TINY, jax.random.key(0)))
  return jax.tree_util.tree_map(np.asarray, params)


@pytest.fixture(scope="module")
def sharded_extractor(tiny_params):
  return features_lib.FeatureExtractor(TINY, tiny_params, [0, -1], mesh=_mesh(2, 2, 2))


class RandomCodes:
  """A random-access code source: dict(codes=(T, K) uint8, label)."""

  def __init__(self, n, seed=0):
    rng = np.random.default_rng(seed)
    self.codes = (rng.random((n, TINY.seq_len, TINY.binary_size)) < 0.5).astype(np.uint8)
    self.labels = rng.integers(0, TINY.num_classes, n).astype(np.int32)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"codes": self.codes[i], "label": self.labels[i]}


def test_features_resume_after_interruption(tmp_path, sharded_extractor, tiny_params):
  source = RandomCodes(37)  # batches of 8: 4 full + 1 partial; 2 batches per chunk -> 3 chunks
  batches = lambda start: features_lib.batches_from_source(source, 8, start=start)  # noqa: E731
  full = features_lib.write_features(sharded_extractor, batches, str(tmp_path / "full"), batches_per_chunk=2)
  assert full["done"] and full["count"] == 37 and full["chunks"] == 3 and full["layers"] == [0, 2]

  def crashing(start):
    for i, batch in enumerate(batches(start)):
      if i == 3:
        raise KeyboardInterrupt("preempted")
      yield batch

  with pytest.raises(KeyboardInterrupt):
    features_lib.write_features(sharded_extractor, crashing, str(tmp_path / "resumed"), batches_per_chunk=2)
  progress = features_lib.read_progress(str(tmp_path / "resumed"))
  assert progress["chunks"] == 1 and progress["count"] == 16 and not progress["done"]
  with pytest.raises(ValueError, match="stopped after 16"):
    features_lib.load_features(str(tmp_path / "resumed"))
  # Resume from a plain iterable (advanced past the finished batches), not the callable.
  features_lib.write_features(sharded_extractor, batches(0), str(tmp_path / "resumed"), batches_per_chunk=2)
  want, want_labels = features_lib.load_features(str(tmp_path / "full"))
  got, got_labels = features_lib.load_features(str(tmp_path / "resumed"))
  np.testing.assert_array_equal(got_labels, source.labels)
  np.testing.assert_array_equal(want_labels, got_labels)
  for layer in (0, 2):
    assert got[layer].shape == (37, TINY.dim)
    np.testing.assert_array_equal(got[layer], want[layer])
  with pytest.raises(ValueError, match="another run"):
    other = features_lib.FeatureExtractor(TINY, tiny_params, [1], mesh=sharded_extractor.mesh)
    features_lib.write_features(other, batches, str(tmp_path / "full"))


def test_sharded_features_equal_single_device(sharded_extractor, tiny_params):
  single = features_lib.FeatureExtractor(TINY, tiny_params, [0, 2], mesh=_mesh(1, 1, 1, jax.devices()[:1]))
  source = RandomCodes(16, seed=1)
  batch = next(features_lib.batches_from_source(source, 16))
  got = sharded_extractor.host_batch(batch["bits"], batch["label"], batch["valid"])[0]
  want = single.host_batch(batch["bits"], batch["label"], batch["valid"])[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Pooling is the token mean of BiGR.features with the null class.
  hidden = bigr.BiGR(TINY).apply({"params": tiny_params}, jnp.asarray(batch["bits"], jnp.float32),
                                 jnp.full((16,), TINY.null_class), [0, 2], method=bigr.BiGR.features)
  np.testing.assert_allclose(want[:, 1], np.asarray(hidden[2]).mean(axis=1), rtol=1e-5, atol=1e-5)
  # The class input matters: real labels give other features than the null class.
  labelled = features_lib.FeatureExtractor(TINY, tiny_params, [0, 2], mesh=single.mesh, condition="label")
  assert not np.allclose(labelled.host_batch(batch["bits"], batch["label"], batch["valid"])[0], want)


def test_entry_points_extract_and_probe(tmp_path, tiny_params):
  """extract_features + probe_features on the runlocal stand-in codes (data.name='synthetic')."""
  fields = {f: getattr(TINY, f) for f in ("dim", "n_layer", "n_head", "denoise_hidden_dim", "num_block_mlp",
                                          "block_size", "seq_len", "num_classes", "binary_size")}
  config = ml_collections.ConfigDict({
      "seed": 0, "model": fields, "data": {"name": "synthetic"}, "mesh": {"data": 4, "fsdp": 2, "tensor": 1},
      "evaluation": {"layers": (1,), "batch_size": 96, "batches_per_chunk": 2,
                     "probe": {"epochs": 20, "batch_size": 64, "base_lr": 20.0, "warmup_epochs": 2}}})
  dirs = protocols.extract_features(config, str(tmp_path), params=tiny_params)
  assert set(dirs) == {"train", "validation"}
  train, labels = features_lib.load_features(dirs["train"])
  assert train[1].shape == (512, TINY.dim) and labels.shape == (512,)
  result = protocols.probe_features(config, str(tmp_path))
  assert set(result["layers"]) == {1} and result["best_layer"] == 1
  assert result["best_top1"] > 50  # 10 classes of noisy fixed patterns
  assert json.loads((tmp_path / "linear_probe.json").read_text())["best_layer"] == 1
  with pytest.raises(FileNotFoundError, match="evaluation.params"):
    protocols.extract_features(config, str(tmp_path / "empty"))
  # evaluation.params: a converted params checkpoint.
  from bigr_jax.weights import params_io
  params_io.save_params(tiny_params, tmp_path / "params")
  config.evaluation.params = str(tmp_path / "params")
  loaded = protocols.load_generator_params(config, str(tmp_path / "empty"), TINY)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, loaded), tiny_params)


def test_evaluation_config_checks():
  config = ml_collections.ConfigDict({"evaluation": {"layers": (3,), "probe": {"epochs": 5}}})
  ev = protocols.evaluation_config(config)
  assert ev.layers == (3,) and ev.probe.epochs == 5 and ev.probe.batch_size == 16384
  with pytest.raises(ValueError, match=r"unknown config.evaluation field\(s\) \['layer'\]"):
    protocols.evaluation_config(ml_collections.ConfigDict({"evaluation": {"layer": 3}}))
  with pytest.raises(ValueError, match="condition"):
    protocols.evaluation_config(ml_collections.ConfigDict({"evaluation": {"condition": "cls"}}))
  assert features_lib.resolve_layers((), 24) == [12]
  assert features_lib.resolve_layers((-1, 3, 3), 24) == [3, 23]
  with pytest.raises(ValueError, match="out of range"):
    features_lib.resolve_layers((24,), 24)


# --- linear probe -------------------------------------------------------------------------------------------


def test_lr_schedule_is_maes():
  config = config_sections.ProbeConfig(epochs=10, batch_size=512, base_lr=0.1, warmup_epochs=2, min_lr=0.01)
  schedule = linear_probe.lr_schedule(config, steps_per_epoch=4)
  assert config.lr == pytest.approx(0.2)
  assert float(schedule(0)) == 0.0 and float(schedule(4)) == pytest.approx(0.1)  # half-way through warmup
  assert float(schedule(8)) == pytest.approx(0.2)
  assert float(schedule(24)) == pytest.approx(0.01 + 0.19 * 0.5 * (1 + np.cos(np.pi * 4 / 8)))


def _random_tokenizer_codes(images, bits=16):
  """Codes of a random B-AE (params drawn with numpy, no init compile), thresholded bit probabilities."""
  from bigr_jax.models import tokenizer
  config = tokenizer.TokenizerConfig(codebook_size=bits, img_size=16, nf=32, ch_mult=(1, 1, 2), res_blocks=1,
                                     attn_resolutions=(), emb_dim=32)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  import flax.linen as flax_nn
  params = jax.tree_util.tree_map_with_path(draw, flax_nn.meta.unbox(tokenizer.param_shapes(config)))
  encode = jax.jit(lambda p, x: tokenizer.BinaryAutoEncoder(config).apply({"params": p}, x, deterministic=True,
                                                                           method="encode")[1])
  codes = np.concatenate([np.asarray(encode(params, images[i:i + 512])) for i in range(0, len(images), 512)])
  return codes.reshape(len(codes), -1, bits).astype(np.uint8)


def test_linear_probe_on_digits(tmp_path, sharded_extractor, tiny_params, capsys):
  """Raw pixels vs pooled features of a random BiGR on codes of a random tokenizer; both well above chance."""
  from bigr_jax.data import DigitsSource
  data = {}
  for split in ("train", "test"):
    source = DigitsSource(split=split, image_size=16)
    images = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32) / 255.0
    data[split] = (images, source.labels)
  probe = config_sections.ProbeConfig(epochs=30, batch_size=256, base_lr=10.0, warmup_epochs=3)
  pixels = linear_probe.train_probe(data["train"][0].reshape(len(data["train"][0]), -1), data["train"][1],
                                    data["test"][0].reshape(len(data["test"][0]), -1), data["test"][1], probe)
  codes = {split: _random_tokenizer_codes(data[split][0]) for split in data}
  feats = {}
  for split in data:
    class Source:
      def __len__(self):
        return len(codes[split])

      def __getitem__(self, i):
        return {"codes": codes[split][i], "label": data[split][1][i]}

    directory = str(tmp_path / split)
    source = Source()
    batches = lambda start, s=source: features_lib.batches_from_source(s, 256, start=start)  # noqa: E731
    features_lib.write_features(sharded_extractor, batches, directory, batches_per_chunk=2)
    feats[split] = features_lib.load_features(directory)
  sweep = linear_probe.layer_sweep(feats["train"][0], feats["train"][1], feats["test"][0], feats["test"][1], probe)
  with capsys.disabled():
    print(f"\n[linear probe on digits, {len(data['train'][1])} train / {len(data['test'][1])} test] raw pixels: "
          f"top1 {pixels['top1']:.1f} top5 {pixels['top5']:.1f}; random-BiGR pooled features: " +
          ", ".join(f"layer {l} top1 {r['top1']:.1f} top5 {r['top5']:.1f}" for l, r in sweep["layers"].items()))
  assert pixels["top1"] > 90
  assert sweep["best_top1"] > 30  # chance is 10
  assert set(sweep["layers"]) == {0, 2}


def _gaussian_classes(num_classes=10, dim=64, seed=0):
  """Separable classes: unit Gaussians around random means (a linear classifier reaches ~99%)."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(num_classes, dim)) * 0.6

  def draw(n):
    labels = rng.integers(0, num_classes, n)
    return (means[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels
  return draw(2000), draw(1000)


def test_convex_probe_fits_classes_with_a_known_answer_and_mae_recipe_warns_on_a_small_set():
  (train_x, train_y), (test_x, test_y) = _gaussian_classes()
  result = linear_probe.train_probe(train_x, train_y, test_x, test_y, config_sections.ProbeConfig(optimizer="lbfgs"))
  assert result["top1"] >= 95 and result["train_top1"] >= 95, result
  assert result["converged"] and not result["fit_warning"] and result["l2"] in config_sections.ProbeConfig().l2_grid
  assert result["final_loss"] < 0.5 * np.log(10)
  # MAE's recipe, as the demo had it: ~200 LARS steps leave the head at its initialisation, and it says so.
  lars = linear_probe.train_probe(train_x, train_y, test_x, test_y, config_sections.ProbeConfig(
      epochs=30, batch_size=256, eval_batch_size=512, warmup_epochs=3.0))
  assert lars["top1"] < 50 and "did not fit" in lars["fit_warning"], lars


def test_convex_probe_chooses_its_penalty_on_held_out_training_rows():
  (train_x, train_y), (test_x, test_y) = _gaussian_classes(dim=256)
  config = config_sections.ProbeConfig(optimizer="lbfgs", l2_grid=(1e-6, 1.0), max_iter=300)
  result = linear_probe.train_probe(train_x[:300], train_y[:300], test_x, test_y, config)
  assert set(result["val_top1"]) == {1e-6, 1.0}
  assert result["l2"] == max(result["val_top1"], key=lambda l2: (result["val_top1"][l2], l2))
  with pytest.raises(ValueError, match="l2_grid"):
    config_sections.ProbeConfig(optimizer="lbfgs", l2_grid=())
  with pytest.raises(ValueError, match="probe optimizer 'adam'"):
    config_sections.ProbeConfig(optimizer="adam")
