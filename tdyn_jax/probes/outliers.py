"""Outlier-feature metrics of an activation X (tokens x channels), with their published definitions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tdyn_jax.probes.stats import count


def kth_smallest(a: jax.Array, k: int) -> jax.Array:
    """The k-th smallest (0-based) of non-negative finite values along the last axis, exactly.

    Bisection over the float32 bit patterns (monotone for non-negative floats): 31 counting passes,
    far cheaper than a sort on CPU, and a small loop to compile.
    """
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    shape = a.shape[:-1]

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = count(bits <= mid[..., None], axis=-1) >= k + 1
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    start = (jnp.zeros(shape, jnp.int32), jnp.full(shape, 0x7F800000, jnp.int32))
    lo, _ = jax.lax.fori_loop(0, 31, halve, start)
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def median(a: jax.Array) -> jax.Array:
    """numpy.median of non-negative finite values along the last axis (mean of the two middle
    values for an even count)."""
    n = a.shape[-1]
    low = kth_smallest(a, (n - 1) // 2)
    if n % 2:
        return low
    # the upper middle value: `low` again if it repeats past the middle, else the next larger value
    repeats = count(a <= low[..., None], axis=-1) >= n // 2 + 1
    above = jnp.min(jnp.where(a > low[..., None], a, jnp.inf), axis=-1)
    return (low + jnp.where(repeats, low, above)) / 2


def token_rows(x: jax.Array, rows: jax.Array, cols: jax.Array | None = None) -> jax.Array:
    """x[..., :] at the flat token indices `rows` (into the leading axes): (len(rows), x.shape[-1]),
    or only the channels `cols` of those rows, (len(rows), len(cols)); gathered in one go, without
    reshaping x."""
    tokens = jnp.unravel_index(rows, x.shape[:-1])
    if cols is None:
        return x[tokens]
    return x[(*(t[:, None] for t in tokens), cols[None, :])]


@functools.partial(jax.jit, static_argnames=("topk",))
def outlier_metrics(x: jax.Array, topk: int) -> tuple[dict[str, jax.Array], jax.Array]:
    """(metrics, top): the outlier metrics of x (tokens..., d channels) that need every token, and the
    topk largest |x| (for massive_ratio, see `sampled_outlier_metrics`). The leading axes are tokens,
    the last the channels.
    - rms_kurtosis (He et al. 2024, "Understanding and Minimising Outlier Features"): with
      s_j = sqrt(mean_i x_ij^2) the RMS of channel j, Kurt = mean_j(s_j^4) / mean_j(s_j^2)^2;
      1 when every channel has the same RMS, up to d when one channel carries all of it.
    - int8_outlier_channels (Dettmers et al. 2022, LLM.int8()): the number of channels j with
      |x_ij| >= 6 in at least 6% of the tokens i.
    - massive_channel, massive_token (Sun et al. 2024, "Massive Activations"): the channel j and the
      token i (row of the flattened tokens) of each of the topk largest |x_ij| (exact: they lie in the
      topk tokens by largest |x_ij|), largest first.
    """
    d, tokens_axes = x.shape[-1], tuple(range(x.ndim - 1))
    a = jnp.abs(x.astype(jnp.float32))
    ms = jnp.mean(a * a, axis=tokens_axes)
    kurt = jnp.mean(ms * ms) / jnp.mean(ms) ** 2
    int8 = count(count(a >= 6.0, axis=tokens_axes) >= -(-6 * (a.size // d) // 100))  # >= 6%
    row_max = jnp.max(a, axis=-1).reshape(-1)  # per token: small
    _, tokens = jax.lax.top_k(row_max, topk)  # no other token holds one of the topk values
    top, flat = jax.lax.top_k(token_rows(a, tokens).reshape(-1), topk)
    metrics = {
        "rms_kurtosis": kurt,
        "int8_outlier_channels": int8,
        "massive_channel": (flat % d).astype(jnp.float32),
        "massive_token": tokens[flat // d].astype(jnp.float32),
    }
    return metrics, top


@jax.jit
def sampled_outlier_metrics(rows: jax.Array, top: jax.Array) -> dict[str, jax.Array]:
    """The median-based outlier metrics, estimated on x at sampled tokens `rows` (r, d), with `top`
    the topk largest |x| over every token (see `outlier_metrics`):
    - max_median_ratio (He et al. 2024): mean_i [ max_j |x_ij| / median_j |x_ij| ] over the rows;
    - massive_ratio (Sun et al. 2024): top / median |x| over the rows, largest first.
    """
    a = jnp.abs(rows.astype(jnp.float32))
    return {
        "max_median_ratio": jnp.mean(jnp.max(a, axis=1) / median(a)),
        "massive_ratio": top / median(a.reshape(-1)),
    }
