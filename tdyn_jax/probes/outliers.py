"""Outlier-feature metrics of an activation X (tokens x channels), with their published definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def outlier_metrics(x: jax.Array, topk: int) -> dict[str, jax.Array]:
    """Outlier metrics of x reshaped to (n tokens, d channels); the last axis is the channel axis.

    - rms_kurtosis (He et al. 2024, "Understanding and Minimising Outlier Features"): with
      s_j = sqrt(mean_i x_ij^2) the RMS of channel j, Kurt = mean_j(s_j^4) / mean_j(s_j^2)^2;
      1 when every channel has the same RMS, up to d when one channel carries all of it.
    - max_median_ratio (same paper): mean_i [ max_j |x_ij| / median_j |x_ij| ].
    - int8_outlier_channels (Dettmers et al. 2022, LLM.int8()): the number of channels j with
      |x_ij| >= 6 in at least 6% of the tokens i.
    - massive_ratio, massive_channel, massive_token (Sun et al. 2024, "Massive Activations"): the topk
      largest |x_ij| divided by median |x| over all elements, largest first, with the channel j and the
      token i (row of the flattened tokens) of each.
    """
    d = x.shape[-1]
    a = jnp.abs(x.astype(jnp.float32).reshape(-1, d))
    ms = jnp.mean(a * a, axis=0)
    kurt = jnp.mean(ms * ms) / jnp.mean(ms) ** 2
    mmr = jnp.mean(jnp.max(a, axis=1) / jnp.median(a, axis=1))
    int8 = jnp.sum(jnp.mean(a >= 6.0, axis=0) >= 0.06).astype(jnp.float32)
    top, flat = jax.lax.top_k(a.reshape(-1), topk)
    return {
        "rms_kurtosis": kurt,
        "max_median_ratio": mmr,
        "int8_outlier_channels": int8,
        "massive_ratio": top / jnp.median(a),
        "massive_channel": (flat % d).astype(jnp.float32),
        "massive_token": (flat // d).astype(jnp.float32),
    }
