"""A web app on a trained (or converted) generator: `python -m bigr_jax.app --workdir=DIR [--config=FILE]`.

It serves on 127.0.0.1 (`--port`, 7860) and loads the weights as `--mode=sample` does (`artifacts`): the
demo's workdir with the default config, or any generator config and its workdir or `init_from`. Tabs:
- Generate: classes by name or index, the sampler's settings, a grid and the decoding order (the tokens each
  iteration decoded);
- Edit: a picture (uploaded, or one of the dataset's held-out images), a region drawn on it or a mask
  uploaded, then inpaint, outpaint or class edit, optionally cloned seamlessly into the picture;
- Interpolate: between two classes.
`Session` holds the models and does the work, so that the compiled programs are reused by every request;
`build_ui` is the page. Bad input is a message on the page. Needs the `app` extra (gradio, OpenCV).
"""

import dataclasses
import functools
import importlib.resources
import json
import os
import threading
import time
from typing import Optional

import gradio as gr
import jax
import numpy as np
from absl import app as absl_app, flags, logging as absl_logging
from ml_collections import config_flags
from PIL import Image

from bigr_jax import artifacts, config_sections, families, images as images_lib, parallel, typed_config
from bigr_jax.data.transforms import center_crop_arr
from bigr_jax.sampling import drawing, editing

FLAGS = flags.FLAGS

EDIT_TASKS = {"inpaint": "inpaint", "outpaint": "outpaint", "class edit": "edit"}
EDIT_RESULTS = 4  # results per edit request
DISPLAY_SIZE = 128  # small images are shown enlarged by a whole factor (nearest), so their pixels stay exact
MAX_IMAGES = 64  # per Generate request (classes x images per class): a request is answered in seconds, not minutes
MAX_SEED = 2**31 - 1
# Uploads are shown as large as their box allows, without smoothing (a 16 px digit stays legible).
CSS = "#edit-picture img, #edit-mask img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


def class_names(num_classes: int) -> list:
  """ImageNet's class names for 1000 classes (the list that ships with gradio), else the indices."""
  if num_classes == 1000:
    return json.loads((importlib.resources.files("gradio") / "media_assets/data/imagenet_labels.json").read_text())
  return [str(i) for i in range(num_classes)]


def _number(value, name: str, kind=float, low=None, high=None):
  """A field's number, or a ValueError naming the field and its range."""
  if value is None or value == "":
    raise ValueError(f"set the {name}")
  number = kind(value)
  if (low is not None and number < low) or (high is not None and number > high):
    bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
    raise ValueError(f"the {name} must be a number {bounds}, not {value}")
  return number


def _seed(value) -> int:
  return _number(value, "seed", int, 0, MAX_SEED)


def _unopened(upload: gr.Image) -> gr.Image:
  """The upload handed over as its file, unopened (gradio would open it first and answer a file that is no image
  with its generic error); `_upload` opens it, so that such a file is the page's message. (Not a subclass: gradio
  writes a .pyi stub beside the module of every component class.)"""
  upload.preprocess = lambda payload: None if payload is None else payload.path
  return upload


def _upload(path: str, what: str) -> Image.Image:
  return images_lib.open_image(path, f"{what} ({os.path.basename(path)})")


def _paintable(path: Optional[str]) -> Optional[str]:
  """The uploaded picture for the canvas, or nothing if it is no image."""
  if path is None:
    return None
  try:
    _upload(path, "the picture")
  except ValueError:
    return None
  return path


def enlarge(images) -> np.ndarray:
  """uint8 images (..., H, W, C) enlarged by the whole factor that brings H to about DISPLAY_SIZE."""
  images = np.asarray(images)
  images = images if images.dtype == np.uint8 else images_lib.to_uint8(images)
  factor = max(1, DISPLAY_SIZE // images.shape[-3])
  return images.repeat(factor, axis=-3).repeat(factor, axis=-2)


class CompileCounter:
  """Counts XLA compilations (jax's monitoring events), to show that a repeated request compiles nothing."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


class Session:
  """The models of one run, loaded once, and what each tab does; a request returns images and a status line.
  A request at most `batch` images at a time: every batch is padded to that size, so repeated requests of any
  size reuse one compiled sampler."""

  def __init__(self, config, workdir):
    family = families.family_of(config)
    if family.generator_stage is None:
      raise ValueError(f"the web app samples with a generator: this is a {family.name} config; give a generator or "
                       "demo config")
    gen, gen_workdir, self._held_out = family.generator_stage(config, workdir)
    self.sampler_config, self.run = drawing.sample_settings(gen.sample)
    self.edit = typed_config.from_section(config_sections.EditConfig, gen.edit, "config.edit")
    self.mesh = parallel.make_mesh(gen.mesh)
    models = artifacts.sampling_models(gen, gen_workdir, use_ema=self.run.use_ema)
    replicated = parallel.replicated(self.mesh)
    self.models = models._replace(generator_params=jax.device_put(models.generator_params, replicated),
                                  tokenizer_params=jax.device_put(models.tokenizer_params, replicated))
    self.num_classes = self.models.generator_config.num_classes
    self.names = class_names(self.num_classes)
    self.image_size = self.models.tokenizer_config.img_size
    self.batch = parallel.round_up_to_shards(self.run.batch_size or 8, self.mesh)
    self.compiles = CompileCounter()
    self.requests = 0  # numbers the status lines
    self.lock, self._device_lock = threading.Lock(), threading.Lock()

  # -- inputs --------------------------------------------------------------------------------------------------

  def parse_classes(self, text: str) -> np.ndarray:
    """'3, 7' or 'tench, goldfish' (or a mix) -> class ids; a name or index the model lacks is a ValueError."""
    lookup = {name.lower(): i for i, name in enumerate(self.names)}
    ids = []
    for item in (part.strip() for part in str(text).split(",")):
      if not item:
        continue
      if item.lstrip("-").isdigit():
        index = int(item)
        if not 0 <= index < self.num_classes:
          raise ValueError(f"class {index} is out of range: the model has classes 0 to {self.num_classes - 1}")
        ids.append(index)
      elif item.lower() in lookup:
        ids.append(lookup[item.lower()])
      else:
        raise ValueError(f"no class named {item!r}; give an index 0 to {self.num_classes - 1} or a name from the "
                         "list of classes")
    if not ids:
      raise ValueError("name at least one class (an index or a name)")
    return np.asarray(ids, np.int32)

  def one_class(self, value) -> int:
    ids = self.parse_classes(str(value))
    if len(ids) != 1:
      raise ValueError(f"give one class here, not {len(ids)}")
    return int(ids[0])

  @staticmethod
  def sampler_settings(base: config_sections.SamplerConfig, num_iter, cfg_scale,
                       gumbel_temp) -> config_sections.SamplerConfig:
    return base.replace(num_iter=_number(num_iter, "iterations", int, 1),
                        cfg_scale=_number(cfg_scale, "cfg scale", low=0),
                        gumbel_temp=_number(gumbel_temp, "gumbel temperature", low=0))

  def held_out(self, index):
    """The dataset's held-out image `index` (the demo), or the config's `edit.image` (a generator config)."""
    def work():
      if self._held_out is None:
        if not self.edit.image:
          raise ValueError("this config names no dataset images; upload a picture (or set --config.edit.image)")
        return Image.open(self.edit.image).convert("RGB"), f"loaded {self.edit.image}"
      if not 0 <= int(index) < len(self._held_out):
        raise ValueError(f"held-out image {index} is out of range: there are {len(self._held_out)}")
      return Image.fromarray(self._held_out[int(index)]["image"]), f"loaded held-out image {int(index)}"

    return self._timed(work)

  def picture(self, image: Image.Image) -> np.ndarray:
    """An uploaded picture, checked to be RGB, center-cropped to the tokenizer's size, in [0, 1]."""
    image = images_lib.check_rgb(image, "the picture")
    return np.asarray(center_crop_arr(image, self.image_size), np.float32) / 255.0

  @staticmethod
  def mask(picture: Image.Image, drawn: Optional[dict], uploaded: Optional[str]) -> np.ndarray:
    """The region to regenerate as a mask image of the picture's size: the uploaded mask if given (white =
    regenerate), else what was painted on the picture (any painted pixel)."""
    if uploaded is not None:
      mask = np.asarray(_upload(uploaded, "the mask").convert("L"))
    else:
      layers = (drawn or {}).get("layers") or []
      if not layers:
        raise ValueError("paint the region to regenerate on the picture, or upload a mask (white = regenerate)")
      mask = np.any([np.asarray(layer)[..., -1] > 0 for layer in layers], axis=0)
    mask = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    return np.asarray(mask.resize(picture.size, Image.NEAREST))

  # -- requests ------------------------------------------------------------------------------------------------

  def _timed(self, work):
    with self._device_lock:  # one request on the devices at a time, so that its time and compiles are its own
      compiles, start = self.compiles.count, time.perf_counter()
      result, what = work()
      seconds, compiled = time.perf_counter() - start, self.compiles.count - compiles
    return result, f"{what} in {seconds:.2f} s ({compiled} programs compiled)"

  def generate(self, classes: str, per_class, num_iter, cfg_scale, gumbel_temp, seed):
    """(grid, decoding-order strip) of `per_class` samples of each named class; a status line."""
    per_class, seed = _number(per_class, "images per class", int, 1, MAX_IMAGES), _seed(seed)
    labels = np.repeat(self.parse_classes(classes), per_class)
    if len(labels) > MAX_IMAGES:
      raise ValueError(f"{len(labels)} images asked for; at most {MAX_IMAGES} per request (fewer classes or images "
                       "per class)")
    config = self.sampler_settings(self.sampler_config, num_iter, cfg_scale, gumbel_temp)

    def work():
      padded = np.pad(labels, (0, -len(labels) % self.batch), mode="edge")
      out = drawing.generate_images(self.models, padded, config, seed, self.mesh, self.batch)
      images, decoded_at = out.images[:len(labels)], out.decoded_at[:len(labels)]
      grid = images_lib.make_grid(enlarge(images), nrow=per_class if len(set(labels)) > 1 else 8)
      strip = images_lib.decoding_strip(enlarge(images[:8]) / 255.0, decoded_at[:8], config.num_iter)
      return (grid, strip), f"{len(labels)} images"

    return self._timed(work)

  def edit_picture(self, picture, drawn, uploaded_mask, task: str, target_class, num_iter, cfg_scale, gumbel_temp,
                   seed, clone: bool):
    """Results of inpaint / outpaint / class edit on the picture, and (with `clone`) the same cloned into it."""
    if picture is None:
      raise ValueError("upload a picture first (or load a held-out one)")
    picture = _upload(picture, "the picture")
    image = self.picture(picture)
    mask = self.mask(picture, drawn, uploaded_mask)
    edit = dataclasses.replace(
        self.edit, task=EDIT_TASKS[task], seed=_seed(seed), seamless_clone=bool(clone),
        batch=parallel.round_up_to_shards(EDIT_RESULTS, self.mesh),
        target_class=self.one_class(target_class) if EDIT_TASKS[task] == "edit" else self.edit.target_class)
    defaults = editing.TASK_SAMPLERS[edit.task]
    edit = dataclasses.replace(edit, sampler={**edit.sampler, **dataclasses.asdict(
        self.sampler_settings(defaults, num_iter, cfg_scale, gumbel_temp))})

    def work():
      edited = drawing.edit_images(self.models, edit, self.mesh, image=image, mask=mask)
      shown = EDIT_RESULTS
      results = images_lib.make_grid(enlarge(np.concatenate([image[None], edited.images[:shown]])), nrow=shown + 1)
      cloned = None
      if edited.cloned is not None:
        cloned = images_lib.make_grid(enlarge(np.concatenate([image[None], edited.cloned[:shown]])), nrow=shown + 1)
      strip = images_lib.decoding_strip(enlarge(edited.images[:shown]) / 255.0, edited.decoded_at[:shown],
                                        editing.task_sampler(edit).num_iter)
      return (results, cloned, strip), f"{task}: {shown} results"

    return self._timed(work)

  def interpolate(self, class_a, class_b, num_iter, cfg_scale, gumbel_temp, seed):
    """The original's interpolation strip from class A to class B."""
    edit = dataclasses.replace(self.edit, task="interpolate", class_a=self.one_class(class_a),
                               class_b=self.one_class(class_b), seed=_seed(seed))
    edit = dataclasses.replace(edit, sampler={**edit.sampler, **dataclasses.asdict(
        self.sampler_settings(editing.INTERPOLATE_CONFIG, num_iter, cfg_scale, gumbel_temp))})

    def work():
      edited = drawing.edit_images(self.models, edit, self.mesh)
      return images_lib.make_grid(enlarge(edited.images[::-1]), nrow=9), f"{len(edited.images)} steps"

    return self._timed(work)


def _guarded(session: "Session", method, outputs: int):
  """A handler whose status line starts with the request's number; a ValueError (bad input) is shown there,
  with empty outputs, not as a traceback."""
  def handler(*args):
    with session.lock:
      session.requests += 1
      number = session.requests
    try:
      result, status = method(*args)
    except (ValueError, FileNotFoundError, ImportError) as e:
      return (*([None] * outputs), f"request {number}: **Error:** {e}")
    return (*(result if isinstance(result, tuple) else (result,)), f"request {number}: {status}")
  return handler


def build_ui(session: Session) -> gr.Blocks:
  """The page: three tabs over `session`; every output image is a PNG, every request ends in a status line."""
  config = session.sampler_config
  class_list = ", ".join(f"{i}: {name}" for i, name in enumerate(session.names))

  def settings(base: config_sections.SamplerConfig, prefix: str):
    with gr.Row():
      return (gr.Slider(1, 64, value=base.num_iter, step=1, label="iterations", elem_id=f"{prefix}-iter"),
              gr.Number(value=base.cfg_scale, label="cfg scale", elem_id=f"{prefix}-cfg"),
              gr.Number(value=base.gumbel_temp, label="gumbel temperature", elem_id=f"{prefix}-gumbel"),
              gr.Number(value=0, precision=0, label="seed", elem_id=f"{prefix}-seed"))

  with gr.Blocks(title="BiGR", analytics_enabled=False) as page:  # no calls home from a research machine
    gr.Markdown(f"## BiGR: {session.num_classes} classes, {session.image_size} px")
    with gr.Tab("Generate"):
      classes = gr.Textbox(label="classes (indices or names, comma-separated)", value="0", elem_id="gen-classes")
      per_class = gr.Slider(1, 8, value=2, step=1, label="images per class", elem_id="gen-per-class")
      gen_settings = settings(config, "gen")
      generate = gr.Button("Generate", variant="primary", elem_id="gen-run")
      grid = gr.Image(label="samples", type="numpy", format="png", interactive=False, elem_id="gen-grid")
      strip = gr.Image(label="decoding order: one column per iteration, grey = not yet decoded", type="numpy",
                       format="png", interactive=False, elem_id="gen-order")
      gen_status = gr.Markdown(elem_id="gen-status")
      with gr.Accordion("class names", open=False):
        gr.Markdown(class_list)
      generate.click(_guarded(session, session.generate, 2), [classes, per_class, *gen_settings], [grid, strip, gen_status])

    with gr.Tab("Edit"):
      with gr.Row():
        picture = _unopened(gr.Image(label="picture (RGB)", type="filepath", image_mode=None, sources=["upload"],
                                     format="png", height=DISPLAY_SIZE * 2, elem_id="edit-picture"))
        canvas = gr.ImageEditor(label="paint the region to regenerate (outpaint: to keep)", type="numpy", sources=[], transforms=[],
                                layers=False, brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed",
                                                                    default_size=max(1, session.image_size // 8)),
                                elem_id="edit-canvas")
        uploaded_mask = _unopened(gr.Image(label="or upload a mask (white = regenerate; outpaint: keep)",
                                           type="filepath", sources=["upload"], format="png",
                                           height=DISPLAY_SIZE * 2, elem_id="edit-mask"))
      with gr.Row():
        held_out_index = gr.Number(value=0, precision=0, label="held-out image", elem_id="edit-held-out-index")
        load = gr.Button("Load a held-out image", elem_id="edit-held-out")
      with gr.Row():
        task = gr.Radio(list(EDIT_TASKS), value="inpaint", label="task", elem_id="edit-task")
        target = gr.Textbox(value="0", label="target class (class edit)", elem_id="edit-target")
        clone = gr.Checkbox(value=True, label="clone seamlessly into the picture (OpenCV)", elem_id="edit-clone")
      edit_settings = settings(editing.EDIT_CONFIG, "edit")
      run_edit = gr.Button("Edit", variant="primary", elem_id="edit-run")
      results = gr.Image(label="the picture, then results", type="numpy", format="png", interactive=False,
                         elem_id="edit-results")
      cloned = gr.Image(label="cloned seamlessly", type="numpy", format="png", interactive=False,
                        elem_id="edit-cloned")
      edit_strip = gr.Image(label="decoding order", type="numpy", format="png", interactive=False,
                            elem_id="edit-order")
      edit_status = gr.Markdown(elem_id="edit-status")

      load.click(_guarded(session, session.held_out, 1), [held_out_index], [picture, edit_status])
      picture.change(_paintable, [picture], [canvas])  # the picture becomes the canvas to paint on
      run_edit.click(_guarded(session, session.edit_picture, 3),
                     [picture, canvas, uploaded_mask, task, target, *edit_settings, clone],
                     [results, cloned, edit_strip, edit_status])

    with gr.Tab("Interpolate"):
      with gr.Row():
        class_a = gr.Textbox(value="0", label="class A", elem_id="interp-a")
        class_b = gr.Textbox(value="1", label="class B", elem_id="interp-b")
      interp_settings = settings(editing.INTERPOLATE_CONFIG, "interp")
      run_interp = gr.Button("Interpolate", variant="primary", elem_id="interp-run")
      interp = gr.Image(label="from A (top left) to B", type="numpy", format="png", interactive=False,
                        elem_id="interp-result")
      interp_status = gr.Markdown(elem_id="interp-status")
      run_interp.click(_guarded(session, session.interpolate, 1), [class_a, class_b, *interp_settings],
                       [interp, interp_status])
  return page


def main(argv):
  if len(argv) > 1:
    raise absl_app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    session = Session(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:  # before serving (a damaged checkpoint too): one line, status 1
    raise SystemExit(f"error: {e}") from e
  page = build_ui(session)
  theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts to fetch
  print(f"serving on http://127.0.0.1:{FLAGS.port}", flush=True)
  page.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=FLAGS.port, theme=theme, css=CSS,
                                                 ssr_mode=False, quiet=True, footer_links=[])


def define_flags(flag_values: flags.FlagValues = FLAGS, sys_argv=None) -> None:
  """Defined only when the app runs, so that importing it beside `bigr_jax.main` (whose flags share names) works;
  on another set than FLAGS, a command line given as `sys_argv` parses."""
  config_flags.DEFINE_config_file("config", "configs/demo.py", "A generator or demo config (with optional :args).",
                                  flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "The run's workdir (the demo's, or a generator's).", flag_values=flag_values)
  flags.DEFINE_integer("port", 7860, "Port on 127.0.0.1.", flag_values=flag_values)
  flags.mark_flags_as_required(["workdir"], flag_values=flag_values)


if __name__ == "__main__":
  define_flags()
  absl_app.run(main, flags_parser=functools.partial(typed_config.parse_flags_or_exit, FLAGS))
