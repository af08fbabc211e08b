"""--mode=evaluate's sample batch: made from converted weights, in the ADM layout, and resumable."""

import dataclasses
import pathlib

import ml_collections
import numpy as np

from bigr_jax import config_lib
from bigr_jax.weights import generator_weights, params_io
from bigr_jax.models import tokenizer
from bigr_jax.models.config import from_model_args
from bigr_jax.sampling import drawing

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "bigr_original"


def test_evaluation_samples_resume(tmp_path):
  # The fixture generator (4x4 tokens of 8 bits) and the fixture B-AE (64 px, 4x4 tokens of 8 bits) fit.
  gen_config = from_model_args(str(np.load(FIXTURES / "generator_io.npz")["config"]))
  params = generator_weights.torch_to_flax(dict(np.load(FIXTURES / "generator_state_dict.npz")), gen_config)
  params_io.save_params(params, tmp_path / "params")
  tok_config = tokenizer.from_hparams(str(np.load(FIXTURES / "bae_io.npz")["config"]))
  config = config_lib.base_generator_config()
  config.model = ml_collections.ConfigDict(dataclasses.asdict(gen_config))
  config.init_from = str(tmp_path / "params")
  config.tokenizer = ml_collections.ConfigDict(dict(
      checkpoint=str(FIXTURES / "bae_state_dict.npz"), config="",
      model=ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v
                                       for k, v in dataclasses.asdict(tok_config).items()})))
  config.mesh.update(data=-1)
  config.sample.update(num_iter=2, infer_steps=4, batch_size=8, cfg_scale=2.0)
  config.evaluation = ml_collections.ConfigDict(dict(num_samples=20, sample_batch=""))

  path = pathlib.Path(drawing.evaluation_samples(config, str(tmp_path)))
  first = np.load(path)
  assert first["arr_0"].shape == (20, 64, 64, 3) and first["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(first["arr_1"], np.arange(20) % 10)

  # An interrupted run: the batch file and one part are gone; only that part is made again.
  parts = sorted((path.parent / "fid_parts").glob("*.npy"))
  assert len(parts) == 3
  kept = {p: p.stat().st_mtime_ns for p in parts[:2]}
  path.unlink()
  parts[2].unlink()
  again = np.load(drawing.evaluation_samples(config, str(tmp_path)))
  assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
  np.testing.assert_array_equal(again["arr_0"], first["arr_0"])  # same seeds, same images
