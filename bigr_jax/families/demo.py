"""The embedded demo (configs/demo.py: scikit-learn's digits; configs/mnist.py: 5,000 MNIST digits): BiGR end to
end on `tokenizer.data`, and every other mode on its workdir.

`--mode=demo` (or train) runs the stages: a B-AE in workdir/tokenizer, the codes of the training and held-out
digits, a generator in workdir/generator, then the verdict (`evaluate`): samples of every class scored in the
features of a classifier trained on real digits, beside the floor of real held-out digits. Afterwards
`--mode=sample|edit|features|evaluate|sweep` run on the same workdir with the demo's generator and tokenizer
(`generator_stage`), and `--mode=encode` with its tokenizer.
"""

import pathlib
import time

import numpy as np
from PIL import Image

from bigr_jax import artifacts, config_lib, data, evaluation, files, images as images_lib
from bigr_jax.evaluation import quality
from bigr_jax.families import generator as generator_family, tokenizer as tokenizer_family
from bigr_jax.families.base import Family, Mode
from bigr_jax.sampling import drawing, sweep as sweep_lib
from bigr_jax.train import generator_trainer, tokenizer_trainer

SPLITS = ("train", "test")  # codes of both: the generator trains on train, the probe evaluates on test
EDIT_IMAGE, EDIT_MASK = "edit_digit.png", "edit_mask.png"  # a held-out digit, and its top half to regenerate


def generator_stage(config, workdir):
  """(the demo's generator config, completed with this workdir's paths, and the generator's workdir)."""
  workdir = pathlib.Path(workdir)
  gen = config.generator.copy_and_resolve_references()
  gen.data.data_dir = str(workdir / "tokenizer" / "codes")
  gen.tokenizer.checkpoint = gen.tokenizer.checkpoint or str(workdir / "tokenizer")
  gen.edit.image = gen.edit.image or str(workdir / EDIT_IMAGE)
  gen.edit.mask = gen.edit.mask or str(workdir / EDIT_MASK)
  return gen, workdir / "generator"


def on_generator(entry):
  """A generator mode's entry point, run on the demo's generator stage."""
  def run_on_demo(config, workdir):
    return entry(*generator_stage(config, workdir))
  run_on_demo.__doc__ = entry.__doc__
  return run_on_demo


def features(config, workdir) -> dict:
  """`--mode=features` on the demo: the generator's pooled features at `generator.evaluation.layers` (every block),
  probed beside the same probe on raw pixels and on the B-AE's codes (their bits, flattened), the inputs the
  generator's representation is measured against; writes generator/linear_probe.json."""
  gen, gen_workdir = generator_stage(config, workdir)
  flat = lambda images: images.reshape(len(images), -1).astype(np.float32)  # noqa: E731
  probe_input = lambda train, test: (flat(train[0]), train[1], flat(test[0]), test[1])  # noqa: E731
  baselines = {"pixels": probe_input(*(real_images(config, split) for split in SPLITS)),
               "codes": probe_input(*(_codes(pathlib.Path(workdir), split) for split in SPLITS))}
  return evaluation.features_and_probe(gen, gen_workdir, baselines=baselines)


def _codes(workdir: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(bits (N, T, K), labels) of a split's codes in the workdir's tokenizer/codes."""
  return _stacked(data.CodesSource(str(workdir / "tokenizer" / "codes" / split), flip=False), "codes")


def _stacked(source, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(every record's `key`, stacked; their labels) of a random-access source."""
  records = [source[i] for i in range(len(source))]
  return np.stack([r[key] for r in records]), np.asarray([r["label"] for r in records])


def encode(config, workdir, overwrite: bool = False):
  """`--mode=encode` on the demo: codes of `tokenizer.data.split` with the workdir's B-AE."""
  return tokenizer_trainer.encode_dataset(config.tokenizer, str(pathlib.Path(workdir) / "tokenizer"), overwrite)


def compile_programs(config, workdir) -> dict:
  """`--mode=compile` on the demo: its tokenizer's and its generator's programs, each for its own
  `compile` section (`--config.tokenizer.compile.topology`, `--config.generator.compile.topology`)."""
  gen, gen_workdir = generator_stage(config, workdir)
  return {"tokenizer": tokenizer_family.compile_mode(config.tokenizer, pathlib.Path(workdir) / "tokenizer"),
          "generator": generator_family.compile_mode(gen, gen_workdir)}


def dataset_split(config, split: str):
  """A split of the demo's dataset (`tokenizer.data`), at the tokenizer's size."""
  section = config.tokenizer.data.copy_and_resolve_references()
  section.split = split
  return data.build_source(section)


def real_images(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of every record of a split of the demo's dataset."""
  return _stacked(dataset_split(config, split), "image")


def quality_report(config, workdir) -> quality.QualityReport:
  """Scores against the real training images, with the held-out images for the floor and their reconstructions
  for the ceiling (`evaluation.quality`): the held-out split's codes, decoded by the workdir's B-AE."""
  held_out, held_out_labels = real_images(config, "test")
  bits, code_labels = _codes(pathlib.Path(workdir), "test")
  if not np.array_equal(code_labels, held_out_labels):
    raise ValueError(f"{workdir}/tokenizer/codes/test does not hold the codes of the held-out images in order; "
                     "encode them again (--mode=encode --config.tokenizer.data.split=test --overwrite)")
  gen, _ = generator_stage(config, workdir)
  tokenizer_config = artifacts.tokenizer_model_config(gen.tokenizer)
  tokenizer_params = artifacts.tokenizer_params(gen.tokenizer.checkpoint, tokenizer_config)
  reconstructions = drawing.decode_bits(tokenizer_config, tokenizer_params, bits)
  return quality.QualityReport.from_splits(*real_images(config, "train"), held_out, held_out_labels,
                                           held_out_reconstructions=reconstructions)


def evaluate(config, workdir) -> dict:
  """`--mode=evaluate` on the demo: samples of every class (`generator.sample`), scored in the feature space of
  a classifier trained on real digits (FD, precision, recall, diversity, class accuracy), beside the B-AE's
  reconstructions of held-out digits (the ceiling) and the real held-out digits (the floor); writes samples.png,
  samples.npz and the scores into demo.json."""
  drawn = drawing.draw_samples(*generator_stage(config, workdir))
  images, labels, models = drawn.images, drawn.labels, drawn.models
  workdir = pathlib.Path(workdir)
  report = quality_report(config, workdir)
  samples, ceiling, floor = report.samples(images, labels), report.ceiling(labels), report.floor(labels)
  images_lib.save_grid(images, workdir / "samples.png", nrow=drawn.run.per_class or 10)
  np.savez(workdir / "samples.npz", arr_0=images_lib.to_uint8(images), arr_1=labels)
  scores = {"sample_class_accuracy": samples["class_accuracy"], "real_digit_accuracy": floor["class_accuracy"],
            "chance": 1.0 / models.generator_config.num_classes, "num_samples": len(labels),
            "quality": {"samples": samples, "ceiling": ceiling, "floor": floor}, "sampling_s": drawn.seconds}
  _update_summary(workdir, scores)
  print(f"samples: {workdir / 'samples.png'}; against real training digits, in a digit classifier's features: "
        f"{quality.summary_line(samples, floor, ceiling)}; B-AE: its reconstructions of the held-out digits, real: "
        "the held-out digits, as many per class", flush=True)
  return scores


# BiGR-L's, in the paper
PAPER_SETTING = {"num_iter": 20, "cfg_scale": 2.5, "cfg_schedule": "constant", "gumbel_temp": 0.17, "infer_steps": 100,
                 "ordering": "confidence"}


def paper_point(gen):
  """The paper's setting as a point of the sweep's grid (the fields outside the grid fixed by `gen.sample`), or
  None where the sweep cannot hold it."""
  fixed = {k: v for k, v in PAPER_SETTING.items() if k not in gen.sweep.grid}
  if not set(gen.sweep.grid) <= set(PAPER_SETTING) or any(gen.sample[k] != v for k, v in fixed.items()):
    return None
  return {k: PAPER_SETTING[k] for k in gen.sweep.grid}


def sweep(config, workdir) -> dict:
  """`--mode=sweep` on the demo: the generator's sampler over `generator.sweep.grid`, each setting scored as
  `evaluate` scores samples (the floor beside) and timed on this machine; writes generator/sweep/."""
  gen, gen_workdir = generator_stage(config, workdir)
  report = quality_report(config, workdir)
  labels = np.repeat(np.arange(gen.model.num_classes), gen.sweep.per_class)
  return sweep_lib.run_sweep(gen, gen_workdir, report.samples, floor=report.floor(labels),
                             ceiling=report.ceiling(labels), highlight=paper_point(gen),
                             title=f"demo sampler sweep: {len(labels)} samples per setting, scored against real "
                                   "digits in a digit classifier's features")


def _update_summary(workdir: pathlib.Path, values: dict) -> dict:
  path = workdir / "demo.json"
  summary = {**(files.read_json(path) if path.exists() else {}), **values}
  files.write_json(path, summary)
  return summary


def _edit_inputs(config, workdir: pathlib.Path) -> None:
  """A held-out image and a mask of its top half, the inputs `--mode=edit` uses on this workdir."""
  image = dataset_split(config, "test")[0]["image"]
  Image.fromarray(image).save(workdir / EDIT_IMAGE)
  mask = np.zeros(image.shape[:2], np.uint8)
  mask[: image.shape[0] // 2] = 255
  Image.fromarray(mask).save(workdir / EDIT_MASK)


def run_stages(config, workdir) -> dict:
  """Every stage; a rerun resumes each (trainings from their checkpoints, codes where they stopped)."""
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  timings = {}

  def lap(name):
    timings[f"{name}_s"] = time.perf_counter() - start - sum(timings.values())

  print("== 1/4 tokenizer: a B-AE on the digits", flush=True)
  tok_dir = workdir / "tokenizer"
  tokenizer_trainer.train_and_evaluate(config.tokenizer, str(tok_dir))
  lap("tokenizer")

  print("== 2/4 codes: encode the training and held-out digits", flush=True)
  for split in SPLITS:
    stage = config.copy_and_resolve_references()
    stage.tokenizer.data.split = split
    tokenizer_trainer.write_codes(stage.tokenizer, str(workdir / "tokenizer"))  # a rerun keeps finished codes
  lap("codes")

  print("== 3/4 generator: BiGR on the codes", flush=True)
  gen, gen_workdir = generator_stage(config, workdir)
  generator_trainer.train_and_evaluate(gen, str(gen_workdir))
  lap("generator")

  print("== 4/4 samples: every class, scored against real digits", flush=True)
  _edit_inputs(config, workdir)
  scores = evaluate(config, workdir)
  lap("samples")
  summary = _update_summary(workdir, {**scores, **timings, "total_s": time.perf_counter() - start})
  print(f"{summary['total_s'] / 60:.1f} min in all; next: --mode=sample, edit, features or evaluate on this "
        "workdir", flush=True)
  return summary


def check(config) -> None:
  """Each stage's check (`families.tokenizer.check`, `families.generator.check`), before any work. The demo has no
  base config of its own: configs/demo.py composes the tokenizer's and the generator's."""
  config_lib.check_training_fields(config)  # its own: peer_timeout_s
  tokenizer_family.check(config.tokenizer)
  generator_family.check(config.generator)


def _app_stage(config, workdir):
  return (*generator_stage(config, workdir), dataset_split(config, "test"))


FAMILY = Family(
    name="demo",
    modes={
        "train": Mode("the embedded demo end to end: tokenizer, codes, generator, samples, verdict", run_stages),
        "encode": Mode("codes of tokenizer.data.split with the workdir's B-AE", encode, overwrite=True),
        "sample": Mode(generator_family.FAMILY.modes["sample"].help, on_generator(drawing.sample_to_workdir)),
        "edit": Mode(generator_family.FAMILY.modes["edit"].help, on_generator(drawing.edit_to_workdir)),
        "features": Mode("the generator's pooled features at every block, probed beside raw pixels and the B-AE's "
                         "codes", features),
        "evaluate": Mode("the digit classifier's verdict on samples of every class, beside the B-AE ceiling and the "
                         "real floor (redrawn and rewritten each time)", evaluate),
        "sweep": Mode("the sampler's speed / quality frontier over generator.sweep.grid: table, plot, best setting "
                      "within a speed budget", sweep),
        "demo": Mode("the embedded demo end to end: tokenizer, codes, generator, samples, verdict", run_stages),
        "compile": Mode("the tokenizer's and the generator's programs, each for its own compile section",
                        compile_programs),
    },
    check=check,
    generator_stage=_app_stage)
