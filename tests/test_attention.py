"""The attention kinds (`model.attention`): splash (Pallas, in interpret mode on this CPU) and cudnn's wiring
against xla, at BiGR's 257 tokens with the class position's zeroed rotation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigr_jax import config_sections, parallel
from bigr_jax.evaluation import features as features_lib
from bigr_jax.models import attention, bigr, config as config_lib, transformer
from bigr_jax.sampling import sampler

TOL = 1e-5


def _rotated_qkv(batch=2, heads=4, head_dim=16, grid=16):
  """q, k, v (B, 257, H, D) as the trunk makes them: q and k rotated, so zero at the class position."""
  table = jnp.asarray(transformer.rope_2d_table(grid, head_dim, 10000.0))
  q, k, v = (jax.random.normal(key, (batch, grid * grid + 1, heads, head_dim))
             for key in jax.random.split(jax.random.key(0), 3))
  return transformer.apply_rope(q, table), transformer.apply_rope(k, table), v


def _max_error(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def test_splash_matches_xla_in_outputs_and_gradients_at_257_tokens():
  q, k, v = _rotated_qkv()
  assert q.shape[1] == 257 and float(jnp.abs(q[:, 0]).max()) == 0.0 == float(jnp.abs(k[:, 0]).max())
  cotangent = jax.random.normal(jax.random.key(1), q.shape)
  outputs, grads = {}, {}
  for kind in ("xla", "splash"):
    fn = attention.ATTENTION[kind]
    outputs[kind] = jax.jit(fn)(q, k, v)
    grads[kind] = jax.jit(jax.grad(lambda *qkv: jnp.sum(fn(*qkv) * cotangent), argnums=(0, 1, 2)))(q, k, v)
  assert _max_error(outputs["splash"], outputs["xla"]) < TOL
  for name, got, want in zip("qkv", grads["splash"], grads["xla"]):
    assert _max_error(got, want) < TOL, name
  # The class query sees zero scores: its output is the plain mean of the values, in both.
  np.testing.assert_allclose(outputs["splash"][:, 0], v.mean(axis=1), atol=TOL)


def test_cudnn_path_is_dot_product_attention_of_the_same_layout_and_scale():
  # cuDNN needs an NVIDIA GPU; the same call through its XLA implementation checks layout and scaling here.
  q, k, v = _rotated_qkv()
  assert _max_error(attention.cudnn_attention(q, k, v, implementation="xla"), attention.xla_attention(q, k, v)) < TOL
  with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):  # before any compute, on this CPU host
    attention.cudnn_attention(q, k, v)


def test_unknown_attention_and_cudnn_in_float32_are_config_errors():
  with pytest.raises(ValueError, match="unknown attention 'flash'"):
    config_lib.GeneratorConfig(attention="flash")
  with pytest.raises(ValueError, match="'cudnn' needs dtype bfloat16 or float16"):
    config_lib.GeneratorConfig(attention="cudnn", dtype="float32")
  assert config_lib.GeneratorConfig(attention="cudnn", dtype="bfloat16").attention == "cudnn"


def _loss_and_grads(model_config, params, mesh=None):
  bits = (jax.random.uniform(jax.random.key(2), (8, model_config.seq_len, model_config.binary_size)) > 0.5)
  labels = jnp.arange(8) % model_config.num_classes
  rngs = {name: jax.random.key(i) for i, name in enumerate(("mask", "diffusion", "label_drop", "dropout"))}
  draws = bigr.BiGR(model_config).apply({"params": params}, bits, deterministic=True, rngs=rngs,
                                        method=bigr.BiGR.loss_draws)

  def loss(p):
    with nn.logical_axis_rules(parallel.DEFAULT_RULES):
      value, _ = bigr.BiGR(model_config).apply({"params": p}, bits.astype(jnp.float32), labels, draws,
                                               deterministic=True, method=bigr.BiGR.loss)
    return value

  step = jax.jit(jax.value_and_grad(loss))
  if mesh is None:
    return step(params)
  with jax.set_mesh(mesh):
    return step(params)


def test_model_loss_and_gradients_match_with_splash_sharded_over_batch_and_heads():
  base = config_lib.GeneratorConfig(dim=64, n_layer=2, n_head=4, binary_size=8, num_classes=10, block_size=256,
                                    seq_len=256, denoise_hidden_dim=32, num_block_mlp=1)
  params = nn.meta.unbox(bigr.init_params(base, jax.random.key(0)))
  want_loss, want_grads = _loss_and_grads(base, params)
  mesh = parallel.make_mesh(config_sections.MeshConfig(data=2, fsdp=2, tensor=2))
  for mesh_or_none in (None, mesh):
    loss, grads = _loss_and_grads(base.replace(attention="splash"), params, mesh_or_none)
    assert abs(float(loss) - float(want_loss)) < TOL
    errors = jax.tree.leaves(jax.tree.map(_max_error, grads, want_grads))
    assert max(errors) < TOL, max(errors)


def test_splash_runs_per_shard_under_a_mesh():
  q, k, v = _rotated_qkv(batch=8)
  mesh = parallel.make_mesh(config_sections.MeshConfig(data=2, fsdp=2, tensor=2))

  def attend(q, k, v):
    with nn.logical_axis_rules(parallel.DEFAULT_RULES):
      return attention.splash_attention(q, k, v)

  with jax.set_mesh(mesh):
    program = jax.jit(attend).lower(q, k, v)
  assert "manual_computation" in program.as_text()  # a shard_map: batch over data x fsdp, heads over tensor
  assert _max_error(program.compile()(q, k, v), attention.xla_attention(q, k, v)) < TOL


def test_sampler_and_features_give_the_same_results_with_splash_on_a_mesh():
  base = config_lib.GeneratorConfig(dim=64, n_layer=2, n_head=4, binary_size=8, num_classes=10, block_size=16,
                                    seq_len=16, denoise_hidden_dim=32, num_block_mlp=1)
  params = nn.meta.unbox(bigr.init_params(base, jax.random.key(0)))
  mesh = parallel.make_mesh(config_sections.MeshConfig(data=4, fsdp=1, tensor=2))
  labels = np.arange(8) % 10
  bits = np.asarray(jax.random.uniform(jax.random.key(3), (8, 16, 8)) > 0.5, np.float32)
  samples, features = {}, {}
  for kind in ("xla", "splash"):
    model_config = base.replace(attention=kind)
    samples[kind] = sampler.generate(model_config, params, labels, jax.random.key(4),
                                     config_sections.SamplerConfig(num_iter=4, infer_steps=5), mesh=mesh)
    program, shardings = features_lib.pooled_program(model_config, [0, 1], mesh)
    features[kind] = program(jax.device_put(params, shardings), bits, labels)
  np.testing.assert_array_equal(samples["splash"].bits, samples["xla"].bits)
  np.testing.assert_array_equal(samples["splash"].decoded_at, samples["xla"].decoded_at)
  assert _max_error(features["splash"], features["xla"]) < TOL
