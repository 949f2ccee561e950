"""The energy/correlation split of a matmul C = A @ W: c_ij = ||a_i|| ||w_j|| cos(theta_ij) = E_ij R_ij.

A matmul is given in grouped form: a (g, n, k), w (g, k, m), c = a @ w (g, n, m), with g = 1 for a
weight matmul and g = batch x heads for attention scores (w = K^T). Token norms u = ||a_gi||, channel
norms v = ||w_gj||, E_gij = u_gi v_gj, R = C / E (0 where E = 0). E's moments are exact from the norms;
R and the log-variance split are computed on given entries (the probed step passes sampled rows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tdyn_jax.probes.stats import count


@jax.jit
def norms(a: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(u, v): the L2 norms of the rows of a (g, n) and of the columns of w (g, m)."""
    a, w = a.astype(jnp.float32), w.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(a * a, axis=-1)), jnp.sqrt(jnp.sum(w * w, axis=-2))


def correlation(c: jax.Array, e: jax.Array) -> jax.Array:
    """R = C / E for entries of C and their energies E (same shape); 0 where E = 0."""
    return jnp.where(e > 0, c.astype(jnp.float32) / jnp.where(e > 0, e, 1.0), 0.0)


@jax.jit
def energy_stats(u: jax.Array, v: jax.Array) -> dict[str, jax.Array]:
    """Moments of E over all g*n*m entries, exact from the norm vectors (E is rank one per group).

    Within group g, with d_i = u_i - mean(u) and e_j = v_j - mean(v): E_ij - mean(u) mean(v) =
    u_i e_j + mean(v) d_i, so the central moments are sums of products of one mean over i and one over
    j (binomial expansion, no cancellation of large terms); groups are then pooled around the overall
    mean. Gives mean, std, skewness, kurtosis (excess) and rms; min and max are products of the
    extreme norms; log2_range = log2(max E / min nonzero E), the dynamic range in binades (nan if E
    is all zero).
    """
    u, v = u.astype(jnp.float32), v.astype(jnp.float32)
    ubar, vbar = jnp.mean(u, axis=1, keepdims=True), jnp.mean(v, axis=1, keepdims=True)
    a, b, e = u, vbar * (u - ubar), v - vbar  # E_ij - mean(u) mean(v) = a_i e_j + b_i
    # one reduction each: mean_i a^k b^j for k + j <= 4, and mean_j e^k for k <= 4 (per group)
    pairs = [(k, p - k) for p in range(5) for k in range(p + 1)]
    ab = jnp.mean(jnp.stack([a**k * b**j for k, j in pairs]), axis=-1)
    ek = jnp.mean(jnp.stack([e**k for k in range(5)]), axis=-1)
    central = [
        sum(math.comb(p, k) * ab[pairs.index((k, p - k))] * ek[k] for k in range(p + 1)) for p in range(5)
    ]  # mean_ij (a_i e_j + b_i)^p per group
    mu_g = (ubar * vbar)[:, 0] + central[1]
    mean = jnp.mean(mu_g)
    delta = mu_g - mean
    c2, c3, c4 = central[2], central[3], central[4]
    m2 = jnp.mean(c2 + delta**2)
    m3 = jnp.mean(c3 + 3 * c2 * delta + delta**3)
    m4 = jnp.mean(c4 + 4 * c3 * delta + 6 * c2 * delta**2 + delta**4)
    big = jnp.max(jnp.max(u, axis=1) * jnp.max(v, axis=1))
    nz = lambda t: jnp.min(jnp.where(t > 0, t, jnp.inf), axis=1)
    small = jnp.min(nz(u) * nz(v))
    return {
        "mean": mean,
        "std": jnp.sqrt(m2),
        "skewness": m3 / m2**1.5,
        "kurtosis": m4 / m2**2 - 3.0,
        "rms": jnp.sqrt(m2 + mean**2),
        "min": jnp.min(jnp.min(u, axis=1) * jnp.min(v, axis=1)),
        "max": big,
        "log2_range": jnp.where(jnp.isinf(small), jnp.nan, jnp.log2(big) - jnp.log2(small)),
    }


@jax.jit
def log_split(c: jax.Array, e: jax.Array) -> dict[str, jax.Array]:
    """How much of the spread of log2|c| comes from E and how much from R, over entries of C and their
    energies E (same shape; in the probed step the sampled rows of C).

    Over the entries with c != 0 and E > 0: log2|c| = log2 E + log2|R|, so
    var(log2|c|) = var(log2 E) + var(log2|R|) + 2 cov(log2 E, log2|R|).
    share_e = var(log2 E) / var(log2|c|) and share_r = var(log2|R|) / var(log2|c|); the covariance
    term makes up the rest (share_e + share_r + 2 cov / var(log2|c|) = 1).
    """
    c = c.astype(jnp.float32)
    ok = (c != 0) & jnp.isfinite(c) & (e > 0)
    n = count(ok)
    log_c = jnp.log2(jnp.where(ok, jnp.abs(c), 1.0))
    log_e = jnp.log2(jnp.where(ok, e, 1.0))
    log_r = log_c - log_e
    mean = lambda t: jnp.sum(t) / n
    me, mr = mean(log_e), mean(log_r)
    de, dr = jnp.where(ok, log_e - me, 0.0), jnp.where(ok, log_r - mr, 0.0)
    var_e, var_r, cov = mean(de * de), mean(dr * dr), mean(de * dr)
    var_c = var_e + var_r + 2 * cov
    return {
        "var_log2_c": var_c,
        "var_log2_e": var_e,
        "var_log2_r": var_r,
        "cov_log2_er": cov,
        "share_e": var_e / var_c,
        "share_r": var_r / var_c,
    }
