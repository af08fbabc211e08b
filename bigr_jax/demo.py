"""`--mode=demo`: BiGR end to end on the embedded digits (configs/demo.py): tokenizer, codes, generator,
samples, and a classifier's verdict on the samples."""

import json
import pathlib
import time

import numpy as np

from bigr_jax import images as images_lib


def digit_classifier(image_size: int):
  """Logistic regression on real digit images (grayscale), and its accuracy on the held-out digits."""
  from sklearn.linear_model import LogisticRegression
  from bigr_jax import data
  train = data.DigitsSource(split="train", image_size=image_size)
  test = data.DigitsSource(split="test", image_size=image_size)

  def arrays(source):
    records = [source[i] for i in range(len(source))]
    x = np.stack([r["image"].mean(-1).reshape(-1) / 255.0 for r in records])
    return x, np.asarray([r["label"] for r in records])

  x, y = arrays(train)
  classifier = LogisticRegression(max_iter=2000).fit(x, y)
  x_test, y_test = arrays(test)
  return classifier, float(classifier.score(x_test, y_test))


def run(config, workdir: str) -> dict:
  from bigr_jax.convert import params_io
  from bigr_jax.models.config import GeneratorConfig
  from bigr_jax.sampling import run_sample
  from bigr_jax.train import generator, tokenizer
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  timings = {}

  print("== 1/4 tokenizer: a B-AE on the digits", flush=True)
  tok_dir = workdir / "tokenizer"
  tokenizer.train_and_evaluate(config.tokenizer, str(tok_dir))
  timings["tokenizer_s"] = time.perf_counter() - start

  print("== 2/4 codes: encode the training digits", flush=True)
  codes_dir = tokenizer.encode_dataset(config.tokenizer, str(tok_dir))
  timings["codes_s"] = time.perf_counter() - start - sum(timings.values())

  print("== 3/4 generator: BiGR on the codes", flush=True)
  gen = config.generator
  gen.data.data_dir = str(codes_dir.parent)
  gen.data.split = codes_dir.name
  generator.train_and_evaluate(gen, str(workdir / "generator"))
  timings["generator_s"] = time.perf_counter() - start - sum(timings.values())

  print("== 4/4 samples: every class, scored by a classifier trained on real digits", flush=True)
  gen_config = GeneratorConfig(**gen.model.to_dict())
  tok_config = tokenizer.tokenizer_config(config.tokenizer)
  gen_params = params_io.train_state_params(workdir / "generator")
  tok_params = tokenizer.load_tokenizer_params(tok_dir, tok_config)
  labels = np.repeat(np.arange(gen_config.num_classes), config.sample.per_class)
  images, _ = run_sample.generate_images(gen_config, gen_params, tok_config, tok_params, labels, config.sample,
                                         config.seed)
  classifier, real_accuracy = digit_classifier(tok_config.img_size)
  predicted = classifier.predict(images.mean(-1).reshape(len(images), -1))
  sample_accuracy = float(np.mean(predicted == labels))
  images_lib.save_grid(images, workdir / "samples.png", nrow=config.sample.per_class)
  np.savez(workdir / "samples.npz", arr_0=images_lib.to_uint8(images), arr_1=labels)
  timings["samples_s"] = time.perf_counter() - start - sum(timings.values())
  summary = {"sample_class_accuracy": sample_accuracy, "real_digit_accuracy": real_accuracy,
             "chance": 1.0 / gen_config.num_classes, "num_samples": len(labels), **timings,
             "total_s": time.perf_counter() - start}
  (workdir / "demo.json").write_text(json.dumps(summary, indent=2))
  print(f"samples: {workdir / 'samples.png'}; a classifier trained on real digits recognises "
        f"{100 * sample_accuracy:.0f}% of them (chance 10%, real held-out digits {100 * real_accuracy:.0f}%); "
        f"{summary['total_s'] / 60:.1f} min in all", flush=True)
  return summary
