"""Entropy-ordered sampler of BiGR (the original's `generate_with_cfg`) as one jitted program.

Per iteration: run the trunk once on the CFG batch, run the transcoder's reverse Bernoulli diffusion
(`infer_steps` steps, CFG on the denoiser logits) for the still-masked tokens, score every token by the mean
over bits of |2p - 1| (p = predicted P(z0 = 1) at the last reverse step), add scaled Gumbel noise, and
decode the top-scoring tokens, drawing their bits from Bernoulli(p). Both loops are `lax.fori_loop`s with
static trip counts; per-iteration counts, CFG scales and Gumbel temperatures are arrays passed in, so
labels, seeds, masks and schedule values change nothing in the compiled program.

Work the original does that is not needed (the distribution of the result is unchanged):
- decoded tokens are not transcoded: tokens are put in a masked-first order and each diffusion step runs
  the smallest of a few padded sizes that holds the masked ones (`lax.switch`);
- each token's condition embedding is computed once per iteration, each timestep's embedding once;
- the conditional and null halves go through one call and share the embedding of x_t.

The model comes in as callbacks (`ModelFns`), as in maskgit's `parallel_decode`.
"""

import contextlib
import functools
from typing import Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigr_jax import parallel
from bigr_jax.config_sections import SamplerConfig
from bigr_jax.models.bigr import BiGR, forward_flops
from bigr_jax.models.config import GeneratorConfig
from bigr_jax.models.transcoder import bernoulli_posterior, reverse_coefficients
from bigr_jax.sampling import schedules

# One key per purpose; each is folded with the iteration (and the diffusion step).
NOISE_PURPOSES = {"init": 0, "diffusion": 1, "gumbel": 2, "tokens": 3, "order": 4}


class ModelFns(NamedTuple):
  """The model, as the sampler sees it.

  condition: (bits (B, N, K), token_mask (B, N)) -> transcoder conditions (B, G, N, dim); G = 2 holds the
    labelled and the null half (CFG), G = 1 the labelled half only.
  embed_condition: (..., dim) -> (..., W). embed_time: t - 1 (S,) -> (S, W).
  denoise_step: (x_t (..., K), t_emb, c_emb broadcasting against it) -> flip (or z0) logits (..., K).
  """
  condition: Callable
  embed_condition: Callable
  embed_time: Callable
  denoise_step: Callable
  p_flip: bool = True
  num_timesteps: int = 256


@flax.struct.dataclass
class SamplerState:
  """bits (B, N, K) float32 in {0, 1}; masked (B, N), True = still to decode; decoded_at (B, N) int32, the
  iteration that decoded each token last (-1: never, i.e. a known token)."""
  bits: jax.Array
  masked: jax.Array
  decoded_at: jax.Array


@flax.struct.dataclass
class SampleOutput:
  """bits (B, N, K) float32 in {0, 1}; decoded_at (B, N) int32 (see `SamplerState`), for showing the order."""
  bits: jax.Array
  decoded_at: jax.Array


def noise_key(rng, purpose: str, *indices):
  """The key of one purpose (a `NOISE_PURPOSES` name) folded with the given indices."""
  key = jax.random.fold_in(rng, NOISE_PURPOSES[purpose])
  for index in indices:
    key = jax.random.fold_in(key, index)
  return key


def model_fns(config: GeneratorConfig, params, labels, label_weights=None, guidance: bool = True) -> ModelFns:
  """Callbacks of a `BiGR` with `params`, conditioned on labels (B,) or weighted labels (B, M)."""
  model = BiGR(config)

  def apply(method, *args):
    return model.apply({"params": params}, *args, method=method)

  def condition(bits, token_mask):
    batch = bits.shape[0]
    if not guidance:
      return apply(BiGR.condition, bits, labels, token_mask, label_weights)[:, None]
    # Rows interleaved (labelled, null) so that a batch-sharded input stays batch-sharded.
    both = jnp.stack([labels, jnp.full_like(labels, config.null_class)], axis=1)
    both = both.reshape(2 * batch, *labels.shape[1:])
    weights = None if label_weights is None else jnp.repeat(label_weights, 2, axis=0)
    cond = apply(BiGR.condition, jnp.repeat(bits, 2, axis=0), both, jnp.repeat(token_mask, 2, axis=0), weights)
    return cond.reshape(batch, 2, *cond.shape[1:])

  return ModelFns(
      condition=condition,
      embed_condition=lambda cond: apply(BiGR.embed_condition, cond),
      embed_time=lambda t_minus_1: apply(BiGR.embed_time, t_minus_1),
      denoise_step=lambda x_t, t_emb, c_emb: apply(BiGR.denoise_step, x_t, t_emb, c_emb),
      p_flip=config.p_flip,
      num_timesteps=config.n_sample_steps)


def token_scores(probs, ordering: str = "confidence"):
  """(B, N) score of each token from its bit probabilities (B, N, K): higher is decoded first ("random" is
  drawn in `_decode_tokens`)."""
  if ordering == "confidence":
    return jnp.mean(jnp.abs(probs - 0.5) * 2.0, axis=-1)
  entropy = -(jax.scipy.special.xlogy(probs, probs) + jax.scipy.special.xlogy(1 - probs, 1 - probs))
  return -jnp.mean(entropy, axis=-1)


def top_k_mask(scores, counts):
  """(B, N) True at each row's `counts` highest scores; ties go to the lower index, so exactly `counts`."""
  order = jnp.argsort(-scores, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)
  return ranks < counts[:, None]


def flops_per_image(model_config: GeneratorConfig, config: SamplerConfig) -> float:
  """Analytic matmul FLOPs of class-conditional generation, per image: each iteration runs the trunk and the
  condition embedding on every token, then `infer_steps` denoising passes on the transcoded tokens (the
  smallest padded size holding the still-masked ones); the null half (CFG) doubles all of it."""
  f = forward_flops(model_config)
  num_tokens = model_config.seq_len
  counts = schedules.unmask_table(num_tokens, config.num_iter, config.mask_schedule)[num_tokens]
  sizes = padded_sizes(num_tokens, config.transcode_sizes)
  masked = num_tokens - np.concatenate([[0], np.cumsum(counts)[:-1]])
  transcoded = sum(min(s for s in sizes if s >= m) for m in masked if m > 0)
  per_half = (config.num_iter * (f.embed + model_config.n_layer * f.block + num_tokens * f.condition)
              + config.infer_steps * transcoded * f.denoise_step)
  return float(per_half * (2 if config.guidance else 1))


def padded_sizes(num_tokens: int, sizes: int) -> tuple:
  """Token counts the transcoder can run on: multiples of ceil(N / sizes), the largest N."""
  step = -(-num_tokens // sizes)
  return tuple(sorted({min(num_tokens, step * j) for j in range(1, sizes + 1)}))


def _transcode(fns: ModelFns, config: SamplerConfig, cond, masked, num_bits, t_emb, cfg, rng, iteration,
               all_tokens, constrain):
  """P(z0 = 1) (B, N, K) at the last reverse step for every masked token (zeros where not transcoded).

  Tokens are put in a masked-first order and each diffusion step runs the first S of them, S the smallest
  padded size that holds every row's masked tokens (N with `all_tokens`): one `lax.switch` branch per
  size, so the matmuls keep as many rows as possible. Every draw is made at full (B, N, K) shape and
  permuted the same way, so the result does not depend on the size.
  """
  batch, num_tokens = masked.shape
  shape = (batch, num_tokens, num_bits)
  sizes = (num_tokens,) if all_tokens else padded_sizes(num_tokens, config.transcode_sizes)
  coeffs = {k: jnp.asarray(v) for k, v in reverse_coefficients(fns.num_timesteps, config.infer_steps).items()}
  order = jnp.argsort(jnp.logical_not(masked), axis=-1, stable=True)  # masked tokens first, in token order
  position = jnp.argsort(order, axis=-1)  # where each token sits in `order`

  def permute(x, axis):
    idx = order.reshape(batch, *([1] * (axis - 1)), num_tokens, *([1] * (x.ndim - axis - 1)))
    return jnp.take_along_axis(x, idx, axis=axis)

  def uniform(purpose, *indices):
    return permute(constrain(jax.random.uniform(noise_key(rng, purpose, iteration, *indices), shape)), 1)

  c_emb = fns.embed_condition(permute(cond, 2))  # (B, G, N, W), once for every diffusion step

  def denoise(size, x_t, probs, u, j):
    x, c = x_t[:, :size], c_emb[:, :, :size]
    logits = fns.denoise_step(x[:, None], t_emb[j], c) / config.temperature
    if c.shape[1] == 2:  # CFG on the logits: l_u + cfg (l_c - l_u)
      logits = logits[:, 1] + cfg * (logits[:, 0] - logits[:, 1])
    else:
      logits = logits[:, 0]
    p = jax.nn.sigmoid(logits)
    if fns.p_flip:  # the logits are of "bit is flipped": P(z0 = 1) = x_t (1 - q) + (1 - x_t) q
      p = x * (1 - p) + (1 - x) * p
    post = bernoulli_posterior(x, p, coeffs["k_next"][j], coeffs["b_next"][j], coeffs["keep"][j])
    x_next = (u[:, :size] < post).astype(jnp.float32)
    return x_t.at[:, :size].set(x_next), probs.at[:, :size].set(p)

  if len(sizes) == 1:
    branch_fn = lambda *args: denoise(sizes[0], *args)
  else:
    need = jnp.max(jnp.sum(masked, axis=-1))
    branch = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), need), len(sizes) - 1)
    branches = [functools.partial(denoise, size) for size in sizes]
    branch_fn = lambda *args: jax.lax.switch(branch, branches, *args)

  def step(j, carry):
    return branch_fn(*carry, uniform("diffusion", j), j)

  x_t = (uniform("init") < 0.5).astype(jnp.float32)
  _, probs = jax.lax.fori_loop(0, config.infer_steps, step, (x_t, jnp.zeros_like(x_t)))
  return constrain(jnp.take_along_axis(probs, position[:, :, None], axis=1))


def _decode_tokens(config: SamplerConfig, state: SamplerState, probs, counts, gumbel_temp, rng, iteration,
                   constrain):
  """Decodes each row's `counts` best-scoring tokens (decoded ones score -inf) from bit probabilities."""
  if config.ordering == "random":
    scores = jax.random.uniform(noise_key(rng, "order", iteration), state.masked.shape)
  else:
    scores = token_scores(probs, config.ordering)
  scores = jnp.where(state.masked, constrain(scores), -jnp.inf)
  gumbel = constrain(jax.random.gumbel(noise_key(rng, "gumbel", iteration), scores.shape))
  chosen = constrain(top_k_mask(scores + gumbel_temp * gumbel, counts))
  if config.token_sampling == "bernoulli":
    uniform = constrain(jax.random.uniform(noise_key(rng, "tokens", iteration), probs.shape))
    new_bits = (uniform < probs).astype(jnp.float32)
  else:
    new_bits = (probs > 0.5).astype(jnp.float32)
  return SamplerState(bits=jnp.where(chosen[:, :, None], new_bits, state.bits),
                      masked=state.masked & ~chosen,
                      decoded_at=jnp.where(chosen, iteration, state.decoded_at))


def decode(fns: ModelFns, config: SamplerConfig, tables, rng, bits, masked, *,
           constrain: Callable = lambda x: x) -> SamplerState:
  """The sampler's loops; call it inside `jax.jit` (`generate` and `complete` do).

  Args:
    fns: the model's callbacks.
    config: options that shape the program (ordering, token sampling, temperature, steps, sizes, guidance,
      resample_known).
    tables: `schedules.tables(config, N)` as arrays: "unmask" (N + 1, I), "cfg" (I,), "gumbel" (I,), "final_cfg" ().
    rng: a key.
    bits: (B, N, K) known bits (anything where masked).
    masked: (B, N) True where a token is to be generated.
    constrain: applied to every (B, ...) array, e.g. a batch sharding constraint.

  Returns:
    The final `SamplerState`.
  """
  batch, num_tokens, num_bits = bits.shape
  num_iter = tables["unmask"].shape[1]
  if tables["unmask"].shape[0] != num_tokens + 1:
    raise ValueError(f"unmask table has {tables['unmask'].shape[0]} rows; expected N + 1 = {num_tokens + 1}")
  resample_known = config.resample_known  # every token is transcoded then, since any may be picked
  t_minus_1 = reverse_coefficients(fns.num_timesteps, config.infer_steps)["t_minus_1"]
  t_emb = fns.embed_time(jnp.asarray(t_minus_1))  # (steps, W), shared by every token and iteration
  masked = constrain(jnp.asarray(masked, bool))
  num_masked = jnp.sum(masked, axis=-1)
  budget = num_tokens - num_masked if resample_known else num_masked
  state = SamplerState(bits=constrain(jnp.asarray(bits, jnp.float32)), masked=masked,
                       decoded_at=constrain(jnp.full((batch, num_tokens), -1, jnp.int32)))

  def iterate(iteration, state, counts, cfg, gumbel_temp):
    cond = constrain(fns.condition(state.bits, state.masked))
    probs = _transcode(fns, config, cond, state.masked, num_bits, t_emb, cfg, rng, iteration, resample_known,
                       constrain)
    return _decode_tokens(config, state, probs, counts, gumbel_temp, rng, iteration, constrain)

  def body(i, state):
    counts = jnp.take(tables["unmask"], budget, axis=0)[:, i]
    return iterate(i, state, counts, tables["cfg"][i], tables["gumbel"][i])

  state = jax.lax.fori_loop(0, num_iter, body, state)
  if resample_known:  # the original's final pass over the leftovers, at the unscheduled CFG scale
    final = lambda s: iterate(num_iter, s, jnp.sum(s.masked, axis=-1), tables["final_cfg"], 0.0)
    state = jax.lax.cond(jnp.any(state.masked), final, lambda s: s, state)
  return state


class _Static(NamedTuple):
  """What shapes the program; schedule values (counts, cfg, tau) are arrays, so changing them does not
  recompile."""
  sampler: SamplerConfig
  model: GeneratorConfig
  mesh: Optional[Mesh]
  batch_axes: tuple


@functools.partial(jax.jit, static_argnames=("static",))
def _sample(params, labels, label_weights, rng, bits, masked, tables, static: _Static) -> SampleOutput:
  constrain = lambda x: x
  mesh_context = contextlib.nullcontext()
  if static.mesh is not None:
    sharding = parallel.batch_sharding(static.mesh, 1, static.batch_axes)
    constrain = lambda x: jax.lax.with_sharding_constraint(x, sharding)
    # The model sees the mesh and where the batch lies (splash attention runs per shard by them).
    mesh_context = parallel.tracing_on(static.mesh, (("batch", static.batch_axes),))
  with mesh_context:
    fns = model_fns(static.model, params, labels, label_weights, static.sampler.guidance)
    state = decode(fns, static.sampler, tables, rng, bits, masked, constrain=constrain)
  return SampleOutput(bits=state.bits, decoded_at=state.decoded_at)


def _static_part(config: SamplerConfig) -> SamplerConfig:
  # Values that only enter the tables are normalised away; of the CFG scale only "> 1" matters.
  return config.replace(num_iter=1, cfg_scale=2.0 if config.guidance else 1.0, cfg_schedule="constant",
                        gumbel_temp=0.0, gumbel_schedule="constant", mask_schedule="cosine")


def check_labels(model_config: GeneratorConfig, labels, label_weights=None):
  """Raises ValueError for bad shapes, or class ids outside [0, num_classes] (num_classes: the null class)."""
  labels_shape = np.shape(labels)
  if label_weights is None:
    if len(labels_shape) != 1:
      raise ValueError(f"labels must have shape (B,), got {labels_shape}; weighted labels (B, M) need "
                       "label_weights (B, M)")
  elif len(labels_shape) != 2 or np.shape(label_weights) != labels_shape:
    raise ValueError(f"labels {labels_shape} and label_weights {np.shape(label_weights)} must both be (B, M)")
  if isinstance(labels, jax.core.Tracer):
    return
  values = np.asarray(labels)
  if not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {values.dtype}")
  bad = values[(values < 0) | (values > model_config.null_class)]
  if bad.size:
    raise ValueError(f"class ids {sorted(set(bad.tolist()))[:8]} are out of range: the model has "
                     f"{model_config.num_classes} classes (ids 0..{model_config.num_classes - 1}; "
                     f"{model_config.null_class} is the null class)")


def complete(model_config: GeneratorConfig, params, labels, rng, bits, regenerate,
             config: SamplerConfig = SamplerConfig(), *, label_weights=None,
             mesh: Optional[Mesh] = None, batch_axes: Sequence[str] = ("data",)) -> SampleOutput:
  """Generates the tokens where `regenerate` (B, N) is True, given the bits (B, N, K) of the others.

  The counts per iteration follow `config.mask_schedule` over each row's number of tokens to generate
  (over its number of known tokens with `config.resample_known`, as the original's `inpaint_with_cfg`).
  With a mesh, the batch is sharded over `batch_axes`; params should be replicated or on the same mesh.
  """
  check_labels(model_config, labels, label_weights)
  num_tokens, num_bits = model_config.seq_len, model_config.binary_size
  batch = np.shape(labels)[0]
  if np.shape(bits) != (batch, num_tokens, num_bits):
    raise ValueError(f"bits must have shape (B, N, K) = {(batch, num_tokens, num_bits)}, got {np.shape(bits)}")
  if np.shape(regenerate) != (batch, num_tokens):
    raise ValueError(f"the regenerate mask must have shape (B, N) = {(batch, num_tokens)}, "
                     f"got {np.shape(regenerate)}")
  tables = {k: jnp.asarray(v) for k, v in schedules.tables(config, num_tokens).items()}
  batch_axes = tuple(batch_axes)
  sharding = parallel.batch_sharding(mesh, 1, batch_axes, batch) if mesh is not None else None
  labels = jnp.asarray(labels, jnp.int32)
  bits = jnp.asarray(bits, jnp.float32)
  regenerate = jnp.asarray(regenerate, bool)
  if label_weights is not None:
    label_weights = jnp.asarray(label_weights, jnp.float32)
  if sharding is not None:
    labels, bits, regenerate, label_weights = jax.device_put((labels, bits, regenerate, label_weights), sharding)
  static = _Static(_static_part(config), model_config, mesh, batch_axes)
  return _sample(params, labels, label_weights, rng, bits, regenerate, tables, static)


def lower_generate(model_config: GeneratorConfig, abstract_params, batch: int, config: SamplerConfig, mesh: Mesh,
                   batch_axes: Sequence[str] = ("data",)):
  """`generate`'s program for `batch` labels, lowered from shapes alone (ShapeDtypeStructs: nothing is
  allocated, the mesh may be a TPU topology's): for `--mode=compile`."""
  batch_axes = tuple(batch_axes)
  sharding, whole = parallel.batch_sharding(mesh, 1, batch_axes, batch), parallel.replicated(mesh)
  shape = (batch, model_config.seq_len)
  tables = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=whole)
            for k, v in schedules.tables(config, model_config.seq_len).items()}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=whole)
  static = _Static(_static_part(config), model_config, mesh, batch_axes)
  return _sample.lower(abstract_params, jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=sharding), None, key,
                       jax.ShapeDtypeStruct(shape + (model_config.binary_size,), jnp.float32, sharding=sharding),
                       jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding), tables, static)


def generate(model_config: GeneratorConfig, params, labels, rng, config: SamplerConfig = SamplerConfig(), *,
             label_weights=None, mesh: Optional[Mesh] = None, batch_axes: Sequence[str] = ("data",)
             ) -> SampleOutput:
  """Class-conditional samples (`generate_with_cfg`): bits (B, N, K) for labels (B,) (null class allowed).

  Weighted labels (B, M) with label_weights (B, M) mix class embeddings (class interpolation).
  """
  shape = (np.shape(labels)[0], model_config.seq_len)
  return complete(model_config, params, labels, rng, jnp.zeros(shape + (model_config.binary_size,)),
                  jnp.ones(shape, bool), config, label_weights=label_weights, mesh=mesh, batch_axes=batch_axes)
