"""tdyn_jax: training dynamics and outliers of transformer language models in JAX."""

__version__ = "0.13.2"
