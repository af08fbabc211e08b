"""`--mode=sweep`: the sampler's speed / quality frontier over a grid of settings (`config.sweep`).

Each setting (a point of `sweep.grid`, whose keys are `config.sample` fields such as num_iter, cfg_scale,
cfg_schedule, gumbel_temp, gumbel_schedule, infer_steps, ordering, token_sampling) draws `sweep.per_class` images
of every class, is scored by the family's scorer (the demo: `evaluation.quality`), and timed: images/s of a
second, compiled, run on this machine. Writes <workdir>/sweep/:
- sweep.json: one row per setting (appended as each finishes, so a rerun resumes with the settings not yet done;
  rows of earlier grids stay, the summary fields cover this grid);
- sweep.png: FD and recall against images/s, the Pareto front (no other setting is both faster and lower in FD)
  marked, with the real images' figures (floor) and the tokenizer's reconstructions' (ceiling) as lines;
and prints the best setting (lowest FD) at or above `sweep.min_images_per_s`.
"""

import json
import time
from typing import Callable

from matplotlib.figure import Figure  # drawn to a file, without pyplot's global state or a display
import numpy as np

from bigr_jax import artifacts, files, parallel, typed_config
from bigr_jax.config_sections import SweepConfig
from bigr_jax.sampling import drawing

SWEEP_DIR = "sweep"


def setting_name(setting: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in setting.items())


def pareto_front(rows: list[dict]) -> list[dict]:
  """The rows no other row beats on both speed (images/s, higher) and FD (lower), fastest first."""
  front = []
  for row in sorted(rows, key=lambda r: (-r["images_per_s"], r["fd"])):
    if not front or row["fd"] < front[-1]["fd"]:
      front.append(row)
  return front


def best_within_budget(rows: list[dict], min_images_per_s: float):
  fast_enough = [r for r in rows if r["images_per_s"] >= min_images_per_s]
  return min(fast_enough, key=lambda r: r["fd"]) if fast_enough else None


def plot(rows: list[dict], path, title: str, floor=None, highlight=None, ceiling=None) -> None:
  """FD and recall against images/s, the Pareto front joined, `floor` (real images' figures) as a dashed line,
  `ceiling` (the tokenizer's reconstructions') as a dotted one, `highlight` (a setting dict) ringed."""
  front = pareto_front(rows)
  varying = [k for k in rows[0]["setting"] if len({json.dumps(r["setting"][k]) for r in rows}) > 1]
  label_of = lambda r: setting_name({k: r["setting"][k] for k in varying})
  figure = Figure(figsize=(11, 4.6 + 0.16 * len(front)))
  axes = figure.subplots(1, 2)
  for axis, key, label in ((axes[0], "fd", "Fréchet distance (lower is better)"),
                           (axes[1], "recall", "recall (higher is better)")):
    axis.scatter([r["images_per_s"] for r in rows], [r[key] for r in rows], color="tab:blue", s=18, zorder=2)
    axis.plot([r["images_per_s"] for r in front], [r[key] for r in front], color="tab:red", marker="o",
              label="Pareto front (speed, FD)", zorder=3)
    for number, r in enumerate(front, 1):  # numbered here, named in the key below the plots
      axis.annotate(str(number), (r["images_per_s"], r[key]), fontsize=7, textcoords="offset points",
                    xytext=(4, 4))
    if highlight is not None:
      for r in rows:
        if r["setting"] == highlight:
          axis.scatter([r["images_per_s"]], [r[key]], s=120, facecolors="none", edgecolors="black", zorder=4,
                       label="the paper's setting")
    if floor is not None:
      axis.axhline(floor[key], color="gray", linestyle="--", label="real held-out images")
    if ceiling is not None:
      axis.axhline(ceiling[key], color="tab:green", linestyle=":", label="B-AE reconstructions of them")
    axis.set_xscale("log")
    axis.set_xlabel("images/s on this machine")
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  figure.suptitle(title, fontsize=9)
  key_lines = [f"{number}: {label_of(r)}  (FD {r['fd']:.2f}, recall {r['recall']:.2f}, {r['images_per_s']:.0f}/s)"
               for number, r in enumerate(front, 1)]
  figure.text(0.01, 0.01, "Pareto front: " + "\n".join(key_lines), fontsize=7, va="bottom", family="monospace")
  figure.tight_layout(rect=(0, 0.035 * (len(front) + 1), 1, 1))
  with files.atomic_path(str(path)) as tmp:
    figure.savefig(tmp, format="png", dpi=110)


def run_sweep(config, workdir, scorer: Callable, *, floor=None, ceiling=None, title: str = "",
              highlight=None) -> dict:
  """Samples, scores and times every setting of `config.sweep` with the run's generator and B-AE.

  `scorer(images, labels)` returns a dict with at least fd and recall; `floor` and `ceiling`, the same for real
  images and for the tokenizer's reconstructions of them, are drawn on the plot and kept in the table.
  `highlight`: a setting to ring on the plot.
  """
  sweep = typed_config.from_section(SweepConfig, config.sweep, "config.sweep")
  settings = sweep.settings()
  parsed = []
  for setting in settings:  # every setting is checked before any sampling
    section = config.sample.copy_and_resolve_references()
    for key, value in setting.items():
      if key not in section:
        raise ValueError(f"config.sweep.grid.{key} is not a config.sample field; fields: {', '.join(section)}")
      section[key] = value
    parsed.append(drawing.sample_settings(section))
  out = artifacts.output_path(workdir, SWEEP_DIR)
  table_path = out / "sweep.json"
  rows = files.read_json(table_path)["rows"] if table_path.exists() else []  # every setting ever swept here
  key = lambda setting, per_class: (json.dumps(setting, sort_keys=True), per_class)
  done = {key(r["setting"], r["per_class"]) for r in rows}
  models = artifacts.sampling_models(config, workdir, use_ema=parsed[0][1].use_ema)
  labels = np.repeat(np.arange(models.generator_config.num_classes, dtype=np.int32), sweep.per_class)
  mesh = parallel.make_mesh(config.mesh)
  for index, (setting, (sampler_config, run)) in enumerate(zip(settings, parsed)):
    if key(setting, sweep.per_class) in done:
      continue
    sample = lambda: drawing.generate_images(models, labels, sampler_config, run.seed, mesh, run.batch_size)
    sample()  # compiles; the timed run below reuses the program
    start = time.perf_counter()
    images = sample().images
    seconds = time.perf_counter() - start
    row = {"setting": setting, "per_class": sweep.per_class, "num_images": len(labels), "seconds": seconds,
           "images_per_s": len(labels) / seconds, **scorer(images, labels)}
    rows.append(row)
    files.write_json(table_path, {"rows": rows})
    print(f"sweep [{index + 1}/{len(settings)}] {setting_name(setting)}: FD {row['fd']:.2f}, recall "
          f"{row['recall']:.2f}, {row['images_per_s']:.1f} images/s", flush=True)
  wanted = {key(setting, sweep.per_class) for setting in settings}
  current = [r for r in rows if key(r["setting"], r["per_class"]) in wanted]  # this grid's, in the plot and best
  plot(current, out / "sweep.png", title, floor, highlight, ceiling)
  best = best_within_budget(current, sweep.min_images_per_s)
  summary = {"rows": rows, "grid": [r["setting"] for r in current], "per_class": sweep.per_class,
             "pareto_front": [r["setting"] for r in pareto_front(current)],
             "min_images_per_s": sweep.min_images_per_s, "best": best, "floor": floor, "ceiling": ceiling}
  files.write_json(table_path, summary)
  if best is None:
    print(f"sweep: no setting reaches {sweep.min_images_per_s} images/s; the fastest gives "
          f"{max(r['images_per_s'] for r in current):.1f}", flush=True)
  else:
    print(f"sweep: best at >= {sweep.min_images_per_s:g} images/s: {setting_name(best['setting'])} (FD "
          f"{best['fd']:.2f}, recall {best['recall']:.2f}, {best['images_per_s']:.1f} images/s); "
          f"{out / 'sweep.png'}", flush=True)
  return summary
