"""The web app (`python -m bigr_jax.app`) on the quick demo's workdir, driven in headless Chromium by selenium, as a
person uses it: generate, paint a region and inpaint, upload a mask and inpaint with seamless cloning,
interpolate, and the messages bad input gets. Screenshots land in test-artifacts/app/."""

import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from bigr_jax import app, artifacts, images as images_lib, typed_config
from bigr_jax.families import demo
from bigr_jax.sampling import drawing
from conftest import user_env, write_released_generator, write_released_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-artifacts" / "app"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ENLARGED = 8  # the app shows the demo's 16 px images 8 times enlarged (app.DISPLAY_SIZE // 16)
# Chromium as root on a machine with no network: no sandbox, no GPU, no calls home.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1400,2100")


def _browser():
  """Headless Chromium; without one the test fails and says what is missing (CI installs both packages)."""
  missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
  if missing:
    pytest.fail(f"no headless browser: {', '.join(missing)} missing; install the Debian packages chromium and "
                "chromium-driver (the README's test command does)")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp()}"):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve(workdir, port: int) -> subprocess.Popen:
  """The app as a user starts it; returns once the page answers."""
  log = open(workdir / "app.log", "w")  # pylint: disable=consider-using-with
  server = subprocess.Popen([sys.executable, "-m", "bigr_jax.app", "--config=configs/demo.py:quick",
                             f"--workdir={workdir}", f"--port={port}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=user_env())
  deadline = time.time() + 240
  while time.time() < deadline:
    assert server.poll() is None, (workdir / "app.log").read_text()[-3000:]
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
      return server
    except OSError:
      time.sleep(1)
  server.kill()
  raise AssertionError("the app did not answer within 240 s: " + (workdir / "app.log").read_text()[-3000:])


class Page:
  """The app's page in the browser, by the elem_ids of bigr_jax/app.py."""

  def __init__(self, driver, url: str):
    self.driver, self.requests = driver, 0
    driver.implicitly_wait(10)
    driver.get(url)

  def find(self, css: str):
    return self.driver.find_element(By.CSS_SELECTOR, css)

  def tab(self, name: str) -> None:
    self.driver.find_element(By.XPATH, f"//button[@role='tab' and contains(., '{name}')]").click()

  def type(self, elem_id: str, text) -> None:
    box = self.find(f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(str(text), Keys.TAB)  # leaving the field commits it

  def upload(self, elem_id: str, path) -> None:
    self.find(f"#{elem_id} input[type=file]").send_keys(str(path))
    WebDriverWait(self.driver, 30).until(lambda d: self.find(f"#{elem_id} img").get_attribute("src"))

  def run(self, button: str, status: str) -> str:
    """Clicks `button`; the status line of that request (the app numbers them), without its number."""
    self.requests += 1
    prefix = f"request {self.requests}: "
    self.find(f"#{button}").click()
    WebDriverWait(self.driver, 300).until(lambda d: self.find(f"#{status}").text.strip().startswith(prefix))
    return self.find(f"#{status}").text.strip()[len(prefix):]

  def image(self, elem_id: str) -> np.ndarray:
    """The PNG an image output shows, as served."""
    src = self.find(f"#{elem_id} img").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read())).convert("RGB"))

  def screenshot(self, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _cells(grid: np.ndarray, count: int) -> np.ndarray:
  """The first `count` images of one row of an app grid (make_grid's 2 px padding), back at their own size."""
  size = 16 * ENLARGED
  return np.stack([grid[2:2 + size, 2 + i * (size + 2):2 + i * (size + 2) + size][::ENLARGED, ::ENLARGED]
                   for i in range(count)]).astype(np.float32) / 255.0


def _reconstruction_error(workdir, digit: np.ndarray, rows: slice) -> float:
  """The B-AE's own error on the digit (encode, decode), in the given rows: what an edit may change there."""
  gen, gen_workdir = demo.generator_stage(typed_config.load_config_file("configs/demo.py:quick"), workdir)
  models = artifacts.sampling_models(gen, gen_workdir)
  bits = drawing.encode_image(models, digit, 1, jax.random.key(0))
  decoded = drawing.decode_bits(models.tokenizer_config, models.tokenizer_params, bits)[0]
  return float(np.abs(decoded - digit)[rows].mean())


@pytest.mark.xdist_group("quick_demo")  # with the demo's test: the other worker never waits for the demo
def test_the_app_in_a_browser(quick_demo, tmp_path):
  workdir = quick_demo.workdir
  digit_path, mask_path = workdir / demo.EDIT_IMAGE, workdir / demo.EDIT_MASK  # a held-out digit; its top half
  digit = images_lib.load_image(digit_path, 16)
  port = _free_port()
  server = _serve(workdir, port)
  driver = _browser()
  try:
    page = Page(driver, f"http://127.0.0.1:{port}/")

    # Generate: two classes by index, twice; the second request reuses every compiled program.
    page.type("gen-classes", "3, 7")
    first = page.run("gen-run", "gen-status")
    assert first.startswith("4 images in"), first
    grid = page.image("gen-grid")
    assert grid.shape == (2 * (128 + 2) + 2,) * 2 + (3,) and grid.std() > 10, grid.shape  # 2 x 2, not blank
    strip = page.image("gen-order")
    assert strip.shape[1] == 4 * (128 + 2) + 2  # the quick demo's 4 iterations, one column each
    second = page.run("gen-run", "gen-status")
    assert second.startswith("4 images in") and "(0 programs compiled)" in second, second
    page.screenshot("generate")
    page.type("gen-classes", "12")
    assert page.run("gen-run", "gen-status") == "Error: class 12 is out of range: the model has classes 0 to 9"
    page.type("gen-classes", "seven")
    assert page.run("gen-run", "gen-status").startswith("Error: no class named 'seven'")

    # Edit: a held-out digit, a region painted across its top, inpainted.
    page.tab("Edit")
    assert page.run("edit-held-out", "edit-status").startswith("loaded held-out image 0")
    canvas = next(c for c in driver.find_elements(By.CSS_SELECTOR, "#edit-canvas canvas") if c.size["width"])
    stroke = ActionChains(driver).move_to_element_with_offset(canvas, -40, -40).click_and_hold()
    for x in range(-40, 41, 10):
      stroke.move_to_element_with_offset(canvas, x, -40)
    stroke.release().perform()
    page.type("edit-iter", 4)
    painted = page.run("edit-run", "edit-status")
    assert painted.startswith("inpaint: 4 results in"), painted
    page.screenshot("edit-painted")

    # The same with an uploaded mask (the top half): outside it, each result differs from the digit by about
    # what the B-AE's own reconstruction does (its decoder sees every token, so an edit above reaches below a
    # little: measured 0.96-1.17 times); seamlessly cloned, the outside is the digit itself.
    page.upload("edit-picture", digit_path)
    page.upload("edit-mask", mask_path)
    uploaded = page.run("edit-run", "edit-status")
    assert uploaded.startswith("inpaint: 4 results in") and "(0 programs compiled)" in uploaded, uploaded
    shown, cloned = _cells(page.image("edit-results"), 5), _cells(page.image("edit-cloned"), 5)
    np.testing.assert_array_equal(shown[0], digit)  # the picture, as the model sees it
    outside, inside = slice(8, 16), slice(0, 8)
    limit = 1.5 * _reconstruction_error(workdir, digit, outside)
    for result in shown[1:]:
      assert np.abs(result - digit)[outside].mean() <= limit, (np.abs(result - digit)[outside].mean(), limit)
    for result, clone in zip(shown[1:], cloned[1:]):
      np.testing.assert_array_equal(clone[outside], digit[outside])  # the source, untouched
      assert np.abs(clone - result)[inside].mean() > 0.01  # blended into the source's colours and border
    page.screenshot("edit-uploaded-mask")

    # Bad input: a grayscale picture, an empty mask.
    gray, black = tmp_path / "gray.png", tmp_path / "black.png"
    Image.fromarray((digit[..., 0] * 255).astype(np.uint8)).save(gray)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(black)
    page.upload("edit-picture", gray)
    assert page.run("edit-run", "edit-status").startswith("Error: the picture is L, not RGB")
    page.upload("edit-picture", digit_path)
    page.upload("edit-mask", black)
    assert page.run("edit-run", "edit-status").startswith("Error: the mask is empty")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("a text file named like a picture")
    page.upload("edit-mask", not_an_image)
    assert page.run("edit-run", "edit-status").startswith("Error: the mask (notes.png) is not an image")
    page.upload("edit-picture", not_an_image)
    assert page.run("edit-run", "edit-status").startswith("Error: the picture (notes.png) is not an image")
    page.screenshot("edit-error")

    # Interpolate between two classes.
    page.tab("Interpolate")
    page.type("interp-a", 3)
    page.type("interp-b", 7)
    page.type("interp-iter", 4)
    status = page.run("interp-run", "interp-status")
    assert status.startswith("27 steps in"), status
    assert page.image("interp-result").shape[1] == 9 * (128 + 2) + 2
    page.screenshot("interpolate")
  finally:
    driver.quit()
    server.terminate()
    server.wait(timeout=30)


def test_the_app_without_weights_is_one_line_before_serving(tmp_path):
  result = subprocess.run([sys.executable, "-m", "bigr_jax.app", "--config=configs/demo.py:quick",
                           f"--workdir={tmp_path}", f"--port={_free_port()}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1 and "serving on" not in result.stdout
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: no weights at {tmp_path / 'generator'}")


def test_a_tokenizer_config_is_one_line_before_serving(tmp_path):
  """The app asks the config's family what it samples with; the B-AE's family has no generator."""
  result = subprocess.run([sys.executable, "-m", "bigr_jax.app", "--config=configs/bae_d24.py:runlocal",
                           f"--workdir={tmp_path}", f"--port={_free_port()}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1 and "serving on" not in result.stdout
  assert result.stderr.strip().splitlines()[-1] == (
      "error: the web app samples with a generator: this is a tokenizer config; give a generator or demo config")


def test_a_generator_config_on_released_weights(tmp_path):
  """The app's session on a generator config whose weights are released-layout PyTorch files (a generator .pt in
  the "ema" wrapper, a B-AE .th), loaded the way --mode=sample loads them; a repeated request compiles nothing."""
  config = typed_config.load_config_file("configs/bigr_l.py:runlocal")
  bae_config = "configs/bae_d24.py:runlocal"
  write_released_generator(tmp_path / "bigr.pt", "configs/bigr_l.py:runlocal", seed=0)
  tok_model = write_released_tokenizer(tmp_path / "binaryae.th", bae_config, seed=1)
  config.init_from = str(tmp_path / "bigr.pt")
  config.tokenizer.update(config=bae_config, checkpoint=str(tmp_path / "binaryae.th"))
  config.sample.update(infer_steps=2, batch_size=4)
  session = app.Session(config, str(tmp_path / "no-workdir"))
  (grid, strip), status = session.generate("1, 2", 1, 2, 2.0, 0.0, 0)
  assert status.startswith("2 images in"), status
  size = tok_model.img_size * max(1, app.DISPLAY_SIZE // tok_model.img_size)  # as shown
  assert grid.shape == (2 * (size + 2) + 2, size + 4, 3)  # a row per class
  assert strip.shape == grid.shape[:1] + (2 * (size + 2) + 2, 3)  # a column per iteration
  (again, _), status = session.generate("2, 1, 1", 1, 2, 2.0, 0.0, 0)  # another count: the same padded batch
  assert status.startswith("3 images in") and status.endswith("(0 programs compiled)"), status
  with pytest.raises(ValueError, match="names no dataset images"):
    session.held_out(0)
  # Bad settings are messages naming the field and its range (2**70 was an OverflowError deep in JAX).
  for args, message in ((("1", 1, 2, 2.0, 0.0, 2**70), f"the seed must be a number from 0 to {app.MAX_SEED}"),
                        (("1", 1, 2, 2.0, -1.0, 0), "the gumbel temperature must be a number of at least 0"),
                        (("1", 1, 0, 2.0, 0.0, 0), "the iterations must be a number of at least 1"),
                        (("1, 2, 3", 30, 2, 2.0, 0.0, 0), f"90 images asked for; at most {app.MAX_IMAGES}")):
    with pytest.raises(ValueError, match=message):
      session.generate(*args)
  # A class edit of an uploaded picture's top half, cloned back into it.
  size = tok_model.img_size
  picture, top_half = tmp_path / "picture.png", tmp_path / "top_half.png"  # uploads arrive as files
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)).save(picture)
  mask = np.zeros((size, size), np.uint8)
  mask[:size // 2] = 255
  Image.fromarray(mask).save(top_half)
  (results, cloned, _), status = session.edit_picture(str(picture), None, str(top_half), "class edit", "3", 2, 2.0,
                                                      0.0, 0, True)
  assert status.startswith("class edit: 4 results in"), status
  assert results.shape == cloned.shape and results.shape[1] == 5 * (grid.shape[1] - 2) + 2  # picture + 4
  with pytest.raises(ValueError, match="give one class here, not 2"):
    session.interpolate("1, 2", "3", 2, 2.0, 0.0, 0)
