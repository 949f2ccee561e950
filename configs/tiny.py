"""Seconds-long runs for tests: two small layers on the synthetic corpus."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the tiny test configuration."""
    c = base.get_config()
    c.name = "tiny"
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.d_ff = 64
    c.model.max_len = 32
    c.data.source = "synthetic"
    c.data.synthetic_size = 200_000
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.optim.schedule = "constant"  # the lr does not depend on num_steps: extending a run recompiles nothing
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 2
    c.train.progress_bar = False
    c.checkpoint.every = 10
    c.checkpoint.keep = 2
    c.mesh.fsdp_min_size = 256
    # capture every 5 steps at a few sites of each kind, every statistic group, one format
    c.probes.every = 5
    c.probes.sites = ("resid/*", "attn/scores", "mlp/up", "*/attn/q/kernel")
    c.probes.formats = ("e4m3", "e5m2")
    c.probes.sample_size = 64
    c.probes.rows = 64  # of 256 tokens: the sampled statistics really sample
    c.probes.cols = 48  # of the 64 columns of mlp/up
    c.analysis.report = False  # the report has tests of its own
    c.analysis.kinds = ("resid/out",)
    c.analysis.workers = 1  # a tiny report draws faster in-process than it spawns helpers (3.3 s vs 4.4 s)
    return c
