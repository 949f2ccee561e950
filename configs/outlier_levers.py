"""The base run of experiments/outlier_levers.py, which varies optim.lr, optim.eps and the norms.

Only the residual stream's moments and outlier metrics are captured, often, so that the peak is seen.
Scales (``experiments/outlier_levers.py --scale=large``): tiny (seconds, for tests), cpu (about 1.5
minutes per run on 2 cores), large (8 layers of width 512 for 3000 steps, for one GPU or TPU host).
"""

import ml_collections

from configs import base, seed_claims, tiny

SCALES = ("tiny", "cpu", "large")
NORMS = ("pre", "post", "none")  # pre-norm, post-norm, no norms at all


def grid(scale: str = "cpu") -> dict[str, tuple]:
    """The sweep's default values of each factor (the script's flags override them)."""
    lrs = {"tiny": (1e-3, 1e-2), "cpu": (1e-3, 4e-3), "large": (3e-4, 1.5e-3)}[scale]
    return {"lr": lrs, "eps": (1e-8, 1e-4), "norm": NORMS}


def with_lever(c: ml_collections.ConfigDict, lr: float, eps: float, norm: str) -> ml_collections.ConfigDict:
    """A copy of base run `c` with one point of the sweep, named after it."""
    c = c.copy_and_resolve_references()
    c.optim.lr, c.optim.eps = lr, eps
    if norm == "none":
        c.model.norm = "none"
    else:
        c.model.norm_placement = norm
    c.name = f"{c.name}/lr{lr:g}_eps{eps:g}_{norm}"
    return c


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    """Returns the base lever run at `scale` (tiny | cpu | large)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}")
    c = tiny.get_config() if scale == "tiny" else base.get_config()
    if scale == "tiny":
        c.train.num_steps = 10
    if scale == "cpu":
        c.model.d_model = 128
        c.model.num_layers = 4
        c.model.num_heads = 4
        c.model.d_ff = 512
        c.model.max_len = 64
        c.data.seq_len = 64
        c.data.batch_size = 16
        c.optim.warmup_steps = 30
        c.train.num_steps = 300
        c.train.log_every = 25
        c.train.eval_every = 100
        c.checkpoint.every = 100
        c.probes.every = 25
    if scale == "large":
        c.model.update(seed_claims.LARGE_MODEL)
        c.data.batch_size = 64
        c.optim.warmup_steps = 200
        c.train.num_steps = 3000
        c.train.eval_every = 500
        c.checkpoint.every = 500
        c.probes.every = 100
    c.name = f"outlier_levers_{scale}"
    return residual_outliers_only(c)


def residual_outliers_only(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` capturing only the residual stream's moments and outlier metrics, without a report."""
    c.probes.sites = ("resid/out",)
    c.probes.stats = ("outliers",)
    c.probes.grads = False
    c.probes.params = False
    c.analysis.report = False
    return c
