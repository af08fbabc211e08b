"""The embedded default through the real entry point: tokenizer, codes, generator, samples, verdict."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_end_to_end_through_main(tmp_path):
  workdir = tmp_path / "demo"
  result = subprocess.run(
      [sys.executable, "-m", "bigr_jax.main", "--config=configs/demo.py:quick", f"--workdir={workdir}",
       "--config.generator.ema_decay=0.9"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  summary = json.loads((workdir / "demo.json").read_text())
  assert summary["num_samples"] == 20
  assert 0.0 <= summary["sample_class_accuracy"] <= 1.0
  assert summary["real_digit_accuracy"] > 0.9  # the judge itself is sound
  for path in ("samples.png", "samples.npz", "tokenizer/reconstructions", "generator/metrics.jsonl",
               "tokenizer/codes/train"):
    assert (workdir / path).exists(), path
  assert "step 30/30" in result.stdout
