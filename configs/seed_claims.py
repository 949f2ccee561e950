"""The run of experiments/seed_claims.py: every statistic at every site, captured densely early on.

Scales (``experiments/seed_claims.py --scale=large``, or ``--config=configs/seed_claims.py:large`` for
run.py): tiny (seconds, for tests), cpu (the small model on Shakespeare, about 15 minutes on 2 cores),
large (8 layers of width 512 for 5000 steps of 64 x 256 tokens, for one GPU or TPU host; Shakespeare
repeats about 15 times at this size, so point data.source at a larger corpus for more than a first look).
"""

import ml_collections

from configs import small, tiny

SCALES = ("tiny", "cpu", "large")
LARGE_MODEL = {"d_model": 512, "num_layers": 8, "num_heads": 8, "d_ff": 2048, "max_len": 256}


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    """Returns the seed-claims run at `scale` (tiny | cpu | large)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}")
    if scale == "tiny":
        c = tiny.get_config()  # its sites cover every kind the claims read
        c.probes.at_steps = (1, 2, 3)
    else:
        c = small.get_config()
        c.probes.at_steps = (5, 10, 20, 30, 50, 75)  # the early change, before the every-100 captures
    if scale == "large":
        c.model.update(LARGE_MODEL)
        c.data.seq_len = 256
        c.data.batch_size = 64
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 200
        c.train.num_steps = 5000
        c.train.eval_every = 500
        c.checkpoint.every = 500
        c.probes.every = 250
        c.probes.at_steps = (10, 25, 50, 100, 150)
    c.name = f"seed_claims_{scale}"
    c.analysis.report = False  # the study writes its own tables and figures
    return c
