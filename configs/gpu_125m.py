"""One GPU: a GPT-2-small-sized model (124M parameters with the tied 50304-token embedding) in bfloat16
compute on synthetic tokens; `benchmarks/gpu_check.py` measures it. For real data set data.source."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the single-GPU configuration."""
    c = base.get_config()
    c.name = "gpu_125m"
    c.model.vocab_size = 50304
    c.model.d_model = 768
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.d_ff = 3072
    c.model.max_len = 1024
    c.model.compute_dtype = "bfloat16"
    c.data.source = "synthetic"
    c.data.synthetic_size = 20_000_000
    c.data.seq_len = 1024
    c.data.batch_size = 32
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 100
    c.train.num_steps = 300
    c.train.log_every = 50
    c.train.eval_every = 300
    c.checkpoint.every = 300
    c.probes.every = 50
    return c
