"""Capture inside the model: sow statistics at named sites, tap activation gradients, gather sites.

Every helper takes the calling Flax module; it does nothing unless the module's `probe` spec is set
and wants the site. Statistics go to the `intermediates` collection (one variable per site), full
tensors of dumped sites to `dumps`, and activation gradients come back as the gradient of a zero
`grad_taps` variable whose cotangent is the statistics of dL/dx (a `custom_vjp` identity). The
statistics of sampled grids (a matmul's R and low-precision parts, an activation's medians) come back
the same way on a CPU (`deferred`): they do not depend on the gradient, so XLA runs them as soon as
the grid exists, outside the scanned layers' forward iterations.
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdyn_jax.probes.energy import correlation, energy_stats, log_split, norms
from tdyn_jax.probes.lowprec import absmax, lowprec_stats, per_row
from tdyn_jax.probes.naming import SCANNED, unstacked
from tdyn_jax.probes.outliers import outlier_metrics, sampled_outlier_metrics, token_rows
from tdyn_jax.probes.spec import ProbeSpec
from tdyn_jax.probes.stats import random_indices, seed_of

Stats = dict[str, jax.Array]


def _site(module: nn.Module, name: str | None) -> str:
    return "/".join((*module.path, name) if name else module.path)


def _sow(module: nn.Module, name: str, stats: Stats) -> None:
    module.sow("intermediates", name, jax.lax.stop_gradient(stats))


def sample_indices(seed: jax.Array, n: int, size: int, stream: int) -> tuple[jax.Array, jax.Array]:
    """(indices, stored): `size` indices drawn uniformly with replacement from range(n), or all n in
    order when n <= size; `stored` is the same padded with -1 to `size` (the statistics "rows" and
    "cols"). `stream` tells apart the draws of one seed."""
    if n <= size:
        indices = jnp.arange(n, dtype=jnp.int32)
        return indices, jnp.concatenate([indices, jnp.full((size - n,), -1, jnp.int32)])
    indices = random_indices(seed, size, n, stream)
    return indices, indices


ROWS, COLS, GROUPS = 3, 4, 5  # the streams of the sampled rows, columns and groups
GROUP_RUN = 16  # sampled rows of a grouped matmul per sampled group


def group_rows(seed: jax.Array, g: int, n: int, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(rows, stored, groups): sampled rows of a grouped matmul's C (g groups of n rows, flattened to
    g * n) in G equal runs, run j of rows in group groups[j], so that the W of the sampled rows is G
    matrices, not one copy per row.

    All g * n rows in order when they are at most `size` (G = g runs of n). Else G = max(1, size //
    GROUP_RUN) groups drawn uniformly with replacement and size // G rows uniform within each (with
    replacement), so every row is uniform over all g * n. `stored` is `rows` padded with -1 to `size`.
    """
    if g * n <= size:
        rows, stored = sample_indices(seed, g * n, size, ROWS)
        return rows, stored, jnp.arange(g, dtype=jnp.int32)
    count = max(1, size // GROUP_RUN)
    run = size // count
    groups = random_indices(seed, count, g, GROUPS)
    rows = jnp.repeat(groups, run) * n + random_indices(seed, count * run, n, ROWS)
    return rows, jnp.concatenate([rows, jnp.full((size - rows.size,), -1, jnp.int32)]), groups


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap(fn: Any, x: jax.Array, slot: tuple[Stats], residual: Any) -> jax.Array:
    del slot, residual
    return x


def _tap_fwd(fn, x, slot, residual):
    del slot
    return x, residual


def _tap_bwd(fn, residual, g):
    # the statistics before dL/dx goes on: else XLA's TPU schedule may keep dL/dx alive long after
    # (a v5e:8x8 pod's probed step: 13.0 -> 11.4 GiB per chip); XLA:CPU drops the barrier
    g, stats = jax.lax.optimization_barrier((g, fn(residual, g)))
    return g, (stats,), None


_tap.defvjp(_tap_fwd, _tap_bwd)


def _tapped(module: nn.Module, name: str, fn: Any, residual: Any, x: jax.Array) -> jax.Array:
    """Identity on x whose backward pass stores fn(residual, dL/dx) as the gradient of the zero
    variable grad_taps/<name> (the caller differentiates with respect to that collection too)."""

    def zeros() -> tuple[Stats]:
        shapes = jax.eval_shape(fn, residual, x)
        return (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),)

    slot = module.variable("grad_taps", name, zeros)
    return _tap(fn, x, slot.value, residual)


def grad_tap(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """Identity on x whose backward pass stores the statistics of dL/dx (grad_taps/<name>)."""
    spec = module.probe
    return _tapped(module, name, lambda seed, g: spec.summary(g, seed), seed_of(module.make_rng("probe")), x)


def deferred(module: nn.Module, name: str, fn: Any, grid: Stats, x: jax.Array) -> tuple[jax.Array, Stats]:
    """(x, statistics): with `spec.defer`, x as an identity whose backward pass returns fn(grid) (as
    grad_taps/<name>; it does not depend on dL/dx, so XLA may run it as soon as the grid exists, on a
    CPU on the core the model leaves idle) and no statistics now; else x itself and fn(grid), to be
    sown with the site's others."""
    spec: ProbeSpec = module.probe
    if spec.defer:
        return _tapped(module, name, lambda g, _: fn(g), grid, x), {}
    return x, {} if spec.taps_only else fn(grid)


def activation(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """Statistics of an activation x at site <module path>/<name> (+ outlier metrics over its last
    axis as channels); returns x, gradient-tapped when the spec asks for gradients."""
    spec: ProbeSpec | None = module.probe
    site = _site(module, name)
    if spec is None or not spec.wants(site):
        return x
    x_ = jax.lax.stop_gradient(x)
    seed = seed_of(module.make_rng("probe"))
    if "outliers" in spec.stats:
        rows, stored = sample_indices(seed, x_.size // x_.shape[-1], spec.rows, ROWS)
        metrics, top = outlier_metrics(x_, spec.topk)
        grid = {"x": token_rows(x_, rows), "top": top}
        x, now = deferred(module, name, lambda g: sampled_outlier_metrics(g["x"], g["top"]), grid, x)
    if not spec.taps_only:
        stats = spec.summary(x_, seed)
        _sow(module, name, stats | (metrics | now | {"rows": stored} if "outliers" in spec.stats else {}))
        if spec.dumps(site):
            module.sow("dumps", f"{name}/dump", {"x": x})
    return grad_tap(module, f"{name}/grad", x) if spec.grads else x


def attention_probs(module: nn.Module, name: str, probs: jax.Array) -> None:
    """Entropy (nats) and largest probability of each query's attention row (batch, heads, q, k)."""
    spec: ProbeSpec | None = module.probe
    if spec is None or spec.taps_only or not spec.wants(_site(module, name)):
        return
    p = jax.lax.stop_gradient(probs).astype(jnp.float32)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    top = jnp.max(p, axis=-1)
    stats = {
        "entropy_mean": jnp.mean(entropy),
        "entropy_min": jnp.min(entropy),
        "entropy_max": jnp.max(entropy),
        "maxprob_mean": jnp.mean(top),
        "maxprob_max": jnp.max(top),
    }
    _sow(module, name, stats)


def log_partition(module: nn.Module, name: str, logits: jax.Array) -> None:
    """Mean, std, min and max over tokens of log Z = logsumexp of the logits."""
    spec: ProbeSpec | None = module.probe
    if spec is None or spec.taps_only or not spec.wants(_site(module, name)):
        return
    log_z = jax.nn.logsumexp(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    stats = {"mean": jnp.mean(log_z), "std": jnp.std(log_z), "min": jnp.min(log_z), "max": jnp.max(log_z)}
    _sow(module, name, stats)


def matmul(
    module: nn.Module,
    a: jax.Array,
    w: jax.Array,
    c: jax.Array,
    name: str | None = None,
    with_input: bool = False,
) -> jax.Array:
    """Statistics of one matmul C = A @ W: a weight matmul a (..., k) @ w (k, m) = c (..., m), whose
    leading axes are tokens, or a grouped one a (g, n, k) @ w (g, k, m) = c (g, n, m) (the scores:
    g = batch x heads, w = K^T). Sown as <site>/out, /a_norm, /w_norm, /E (exact moments from the
    norms), /R (R on [-1, 1] and the log-variance split), /lowprec, and /in when `with_input` (a
    weight matmul's input is an activation site of its own: a norm output, attn/mix, mlp/hidden or the
    residual stream).

    /R and /lowprec are computed on a grid of C: `probes.rows` rows and `probes.cols` columns sampled
    uniformly (stored with them as "rows", indices into the rows of C flattened to (rows, m), and
    "cols", indices into its m columns), so their cost grows with neither the tokens nor the width
    (a vocabulary, the keys); on a CPU they go through the backward pass (`deferred`), the
    indices sown now. The other parts cover the whole tensors. Returns c, gradient-tapped
    (<site>/out/grad) when the spec asks for gradients. The site is the module path (+ `name`).
    Outlier metrics are left to the activation sites.
    """
    spec: ProbeSpec | None = module.probe
    site = _site(module, name)
    if spec is None or not spec.wants(site):
        return c
    prefix = f"{name}/" if name else ""
    a, w, out = (jax.lax.stop_gradient(t) for t in (a, w, c))  # as they are: no float32 copies
    seed = seed_of(module.make_rng("probe"))
    seeds = [seed + jnp.uint32(i) for i in range(5)]  # one per part: their samples differ
    grouped = w.ndim == 3
    k = w.shape[-2]
    cols, stored_cols = sample_indices(seed, w.shape[-1], spec.cols, COLS)
    all_cols = cols.size == w.shape[-1]
    take_cols = (lambda t: t) if all_cols else (lambda t: jnp.take(t, cols, axis=-1))
    if grouped:  # the rows come in runs, one per sampled group, whose W (or norms) they use
        rows, stored_rows, groups = group_rows(seed, w.shape[0], a.shape[-2], spec.rows)
        per_group = lambda t: take_cols(t)[groups]
    else:
        rows, stored_rows = sample_indices(seed, a.size // k, spec.rows, ROWS)
        per_group = take_cols
    sampled = {"rows": stored_rows, "cols": stored_cols}
    a_rows, w_cols = token_rows(a, rows), per_group(w)
    c_rows = token_rows(out, rows, None if all_cols else cols) if "energy" in spec.stats else None
    out_stats = None if spec.taps_only else spec.summary(out, seeds[1])
    if not spec.defer:  # in place (GPU, TPU): C read before the model goes on, so that XLA's schedule
        # does not keep it alive into the backward pass (a v5e:8x8 pod's logits: 13.9 -> 13.0 GiB per chip)
        c, c_rows, out_stats = jax.lax.optimization_barrier((c, c_rows, out_stats))
    now = {}  # the R and lowprec statistics when they are not deferred
    if "energy" in spec.stats:
        u, v = norms(a, w)  # a.shape[:-1], (m,) or (g, m)
        e_grid = u[jnp.unravel_index(rows, u.shape)][:, None] * per_row(per_group(v), rows.size)
        grid = {"c": c_rows, "e": e_grid, "seed": seeds[4]}
        c, now["R"] = deferred(module, prefix + "R", functools.partial(_correlation_stats, spec), grid, c)
    if "lowprec" in spec.stats:
        grid = {"a": a_rows, "w": w_cols, "amax": jnp.stack([absmax(a), absmax(w)])}
        lowprec = functools.partial(_lowprec_stats, spec)
        c, now["lowprec"] = deferred(module, prefix + "lowprec", lowprec, grid, c)
    if spec.taps_only:
        return grad_tap(module, f"{prefix}out/grad", c) if spec.grads else c
    parts = {"in": spec.summary(a, seeds[0])} if with_input else {}
    parts["out"] = out_stats
    parts |= {part: sampled | stats for part, stats in now.items()}  # deferred: the indices only
    if "energy" in spec.stats:
        log_only = frozenset({"exp_hist"})  # the norms' moments and dynamic range
        parts["a_norm"], parts["w_norm"] = (
            spec.summary(u, seeds[2], only=log_only),
            spec.summary(v, seeds[3], only=log_only),
        )
        parts["E"] = energy_stats(u, v) if grouped else energy_stats(u.reshape(1, -1), v[None])
    for part, stats in parts.items():
        _sow(module, prefix + part, stats)
    if spec.dumps(site):
        tensors = {"A": a.astype(jnp.float32), "W": w.astype(jnp.float32), "C": out.astype(jnp.float32)}
        if "energy" in spec.stats:
            e = u[..., None] * (v[:, None, :] if grouped else v)
            tensors |= {"E": e, "R": correlation(out, e)}
        module.sow("dumps", f"{prefix}dump", tensors)
    return grad_tap(module, f"{prefix}out/grad", c) if spec.grads else c


def _correlation_stats(spec: ProbeSpec, grid: Stats) -> Stats:
    """A matmul's /R part from a grid of C and its E: the summary of R on [-1, 1] and the log-variance
    split."""
    c = grid["c"].astype(jnp.float32)
    r_stats = spec.summary(correlation(c, grid["e"]), grid["seed"], lin_range=(-1.0, 1.0))
    return r_stats | log_split(c, grid["e"])


def _lowprec_stats(spec: ProbeSpec, grid: Stats) -> Stats:
    """A matmul's /lowprec part from a grid of A's rows, W's columns and the absmax of both."""
    return lowprec_stats(
        (grid["amax"][0], grid["amax"][1]), grid["a"], grid["w"], formats=spec.formats,
        scalings=spec.scalings, r_bits=spec.r_bits, e_frac_bits=spec.e_frac_bits,
    )  # fmt: skip


def merged(*blocks: Blocks) -> Blocks:
    """Blocks of statistics joined, the statistics of a site from several sets in one block."""
    out: Blocks = {}
    for part in blocks:
        for names, stats in part.items():
            out[names] = out.get(names, {}) | stats
    return out


def _walk(tree: dict, path: tuple[str, ...]):
    for key, value in tree.items():
        if isinstance(value, tuple):  # a sown or tap variable: (stats,)
            yield (*path, key), value[0]
        else:
            yield from _walk(value, (*path, key))


Blocks = dict[tuple[str, ...], Stats]  # site names -> their statistics stacked along a leading axis


def sites(tree: dict) -> Blocks:
    """The sites of a sown collection as blocks: a scanned stack ('layers', leading axis = layer)
    is one block of sites layer_00, layer_01, ...; any other site a block of one."""
    out = {}
    for path, value in _walk(tree, ()):
        if SCANNED in path:
            out[unstacked(path, jax.tree.leaves(value)[0].shape[0])] = value
        else:
            out[unstacked(path, 1)] = jax.tree.map(lambda t: t[None], value)
    return out


def tree_stats(spec: ProbeSpec, trees: dict[str, Any], seed: jax.Array) -> Blocks:
    """Statistics of every leaf of parameter-shaped trees {prefix: tree} (params, grads, updates,
    second moment), one site <prefix>/<Flax path> per leaf and layer.

    A scanned stack (layer, ...) is summarised by one computation vmapped over its layer axis, in
    place; the other leaves of equal shape are stacked and vmapped together, so the compiled step holds
    one copy of the statistics per distinct shape rather than one per leaf, and no copy of a scanned
    (large) parameter. Whether a stack is all finite is decided once for the whole stack, outside the
    vmap (inside it, a `lax.cond` would run both of its branches).
    """
    stacks: dict[tuple[str, ...], jax.Array] = {}
    by_shape: dict[tuple, dict[str, jax.Array]] = {}
    for prefix, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = (prefix, *(str(getattr(p, "key", p)) for p in path))
            if not spec.wants("/".join(names)):
                continue
            leaf = jax.lax.stop_gradient(leaf)
            if SCANNED in names:
                stacks[unstacked(names, leaf.shape[0])] = leaf
            else:
                by_shape.setdefault((leaf.shape, leaf.dtype), {})["/".join(names)] = leaf
    stacks |= {tuple(group): jnp.stack(list(group.values())) for group in by_shape.values()}
    out = {}
    for g, (sites, stack) in enumerate(stacks.items()):
        seeds = seed + jnp.uint32(1000 * g) + jnp.arange(len(sites), dtype=jnp.uint32)
        finite, masked = (jax.vmap(functools.partial(spec.summary, finite=f)) for f in (True, False))
        all_finite = jnp.isfinite(jnp.sum(stack, dtype=jnp.float32))
        out[sites] = jax.lax.cond(all_finite, finite, masked, stack, seeds)
    return out


def pack_index(blocks: Blocks) -> dict[str, list[str]]:
    """{statistic: the sites that have it, in the order of `pack`} (works on shapes too)."""
    index: dict[str, list[str]] = {}
    for names in sorted(blocks):
        for stat in blocks[names]:
            index.setdefault(stat, []).extend(names)
    return dict(sorted(index.items()))


def pack(blocks: Blocks) -> dict[str, jax.Array]:
    """{statistic: array (sites, ...)}: each statistic over the sites that have it (`pack_index`)."""
    parts: dict[str, list[jax.Array]] = {}
    for names in sorted(blocks):
        for stat, value in blocks[names].items():
            parts.setdefault(stat, []).append(value)
    return {stat: jnp.concatenate(parts[stat]) for stat in sorted(parts)}


def dump_names(blocks: Blocks) -> set[str]:
    """Every site name of the `dumps` blocks (works on shapes too)."""
    return {name.removesuffix("/dump") for names in blocks for name in names}


def dumped_sites(blocks: Blocks, patterns: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """{site: {tensor: array}} of the `dumps` blocks for the sites matching `patterns` (full names,
    with the layer): inside the step, so that only the wanted layers of a scanned stack leave it."""
    return {
        name.removesuffix("/dump"): jax.tree.map(lambda t, j=j: t[j], tensors)
        for names, tensors in blocks.items()
        for j, name in enumerate(names)
        if any(fnmatch.fnmatchcase(name.removesuffix("/dump"), p) for p in patterns)
    }
