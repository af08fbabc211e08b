"""Sampler speed on this machine: compile time, images/s and the trunk / transcoder split; prints one JSON line.

  python benchmarks/sampler.py                                  # tiny and BiGR-L width at 4 layers
  python benchmarks/sampler.py --configs=L --num_iters=4        # full BiGR-L
  python benchmarks/sampler.py --original=../BiGR               # also the original PyTorch sampler

Random weights (speed does not depend on them: every count is fixed by the schedule). The original is run
from a checkout of github.com/haoosz/BiGR (`--original=CHECKOUT`), copied to a temp dir with
torchvision stubbed. Its iterations all cost the same (the full trunk and every token transcoded), so by
default one iteration is timed and images/s at I iterations is 1 / (I x that); `--original_full` runs
every setting instead.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigr_jax import config_sections
from bigr_jax.models import bigr
from bigr_jax.models.config import MODEL_SIZES, GeneratorConfig
from bigr_jax.sampling import sampler, schedules
import original_code  # benchmarks/original_code.py (scripts run from their folder)

CONFIGS = {
    "tiny": dict(dim=64, n_layer=2, n_head=4, denoise_hidden_dim=64, num_block_mlp=2, binary_size=16,
                 num_classes=10),
    "L-d4": dict(MODEL_SIZES["L"], n_layer=4),
    "L": dict(MODEL_SIZES["L"]),
}
COMMON = dict(binary_size=24, block_size=256, seq_len=256, p_flip=True, focal=0.0, use_adaLN=True,
              resid_dropout_p=0.0, ffn_dropout_p=0.0, token_dropout_p=0.0)


def _config(name: str) -> GeneratorConfig:
  return GeneratorConfig(**{**COMMON, **CONFIGS[name]})


def _time(fn, repeats: int = 1):
  """Best (wall, process CPU) seconds of `repeats` calls; CPU time is less sensitive to other processes."""
  times = []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - wall, time.process_time() - cpu))
  return min(times)


def bench_jax(name: str, num_iters, batch: int, infer_steps: int, cfg_scale: float, sizes: int) -> dict:
  cfg = _config(name)
  params = nn.meta.unbox(bigr.init_params(cfg, jax.random.key(0)))
  labels = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes
  bits = jnp.zeros((batch, cfg.seq_len, cfg.binary_size))
  masked = jnp.ones((batch, cfg.seq_len), bool)
  # The trunk alone, on the CFG batch, as the sampler runs it once per iteration.
  model = bigr.BiGR(cfg)
  trunk = jax.jit(lambda p, b, l, m: model.apply({"params": p}, b, l, m, method=bigr.BiGR.condition))
  trunk_args = (params, jnp.zeros((2 * batch, cfg.seq_len, cfg.binary_size)), jnp.concatenate([labels, labels]),
                jnp.ones((2 * batch, cfg.seq_len), bool))
  jax.block_until_ready(trunk(*trunk_args))
  trunk_s, _ = _time(lambda: trunk(*trunk_args), repeats=3)
  runs = {}
  for num_iter in num_iters:
    config = config_sections.SamplerConfig(num_iter=num_iter, cfg_scale=cfg_scale, gumbel_temp=0.01, transcode_sizes=sizes,
                                   infer_steps=infer_steps)
    tables = {k: jnp.asarray(v) for k, v in schedules.tables(config, cfg.seq_len).items()}
    static = sampler._Static(sampler._static_part(config), cfg, None, ("data",))  # pylint: disable=protected-access
    start = time.perf_counter()
    compiled = sampler._sample.lower(params, labels, None, jax.random.key(1), bits, masked, tables,  # pylint: disable=protected-access
                                     static=static).compile()
    compile_s = time.perf_counter() - start
    call = lambda: compiled(params, labels, None, jax.random.key(1), bits, masked, tables)
    run_s, cpu_s = _time(call)
    if run_s < 10:  # short runs: the first call's one-off costs matter, take the best of a few more
      run_s, cpu_s = min((run_s, cpu_s), _time(call, repeats=3))
    trunk_share = min(1.0, num_iter * trunk_s / run_s)
    runs[str(num_iter)] = dict(compile_s=round(compile_s, 2), run_s=round(run_s, 3), cpu_s=round(cpu_s, 3),
                               images_per_s=round(batch / run_s, 5), trunk_share=round(trunk_share, 3),
                               transcoder_share=round(1 - trunk_share, 3), load_avg=os.getloadavg()[0])
    print(f"# jax {name} I={num_iter}: {runs[str(num_iter)]}", file=sys.stderr, flush=True)
  return dict(config=CONFIGS[name], trunk_pass_s=round(trunk_s, 3), runs=runs)


def bench_original(name: str, num_iters, batch: int, infer_steps: int, cfg_scale: float, repo: str,
                   full: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  gpt = original_code.load_original(repo)
  cfg = _config(name)
  torch.manual_seed(0)
  np.random.seed(0)
  with contextlib.redirect_stdout(sys.stderr):  # it prints; stdout is for the JSON line
    model = gpt.Transformer(gpt.ModelArgs(
        dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head, num_block_mlp=cfg.num_block_mlp,
        denoise_hidden_dim=cfg.denoise_hidden_dim, binary_size=cfg.binary_size, num_classes=cfg.num_classes,
        block_size=cfg.block_size, seq_len=cfg.seq_len, p_flip=True, focal=0.0, use_adaLN=True,
        infer_steps=infer_steps, resid_dropout_p=0.0, ffn_dropout_p=0.0, token_dropout_p=0.0)).eval()
  sample = model.diffusion_processor.sample
  in_transcoder = [0.0]

  def timed_sample(*args, **kwargs):
    start = time.perf_counter()
    out = sample(*args, **kwargs)
    in_transcoder[0] += time.perf_counter() - start
    return out

  model.diffusion_processor.sample = timed_sample
  labels = torch.arange(batch) % cfg.num_classes

  def run(num_iter):
    in_transcoder[0] = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
      model.generate_with_cfg(cond=labels, max_new_tokens=cfg.seq_len, num_iter=num_iter, out_dim=cfg.binary_size,
                              cfg_scale=cfg_scale, gumbel_temp=0.01)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, in_transcoder[0] / wall

  runs = {}
  if full:
    for num_iter in num_iters:
      run_s, cpu_s, share = run(num_iter)
      runs[str(num_iter)] = dict(run_s=round(run_s, 3), cpu_s=round(cpu_s, 3), images_per_s=round(batch / run_s, 5),
                                 transcoder_share=round(share, 3), measured=True, load_avg=os.getloadavg()[0])
      print(f"# original {name} I={num_iter}: {runs[str(num_iter)]}", file=sys.stderr, flush=True)
  else:
    iteration_s, iteration_cpu_s, share = run(1)
    print(f"# original {name}: one iteration {iteration_s:.2f} s (cpu {iteration_cpu_s:.2f} s), transcoder "
          f"{share:.3f}", file=sys.stderr, flush=True)
    for num_iter in num_iters:
      runs[str(num_iter)] = dict(run_s=round(num_iter * iteration_s, 3), cpu_s=round(num_iter * iteration_cpu_s, 3),
                                 images_per_s=round(batch / (num_iter * iteration_s), 5),
                                 transcoder_share=round(share, 3), measured=False, load_avg=os.getloadavg()[0])
  return dict(torch_version=torch.__version__, torch_threads=torch.get_num_threads(), runs=runs)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny,L-d4", help=f"comma-separated, of {sorted(CONFIGS)}")
  parser.add_argument("--num_iters", default="4,8,20")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--infer_steps", type=int, default=100)
  parser.add_argument("--cfg_scale", type=float, default=3.0)
  parser.add_argument("--transcode_sizes", type=int, default=config_sections.SamplerConfig().transcode_sizes)
  parser.add_argument("--original", default="", metavar="CHECKOUT",
                      help="also time the original PyTorch sampler, from this checkout of github.com/haoosz/BiGR")
  parser.add_argument("--original_full", action="store_true", help="time every original setting in full")
  return parser


def main():
  args = build_parser().parse_args()
  num_iters = [int(i) for i in args.num_iters.split(",")]
  result = dict(benchmark="sampler", backend=jax.default_backend(), devices=str(jax.devices()[0]),
                cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(), batch=args.batch,
                infer_steps=args.infer_steps, cfg_scale=args.cfg_scale, transcode_sizes=args.transcode_sizes,
                load_avg_start=os.getloadavg()[0], jax={}, original={},
                note="wall-clock seconds on this (possibly shared) machine; cpu_s: process CPU seconds, all threads")
  for name in args.configs.split(","):
    result["jax"][name] = bench_jax(name, num_iters, args.batch, args.infer_steps, args.cfg_scale,
                                    args.transcode_sizes)
    if args.original:
      result["original"][name] = bench_original(name, num_iters, args.batch, args.infer_steps, args.cfg_scale,
                                                args.original, args.original_full)
      ours, theirs = result["jax"][name]["runs"], result["original"][name]["runs"]
      result["speedup_" + name] = {i: dict(wall=round(theirs[i]["run_s"] / ours[i]["run_s"], 2),
                                           cpu=round(theirs[i]["cpu_s"] / ours[i]["cpu_s"], 2)) for i in ours}
  result["load_avg_end"] = os.getloadavg()[0]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
