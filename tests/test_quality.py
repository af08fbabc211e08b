"""Sample quality in a digit classifier's features (`evaluation.quality`), and the sweep's table logic."""

import pathlib

import numpy as np
import pytest

from bigr_jax import config_sections, data, typed_config
from bigr_jax.families import demo
from bigr_jax.evaluation import quality
from bigr_jax.sampling import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
PER_CLASS = 10  # as the demo's evaluation and sweep


def _split(name):
  source = data.DigitsSource(split=name, image_size=16)
  records = [source[i] for i in range(len(source))]
  return np.stack([r["image"] for r in records]), np.asarray([r["label"] for r in records])


@pytest.fixture(scope="module")
def report():
  train, held_out = _split("train"), _split("test")
  return quality.QualityReport.from_splits(*train, *held_out), train


def test_real_held_out_digits_score_near_the_training_digits(report):
  report, _ = report
  labels = np.repeat(np.arange(10), PER_CLASS)
  floor = report.floor(labels)
  # Measured: FD 3.0, precision 0.90, recall 0.82, class accuracy 99%.
  assert floor["num_images"] == 100 and floor["fd"] < 6.0
  assert floor["precision"] > 0.75 and floor["recall"] > 0.65 and floor["class_accuracy"] > 0.95


def test_one_repeated_digit_per_class_is_seen_as_collapsed_though_every_class_is_right(report):
  report, (train_images, train_labels) = report
  labels = np.repeat(np.arange(10), PER_CLASS)
  predicted = report.space.predict(train_images)
  one_each = np.stack([train_images[np.flatnonzero((train_labels == c) & (predicted == c))[0]] for c in range(10)])
  collapsed = report.samples(np.repeat(one_each, PER_CLASS, axis=0), labels)
  floor = report.floor(labels)
  assert collapsed["class_accuracy"] == 1.0  # what class accuracy alone reports: perfect
  assert collapsed["recall"] < 0.05 < 0.65 < floor["recall"]  # measured 0.01 against 0.82
  # Ten copies of one image: their pairwise distances are zero up to float rounding (measured 1.3e-6).
  assert collapsed["diversity"] < 1e-4 * floor["diversity"]
  assert collapsed["fd"] > 4 * floor["fd"]  # measured 22.0 against 3.0


def test_one_image_per_class_has_no_diversity_and_still_scores(report):
  report, _ = report
  labels = np.arange(10)
  floor = report.floor(labels)
  assert floor["diversity"] is None and floor["num_images"] == 10
  assert "diversity n/a (real n/a)" in quality.summary_line(floor, floor)


def test_the_floor_needs_enough_held_out_images_of_each_class():
  with pytest.raises(ValueError, match="has 2 images of class 1; the floor needs 3"):
    quality.matching_subset(np.array([0, 0, 0, 1, 1]), np.array([0, 1, 1, 1]))


def test_pareto_front_and_the_best_setting_within_a_speed_budget():
  rows = [{"setting": {"num_iter": n}, "images_per_s": speed, "fd": fd}
          for n, speed, fd in ((2, 100.0, 9.0), (4, 60.0, 5.0), (8, 50.0, 6.0), (16, 20.0, 3.0))]
  assert [r["setting"]["num_iter"] for r in sweep.pareto_front(rows)] == [2, 4, 16]  # 8 is beaten by 4
  assert sweep.best_within_budget(rows, 55.0)["setting"] == {"num_iter": 4}
  assert sweep.best_within_budget(rows, 0.0)["setting"] == {"num_iter": 16}
  assert sweep.best_within_budget(rows, 500.0) is None


def test_sweep_grid_is_every_combination():
  config = config_sections.SweepConfig(grid={"num_iter": (4, 8), "cfg_scale": (1.0, 2.5, 4.0)})
  settings = config.settings()
  assert len(settings) == 6 and settings[0] == {"num_iter": 4, "cfg_scale": 1.0}
  with pytest.raises(ValueError, match="config.sweep.grid is empty"):
    config_sections.SweepConfig().settings()


def test_a_grid_field_that_config_sample_lacks_is_named_before_any_work(tmp_path):
  gen, _ = demo.generator_stage(typed_config.load_config_file(str(ROOT / "configs" / "demo.py:quick")), tmp_path)
  gen.sweep.grid = {"num_iter": (2,), "num_iterations": (4,)}
  with pytest.raises(ValueError, match="config.sweep.grid.num_iterations is not a config.sample field"):
    sweep.run_sweep(gen, tmp_path / "generator", scorer=None)
  assert not (tmp_path / "generator").exists()


def test_the_paper_setting_is_ringed_only_where_the_sweep_holds_it():
  gen = typed_config.load_config_file(str(ROOT / "configs" / "demo.py")).generator
  assert gen.sample.cfg_schedule == "linear" and demo.paper_point(gen) is None  # the paper's guidance is constant
  gen.sample.cfg_schedule = "constant"
  assert demo.paper_point(gen) == {"num_iter": 20, "cfg_scale": 2.5, "gumbel_temp": 0.17, "infer_steps": 100,
                                   "ordering": "confidence"}
