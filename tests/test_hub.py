"""Weights by name (`hf://<owner>/<repo>/<path>[@revision]`) against a hub-shaped server on 127.0.0.1: fetched
once into the hub cache, used offline, refused with one line when absent, truncated or paired with the wrong
config (before any download)."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading

import pytest

from bigr_jax import hub, typed_config
from bigr_jax.models.config import GeneratorConfig, TokenizerConfig
from conftest import write_released_generator, write_released_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATOR, BAE = "configs/bigr_l.py:runlocal", "configs/bae_d24.py:runlocal"
REPO = "tester/tiny-bigr"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(http.server.ThreadingHTTPServer):
  """Serves `files` ({(repo, path): bytes}) at /<repo>/resolve/<revision>/<path> as the hub does (the headers
  huggingface_hub reads: X-Repo-Commit, ETag, Content-Length), and records every request. A path in `truncated`
  is sent short of its announced size, as a dropped connection leaves it."""

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.files, self.truncated, self.requests = {}, set(), []

  @property
  def endpoint(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"

  def downloads(self) -> int:
    """Files sent (huggingface_hub also asks the hub's API other things, which do not count)."""
    return sum(method == "GET" and "/resolve/" in path for method, path in self.requests)


class _Handler(http.server.BaseHTTPRequestHandler):

  def _answer(self, with_body: bool):
    self.server.requests.append((self.command, self.path))
    repo, _, rest = self.path.lstrip("/").partition("/resolve/")
    path = rest.partition("/")[2]
    data = self.server.files.get((repo, path))
    if data is None:
      self.send_response(404)
      self.send_header("X-Error-Code", "EntryNotFound")
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    start = int(self.headers.get("Range", "bytes=0-")[len("bytes="):].partition("-")[0])  # a resumed download
    end = len(data) // 2 if path in self.server.truncated else len(data)  # a connection that always drops there
    body = data[start:end] if with_body else data
    self.send_response(206 if start else 200)
    self.send_header("X-Repo-Commit", COMMIT)
    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
    self.send_header("Content-Length", str(len(body)))
    if start:
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    self.end_headers()
    if with_body:
      self.wfile.write(body)

  def do_HEAD(self):  # noqa: N802 (the http.server API)
    self._answer(with_body=False)

  def do_GET(self):  # noqa: N802
    self._answer(with_body=True)

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
  """The hub, holding a runlocal generator (.pt, "ema" wrapper) and B-AE (.th) in the released layouts."""
  server = Hub()
  folder = tmp_path_factory.mktemp("weights")
  write_released_generator(folder / "tiny.pt", GENERATOR, seed=0)
  write_released_tokenizer(folder / "tiny.th", BAE, seed=1)
  write_released_generator(folder / "cut.pt", GENERATOR, seed=2)  # its own content: not in the cache
  for name in ("tiny.pt", "tiny.th", "cut.pt"):
    server.files[(REPO, f"weights/{name}")] = (folder / name).read_bytes()
  server.truncated.add("weights/cut.pt")
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()


def _run(module, *argv, hf_home, endpoint, offline=False):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0"}
  return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=env)


def _last_line(result) -> str:
  return (result.stdout + result.stderr).strip().splitlines()[-1]


def test_parse_names_repo_path_and_revision():
  assert hub.parse("hf://haoosz/BiGR/gpt/bigr_L_d24.pt") == hub.HubFile("haoosz/BiGR", "gpt/bigr_L_d24.pt", None)
  assert hub.parse("hf://a/b/c/d.th@v1.0") == hub.HubFile("a/b", "c/d.th", "v1.0")
  assert hub.parse("/local/bigr.pt") is None
  with pytest.raises(ValueError, match="expected hf://<owner>/<repo>/<path"):
    hub.parse("hf://haoosz/BiGR")


def test_every_released_file_is_paired_with_a_config_that_fits_it():
  """Each config of the table accepts its own file and refuses the others of the same family that differ."""
  for path, released in hub.RELEASED.items():
    kind = TokenizerConfig if path.startswith("bae/") else GeneratorConfig
    model = kind.from_config(typed_config.load_config_file(released.config).model)
    hub.check_pairing(f"hf://{hub.ORIGINAL_REPO}/{path}", model)  # the config file's model is the file's
    assert hub._torch_shapes(model) == hub._torch_shapes(released.model), path
  xxl_d24 = GeneratorConfig.from_config(typed_config.load_config_file("configs/bigr_xxl.py:bits=24").model)
  with pytest.raises(ValueError, match=r"holds the weights of --config=configs/bigr_xxl.py:bits=32"):
    hub.check_pairing(f"hf://{hub.ORIGINAL_REPO}/gpt/bigr_XXL_d32.pt", xxl_d24)


def test_weights_by_name_download_once_then_work_offline(hub_server, tmp_path):
  """`--mode=sample` with both weights named hf://: downloaded into HF_HOME's cache and sampled; a second command
  downloads nothing; offline (HF_HUB_OFFLINE=1) the cache serves; an empty cache offline, a truncated download
  and a missing file are one line each, naming the file."""
  hf_home, endpoint = tmp_path / "hf", hub_server.endpoint
  generator, bae = f"hf://{REPO}/weights/tiny.pt", f"hf://{REPO}/weights/tiny.th"
  result = _run("bigr_jax.main", f"--config={GENERATOR}", f"--workdir={tmp_path / 'run'}", "--mode=sample",
                f"--config.init_from={generator}", f"--config.tokenizer.config={BAE}",
                f"--config.tokenizer.checkpoint={bae}", "--config.sample.num_iter=2",
                "--config.sample.infer_steps=2", hf_home=hf_home, endpoint=endpoint)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert (tmp_path / "run" / "samples" / "samples.png").is_file()
  assert hub_server.downloads() == 2
  assert any((hf_home / "hub").glob("models--tester--tiny-bigr/snapshots/*/weights"))

  convert = ("from-torch", f"--config={GENERATOR}", f"--input={generator}")
  result = _run("bigr_jax.convert", *convert, f"--output={tmp_path / 'params'}", hf_home=hf_home, endpoint=endpoint)
  assert result.returncode == 0, result.stderr[-2000:]
  assert hub_server.downloads() == 2  # from the cache

  requests = len(hub_server.requests)
  result = _run("bigr_jax.convert", *convert, f"--output={tmp_path / 'offline'}", hf_home=hf_home,
                endpoint=endpoint, offline=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(hub_server.requests) == requests  # not one request offline

  result = _run("bigr_jax.convert", *convert, f"--output={tmp_path / 'empty'}", hf_home=tmp_path / "empty_hf",
                endpoint=endpoint, offline=True)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert _last_line(result).startswith(f"error: {generator} is not in the hub cache")
  assert f"hf download {REPO} weights/tiny.pt" in _last_line(result)

  for name, says in (("cut.pt", "could not be downloaded"), ("absent.pt", "is not a file on the hub")):
    result = _run("bigr_jax.convert", "from-torch", f"--config={GENERATOR}", f"--input=hf://{REPO}/weights/{name}",
                  f"--output={tmp_path / name}", hf_home=hf_home, endpoint=endpoint)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert _last_line(result).startswith(f"error: hf://{REPO}/weights/{name} {says}"), _last_line(result)
  assert not (tmp_path / "cut.pt").exists()


def test_a_released_file_with_the_wrong_config_is_refused_before_any_download(hub_server, tmp_path):
  requests = len(hub_server.requests)
  result = _run("bigr_jax.main", "--config=configs/bigr_xl.py", f"--workdir={tmp_path / 'run'}", "--mode=sample",
                f"--config.init_from=hf://{hub.ORIGINAL_REPO}/gpt/bigr_L_d24.pt",
                hf_home=tmp_path / "hf", endpoint=hub_server.endpoint)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "holds the weights of --config=configs/bigr_l.py:bits=24" in result.stderr
  assert len(hub_server.requests) == requests and not (tmp_path / "run").exists()
