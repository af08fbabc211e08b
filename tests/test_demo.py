"""The embedded demo through the command line, as a user types it: every stage, then every other mode on its
workdir (sample, edit, features, encode, evaluate, sweep, compile), on the shared quick demo (conftest.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from bigr_jax import data
from bigr_jax.evaluation import features
from conftest import ROOT, run_quick_demo, user_env
# configs/demo.py:quick trains each stage briefly: 20% and 35% of its samples were recognised in two runs of 20
# (chance 10%). Of 50, chance recognises 10 or more with probability 2.5%.
QUICK_ACCURACY = 0.2


@pytest.mark.xdist_group("quick_demo")  # with the app's test: the other worker never waits for the demo
def test_demo_then_sample_edit_features_and_evaluate_on_its_workdir(quick_demo):
  workdir, out = quick_demo
  summary = json.loads((workdir / "demo.json").read_text())
  assert summary["num_samples"] == 50
  assert summary["real_digit_accuracy"] > 0.9  # the judge itself is sound
  assert summary["sample_class_accuracy"] >= QUICK_ACCURACY, summary
  samples, ceiling, floor = (summary["quality"][k] for k in ("samples", "ceiling", "floor"))
  assert floor["recall"] > 0.8 and floor["num_images"] == samples["num_images"] == ceiling["num_images"] == 50
  assert floor["fd"] < samples["fd"] < 10 * floor["fd"], summary["quality"]  # worse than real, not noise
  # The B-AE's reconstructions of the held-out digits lie between: the tokenizer's share of the gap.
  assert floor["fd"] < ceiling["fd"] < samples["fd"], summary["quality"]
  assert "B-AE" in out
  # The digits are grey, and so are the samples: every channel equal.
  saved = np.load(workdir / "samples.npz")["arr_0"]
  assert saved.shape[-1] == 3 and np.array_equal(saved[..., 0], saved[..., 1]) and np.array_equal(saved[..., 0],
                                                                                                   saved[..., 2])
  assert "FD" in out and "recall" in out and "diversity" in out
  for path in ("samples.png", "samples.npz", "tokenizer/reconstructions", "generator/metrics.jsonl",
               "tokenizer/codes/train", "tokenizer/codes/test", "edit_digit.png", "edit_mask.png"):
    assert (workdir / path).exists(), path
  assert "step 600/600" in out and "== 4/4 samples" in out

  out = run_quick_demo(workdir, "--mode=sample", "--config.generator.sample.per_class=1")
  grid = np.asarray(Image.open(workdir / "generator" / "samples" / "samples.png"))
  assert grid.ndim == 3 and grid.shape[0] > grid.shape[1] / 20  # a PNG grid of 10 images
  assert np.load(workdir / "generator" / "samples" / "samples.npz")["arr_0"].shape == (10, 16, 16, 3)

  # With seamless cloning into the digit, as the original's apps/inpaint.py ends: the results, and the same
  # blended into the digit (its own pixels outside the mask).
  run_quick_demo(workdir, "--mode=edit", "--config.generator.edit.batch=2", "--config.generator.edit.sampler.num_iter=3",
                 "--config.generator.edit.seamless_clone=True")
  saved = np.load(workdir / "generator" / "edit" / "inpaint.npz")
  edited, cloned = saved["arr_0"].astype(float), saved["cloned"].astype(float)
  assert edited.shape == cloned.shape == (2, 16, 16, 3)
  digit = np.asarray(Image.open(workdir / "edit_digit.png").convert("RGB")).astype(float)
  # The bottom half's tokens are given: the edits stay far closer to the digit there than free samples do
  # (measured: 31 vs 61 grey levels).
  samples = np.load(workdir / "samples.npz")["arr_0"].astype(float)
  kept, free = (np.abs(x[:, 8:] - digit[8:]).mean() for x in (edited, samples))
  assert kept < 0.75 * free, (kept, free)
  np.testing.assert_array_equal(cloned[:, 8:], np.broadcast_to(digit[8:], cloned[:, 8:].shape))
  assert np.abs(cloned[:, :8] - edited[:, :8]).mean() > 1.0  # grey levels

  out = run_quick_demo(workdir, "--mode=features")
  probe = json.loads((workdir / "generator" / "linear_probe.json").read_text())
  assert sorted(probe["layers"]) == ["0", "1", "2", "3"] and set(probe["baselines"]) == {"pixels", "codes"}
  assert "block 3" in out and "pixels" in out
  # The probe measures what the features hold: at every block it does no worse than scikit-learn's logistic
  # regression (an independent solver) at its default penalty (C = 1), and at the best block scikit-learn at the
  # penalty the probe chose scores within 3 points of it on the same saved features. (Newton's method: a handful of
  # iterations where lbfgs takes a thousand at the probe's weak penalties, 90 s of this test.)
  train, train_labels = features.load_features(str(workdir / "generator" / "features" / "train"))
  test, test_labels = features.load_features(str(workdir / "generator" / "features" / "test"))
  for layer, result in probe["layers"].items():
    scaler = StandardScaler().fit(train[int(layer)])
    x_train, x_test = scaler.transform(train[int(layer)]), scaler.transform(test[int(layer)])
    top1 = lambda c: 100 * LogisticRegression(C=c, solver="newton-cholesky", max_iter=10000).fit(
        x_train, train_labels).score(x_test, test_labels)
    assert result["top1"] >= top1(1.0) - 3.0, (layer, result["top1"])
    assert not result["fit_warning"], result
    if int(layer) == probe["best_layer"]:
      same_penalty = top1(1.0 / (result["l2"] * len(train_labels)))  # sklearn: C x summed loss + |W|^2 / 2
      assert abs(result["top1"] - same_penalty) <= 3.0, (layer, result["top1"], same_penalty)
  assert probe["best_top1"] > 60, probe  # chance 10%; 81% measured on the quick model

  before = (workdir / "demo.json").stat().st_mtime_ns
  run_quick_demo(workdir, "--mode=evaluate", "--config.generator.sample.per_class=1")
  assert (workdir / "demo.json").stat().st_mtime_ns > before
  assert json.loads((workdir / "demo.json").read_text())["num_samples"] == 10


@pytest.mark.slow  # tests/test_quality.py (the sweep's frontier and budget), test_compile.py and test_data.py cover it
@pytest.mark.xdist_group("quick_demo")
def test_the_demo_workdir_encodes_every_digit_sweeps_and_compiles(quick_demo):
  workdir, _ = quick_demo
  run_quick_demo(workdir, "--mode=encode", "--config.tokenizer.data.split=all")
  assert len(data.CodesSource(str(workdir / "tokenizer" / "codes" / "all"), flip=False)) == 1797  # every digit

  # The sampler's frontier over the quick grid (2 settings), then a rerun that resumes with nothing left to do.
  # No speed budget: which settings reach one depends on the machine (test_quality tests the budget's logic).
  out = run_quick_demo(workdir, "--mode=sweep", "--config.generator.sweep.min_images_per_s=0")
  table = json.loads((workdir / "generator" / "sweep" / "sweep.json").read_text())
  assert [r["setting"]["num_iter"] for r in table["rows"]] == [2, 4]
  assert all(r["images_per_s"] > 0 and r["num_images"] == 20 and r["fd"] > 0 for r in table["rows"])
  assert table["best"]["setting"] in [r["setting"] for r in table["rows"]] and "sweep: best at >=" in out
  plot = Image.open(workdir / "generator" / "sweep" / "sweep.png")
  assert plot.format == "PNG" and plot.size[0] > 800
  again = run_quick_demo(workdir, "--mode=sweep", "--config.generator.sweep.min_images_per_s=0")
  assert "sweep [" not in again and json.loads((workdir / "generator" / "sweep" / "sweep.json").read_text())["rows"] \
      == table["rows"]

  # Both of the demo's models, compiled for this host's devices (tests/test_compile.py compiles for TPUs).
  run_quick_demo(workdir, "--mode=compile")
  for stage, programs in (("tokenizer", ["train_step"]), ("generator", ["train_step", "sample", "features"])):
    report = json.loads((workdir / stage / "compile.json").read_text())
    assert report["topology"] == "local" and [p["program"] for p in report["programs"]] == programs
    assert all(p["fits"] and p["hbm_bytes"]["peak"] > 0 for p in report["programs"])


@pytest.mark.slow
@pytest.mark.xdist_group("quick_demo")
def test_scaling_benchmark_scores_each_width_on_the_demo_codes(quick_demo):
  workdir, _ = quick_demo
  result = subprocess.run([sys.executable, "benchmarks/scaling.py", "--config=configs/demo.py:quick",
                           f"--workdir={workdir}", "--dims=32,64", "--steps=20"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=user_env())
  assert result.returncode == 0, result.stderr[-3000:]
  table = json.loads(result.stdout.strip().splitlines()[-1])
  rows = table["rows"]
  assert [r["dim"] for r in rows] == [32, 64] and rows[0]["params"] < rows[1]["params"]
  for row in rows:
    assert row["steps"] == 20 and sorted(row["probe_top1_by_block"]) == ["0", "1", "2", "3"]
    assert row["fd"] > table["ceiling"]["fd"] > table["floor"]["fd"] and row["best_probe_top1"] > 10.0  # chance 10%
  assert (workdir / "scaling" / "dim64_seed0" / "linear_probe.json").exists()
