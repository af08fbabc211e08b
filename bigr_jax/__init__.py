"""BiGR in JAX/Flax: binary latent codes for image generation and representation."""

from bigr_jax import platforms

platforms.start_on_cpu_without_accelerators()
