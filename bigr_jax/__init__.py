"""BiGR in JAX/Flax: binary latent codes for image generation and representation."""
