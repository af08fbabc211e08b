"""Weight files: reading and writing them (`io`: PyTorch, .npz and .safetensors state dicts; `params_io`: orbax
params directories and a training workdir's params) and the original's key layouts (`generator_weights`,
`tokenizer_weights`: PyTorch state_dict <-> Flax params, both ways). Nothing here knows where weights come from:
`bigr_jax.artifacts` (the loader) and `bigr_jax.convert` (the command) sit above it."""
