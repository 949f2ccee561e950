"""CPU demo: a byte-level model that learns Shakespeare visibly in about 10 minutes on 2 cores."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the small CPU demo configuration."""
    c = base.get_config()
    c.name = "small"
    c.model.d_model = 192
    c.model.num_layers = 4
    c.model.num_heads = 6
    c.model.d_ff = 768
    c.model.max_len = 128
    # the scan compiles the probed step's per-layer statistics once instead of once per layer (minutes
    # less on CPU); unrolled layers (scan_layers=False) run the plain step somewhat faster on XLA:CPU
    c.model.scan_layers = True
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.train.num_steps = 1000
    c.train.log_every = 20
    c.train.eval_every = 200
    c.checkpoint.every = 200
    return c
