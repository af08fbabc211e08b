"""The embedded default through the real entry point: tokenizer, codes, generator, samples, verdict."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image

from bigr_jax import config_lib, data, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_end_to_end_then_sample_and_edit_modes(tmp_path):
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

  # --mode=sample and --mode=edit through main.run, with the demo's tokenizer and generator (one test, so
  # that the demo runs once whichever worker takes it).
  demo = config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py") + ":quick")
  config = demo.generator
  config.tokenizer = ml_collections.ConfigDict(dict(checkpoint=str(workdir / "tokenizer"), config="",
                                                    model=demo.tokenizer.model))
  config.sample.update(labels=tuple(range(8)), num_iter=2, infer_steps=5, batch_size=0)  # 8 fake devices
  images = main.run(config, str(workdir / "generator"), "sample")
  size = demo.tokenizer.model.img_size
  assert images.shape == (8, size, size, 3)
  assert (workdir / "generator" / "samples" / "samples.png").exists()

  digit = data.DigitsSource(split="test", image_size=size)[0]["image"]
  Image.fromarray(digit).save(tmp_path / "digit.png")
  mask = np.zeros((size, size), np.uint8)
  mask[: size // 2] = 255  # regenerate the top half
  Image.fromarray(mask).save(tmp_path / "mask.png")
  config.edit.update(task="inpaint", image=str(tmp_path / "digit.png"), mask=str(tmp_path / "mask.png"), batch=2)
  edited = main.run(config, str(workdir / "generator"), "edit")
  assert edited.shape == (2, size, size, 3)
  assert (workdir / "generator" / "edit" / "inpaint.png").exists()
