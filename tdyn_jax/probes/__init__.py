"""In-step capture: what is measured at each site of the model, as pure jax.numpy functions."""
