"""Generator train step on this machine: step time, compiled vs analytic FLOPs, optionally vs the original.

  .venv/bin/python benchmarks/train_step.py                          # runlocal, tiny and BiGR-L width at 4 layers
  .venv/bin/python benchmarks/train_step.py --configs=L-d4 --layers=8 --batch=8
  .venv/bin/python benchmarks/train_step.py --original=../BiGR       # also the original PyTorch step

One step = forward + backward + AdamW (with global-norm clipping) + EMA, as `GeneratorTrainer.train_step`
runs it (float32, random weights, one device). Layers are unrolled by default, the faster choice on a CPU at
a few layers (`--scan` times nn.scan, the TPU configs' default). Compiled FLOPs come from XLA's
`cost_analysis()`; it counts a scanned layer stack's body once, so with `--scan` they are read from an
unrolled copy of the step (`--flops=unrolled`). The original (github.com/haoosz/BiGR, from its checkout
`--original=CHECKOUT`, copied to a temp dir with torchvision stubbed) runs `model.train()`, forward with
targets, `backward()`, grad clipping, AdamW and its EMA update, as its train_ddp.py does (eager, float32;
`--original_compile` wraps the model in torch.compile as its default training does).

With `--original`, the two sides take turns (ours, theirs, ours, ...; each turn is an untimed step, then
about `--turn_s` seconds of steps back to back), and `speedup.wall_paired` is the median over rounds of
their turn's median step time over ours. On a shared machine the load drifts between runs, and both sides
drift with it, so a paired ratio is steadier than a ratio of two separate medians. Prints one JSON line;
details on stderr.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import ml_collections
import numpy as np

from bigr_jax import parallel
from bigr_jax.compile import report
from bigr_jax.typed_config import load_config_file
from bigr_jax.models import bigr
from bigr_jax.models.config import MODEL_SIZES, GeneratorConfig
from bigr_jax.train.generator_trainer import GeneratorTrainer
from bigr_jax import trees
import original_code  # benchmarks/original_code.py (scripts run from their folder)

CONFIGS = {
    "tiny": dict(dim=64, n_layer=2, n_head=4, denoise_hidden_dim=64, num_block_mlp=2, binary_size=16,
                 num_classes=10),
    # The `:runlocal` / demo scale: 4x4 tokens (COMMON's 256 tokens do not apply).
    "runlocal": dict(dim=64, n_layer=2, n_head=4, denoise_hidden_dim=64, num_block_mlp=2, binary_size=16,
                     num_classes=10, block_size=16, seq_len=16),
    "L-d4": dict(MODEL_SIZES["L"], n_layer=4),  # n_layer follows --layers
    "L": dict(MODEL_SIZES["L"]),
}
COMMON = dict(binary_size=24, block_size=256, seq_len=256, dtype="float32")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
def log(*args):
  print("#", *args, file=sys.stderr, flush=True)


def model_config(name: str, layers: int, **overrides) -> GeneratorConfig:
  fields = {**COMMON, **CONFIGS[name], **overrides}
  if name == "L-d4":
    fields["n_layer"] = layers
  return GeneratorConfig(**fields)


def make_trainer(cfg: GeneratorConfig) -> GeneratorTrainer:
  """A trainer on one device with the released optimizer settings (AdamW 0.9/0.95, clip 1, EMA)."""
  config = load_config_file(os.path.join(CONFIG_DIR, "bigr_l.py"))
  config.model = ml_collections.ConfigDict(dataclasses.asdict(cfg))
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return GeneratorTrainer(config, parallel.make_mesh(config.mesh, jax.devices()[:1]), total_steps=1000)


def random_batch(cfg, batch: int, seed: int = 0) -> dict:
  """Random codes and labels for a model config (a GeneratorConfig or a config's `model` fields)."""
  rng = np.random.default_rng(seed)
  return {"bits": rng.integers(0, 2, (batch, cfg.seq_len, cfg.binary_size)).astype(np.float32),
          "label": rng.integers(0, cfg.num_classes, (batch,)).astype(np.int32)}


def analytic_terms(cfg: GeneratorConfig) -> dict:
  """The terms of `bigr.train_flops_per_image` (per image, forward + backward), to see which one is off."""
  length = cfg.seq_len + cfg.cls_token_num
  kv_dim = cfg.kv_heads * cfg.head_dim
  w = cfg.denoise_hidden_dim
  block = 2 * (cfg.dim * (cfg.dim + 2 * kv_dim) + cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden_dim)
  denoiser = 2 * (cfg.binary_size * w + cfg.dim * w + 256 * w + w * w + cfg.num_block_mlp * 5 * w * w
                  + 2 * w * w + w * cfg.binary_size)
  return {"trunk_matmuls": 3.0 * cfg.n_layer * length * block,
          "attention": 3.0 * cfg.n_layer * 4 * length * length * cfg.dim,
          "token_embed": 3.0 * 2 * cfg.seq_len * cfg.binary_size * cfg.dim,
          "transcoder": 3.0 * cfg.seq_len * denoiser}


def flops_of(compiled) -> float:
  return float(report.cost_analysis(compiled)["flops"])


def compiled_flops(cfg: GeneratorConfig, batch: int) -> tuple:
  trainer = make_trainer(cfg)
  start = time.perf_counter()
  compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(batch), jax.random.key(0)).compile()
  return flops_of(compiled), time.perf_counter() - start


class Timer:
  """Times a step function (it returns the step's loss) in turns: an untimed step (it pays for waking idle
  worker threads), then `block` timed steps back to back, as training runs them. Keeps every timed step,
  each turn's median and the last loss."""

  def __init__(self, step, block: int):
    self.step, self.block, self.walls, self.cpus, self.turns = step, block, [], [], []
    self.loss = None

  def turn(self):
    self.step()
    walls = []
    for _ in range(self.block):
      wall, cpu = time.perf_counter(), time.process_time()
      self.loss = self.step()
      walls.append(time.perf_counter() - wall)
      self.cpus.append(time.process_time() - cpu)
    self.walls += walls
    self.turns.append(statistics.median(walls))

  def summary(self) -> dict:
    return dict(step_s=round(statistics.median(self.walls), 4), step_s_all=[round(w, 4) for w in self.walls],
                cpu_s=round(statistics.median(self.cpus), 4))


def jax_runner(name: str, args):
  """(one-step function returning the loss, facts) for our step; compiled, initialised and warmed up."""
  cfg = model_config(name, args.layers, scan_layers=args.scan)
  trainer = make_trainer(cfg)
  start = time.perf_counter()
  compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(args.batch),
                                     jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  log(f"jax {name}: compiled in {compile_s:.1f} s")
  holder = {"state": trainer.init(jax.random.key(0))}
  batch = jax.device_put(random_batch(cfg, args.batch))
  key = jax.random.key(1)

  def step():
    holder["state"], metrics = compiled(holder["state"], batch, key)
    return float(metrics["loss"])  # waits for the step, as the original's float(loss) does

  for _ in range(3):  # warm-up: the first steps also pay for allocation and page faults
    step()
  facts = dict(config={k: v for k, v in dataclasses.asdict(cfg).items() if k in (
      "dim", "n_layer", "n_head", "denoise_hidden_dim", "num_block_mlp", "binary_size", "seq_len", "scan_layers")},
               params=trees.count_params(holder["state"].params), compile_s=round(compile_s, 2))
  if args.flops != "off":
    analytic = bigr.train_flops_per_image(cfg) * args.batch
    if args.flops == "timed" or not cfg.scan_layers:
      flops, source = flops_of(compiled), "timed step"
    else:
      flops, flops_compile_s = compiled_flops(cfg.replace(scan_layers=False), args.batch)
      source = f"unrolled copy (compiled in {flops_compile_s:.1f} s)"
    terms = {k: v * args.batch for k, v in analytic_terms(cfg).items()}
    facts["flops"] = dict(compiled=flops, analytic=analytic, compiled_over_analytic=round(flops / analytic, 4),
                          source=source, analytic_terms=terms,
                          terms_sum_matches=bool(abs(sum(terms.values()) - analytic) <= 1e-6 * analytic))
    log(f"jax {name}: compiled {flops:.4g} FLOPs vs analytic {analytic:.4g} ({flops / analytic:.4f}), {source}")
  return step, facts


def original_runner(name: str, args):
  """(one-step function returning the loss, facts) for the original's step, built as its train_ddp.py
  trains, warmed up."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  gpt = original_code.load_original(args.original)
  cfg = model_config(name, args.layers)
  torch.manual_seed(0)
  with contextlib.redirect_stdout(io.StringIO()):  # it prints "We are using adaLN!"
    model = gpt.Transformer(gpt.ModelArgs(
        dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head, num_block_mlp=cfg.num_block_mlp,
        denoise_hidden_dim=cfg.denoise_hidden_dim, binary_size=cfg.binary_size, num_classes=cfg.num_classes,
        block_size=cfg.block_size, seq_len=cfg.seq_len, p_flip=cfg.p_flip, focal=cfg.focal, alpha=cfg.alpha,
        use_adaLN=cfg.use_adaLN, class_dropout_prob=cfg.class_dropout_prob, token_dropout_p=cfg.token_dropout_p,
        resid_dropout_p=cfg.resid_dropout_p, ffn_dropout_p=cfg.ffn_dropout_p, n_sample_steps=cfg.n_sample_steps))
  ema = [p.detach().clone() for p in model.parameters()]
  decay, no_decay = [], []
  for pname, p in model.named_parameters():  # the original's add_weight_decay
    (no_decay if p.ndim == 1 or pname.endswith(".bias") or "denoise_mlp" in pname else decay).append(p)
  opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 2e-2}],
                          lr=1e-4, betas=(0.9, 0.95))
  model.train()
  forward = torch.compile(model) if args.original_compile else model
  data = random_batch(cfg, args.batch)
  bits, labels = torch.from_numpy(data["bits"]), torch.from_numpy(data["label"]).long()

  def step():
    _, stats = forward(inp=bits, cond_idx=labels, targets=bits)
    opt.zero_grad()
    stats["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema, model.parameters()):
        e.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
    return float(stats["loss"].detach())

  start = time.perf_counter()
  step()  # warm-up (and compilation with --original_compile)
  facts = dict(torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
               compiled=args.original_compile, params=sum(p.numel() for p in model.parameters()),
               first_step_s=round(time.perf_counter() - start, 3))
  step()
  return step, facts


def bench(name: str, args) -> dict:
  """Our step (and the original's, taking turns with it, so that both see the same machine load)."""
  runners = {"jax": jax_runner(name, args)}
  if args.original:
    runners["original"] = original_runner(name, args)
  # Each turn: as many steps as ours runs in about `turn_s` seconds (both sides run the same number).
  start = time.perf_counter()
  runners["jax"][0]()
  block = max(1, min(50, round(args.turn_s / (time.perf_counter() - start))))
  timers = {side: Timer(step, block) for side, (step, _) in runners.items()}
  for _ in range(args.repeats):
    for timer in timers.values():
      timer.turn()
  result = {}
  for side, (_, facts) in runners.items():
    facts = dict(facts, **timers[side].summary(), loss=round(timers[side].loss, 4))
    facts["images_per_s"] = round(args.batch / facts["step_s"], 3)
    if "flops" in facts:
      facts["achieved_gflops_per_s"] = round(facts["flops"]["compiled"] / facts["step_s"] / 1e9, 2)
    log(f"{side} {name}: steps {facts['step_s_all']} s, loss {facts['loss']}")
    result[side] = facts
  if args.original:
    ours, theirs = timers["jax"], timers["original"]
    # Each round times both back to back: the median of per-round ratios cancels slow drifts in load.
    result["speedup"] = dict(
        wall_paired=round(statistics.median(t / o for o, t in zip(ours.turns, theirs.turns)), 3),
        wall=round(statistics.median(theirs.walls) / statistics.median(ours.walls), 3),
        cpu=round(statistics.median(theirs.cpus) / statistics.median(ours.cpus), 3))
    log(f"speedup {name}: {result['speedup']}")
  result["load_avg"] = os.getloadavg()[0]
  return result


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="runlocal,tiny,L-d4", help=f"comma-separated, of {sorted(CONFIGS)}")
  parser.add_argument("--layers", type=int, default=4, help="depth of L-d4")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5, help="turns per side (median over all their steps)")
  parser.add_argument("--scan", action="store_true",
                      help="time the layers under nn.scan (the TPU configs' default) instead of unrolled")
  parser.add_argument("--flops", default="unrolled", choices=("unrolled", "timed", "off"),
                      help="where compiled FLOPs come from (scan bodies count once in 'timed')")
  parser.add_argument("--original", default="", metavar="CHECKOUT",
                      help="also time the original PyTorch train step, from this checkout of github.com/haoosz/BiGR")
  parser.add_argument("--turn_s", type=float, default=0.5,
                      help="seconds of timed steps per turn (at least one step); turns of each side alternate")
  parser.add_argument("--original_compile", action="store_true", help="torch.compile the original")
  return parser


def main():
  args = build_parser().parse_args()
  result = dict(benchmark="train_step", backend=jax.default_backend(), devices=str(jax.devices()[0]),
                cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(), batch=args.batch,
                dtype="float32", repeats=args.repeats, load_avg_start=os.getloadavg()[0], runs={},
                note="wall-clock seconds, median of all timed steps, on this (possibly shared) machine; "
                     "cpu_s: process CPU seconds, all threads")
  for name in args.configs.split(","):
    result["runs"][name] = bench(name, args)
  result["load_avg_end"] = os.getloadavg()[0]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
