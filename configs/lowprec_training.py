"""The runs of experiments/lowprec_training.py: one model, data and seed, trained with its weight
matmuls in each simulated number format (model.matmul_format), forward only or forward and backward.

Only the residual stream's moments and outlier metrics are captured, so that each format's outliers can
be compared. Scales (``experiments/lowprec_training.py --scale=large``): tiny (seconds, for tests), cpu
(d_model 128, 4 layers, 800 steps of 16 x 128 tokens of Shakespeare: 2-4 minutes per run on 2
cores), large (the seed-claims large model for 5000 steps, for one GPU or TPU host).
"""

import ml_collections

from configs import base, outlier_levers, seed_claims, tiny

SCALES = ("tiny", "cpu", "large")
# name -> (compute dtype, forward format, gradient format of the backward products; see base.py)
RUNS = {
    "float32": ("float32", "none", "none"),
    "bf16": ("bfloat16", "none", "none"),
    "fp8_tensor": ("float32", "e4m3/tensor", "none"),
    "fp8_tensor_bwd": ("float32", "e4m3/tensor", "e5m2/tensor"),
    "mxfp8": ("float32", "mxfp8_e4m3", "none"),
    "mxfp8_bwd": ("float32", "mxfp8_e4m3", "mxfp8_e5m2"),
    "mxfp4": ("float32", "mxfp4", "none"),
    "mxfp4_bwd": ("float32", "mxfp4", "mxfp4"),
    "nvfp4": ("float32", "nvfp4", "none"),
    "nvfp4_bwd": ("float32", "nvfp4", "nvfp4"),
    "fp8_channel": ("float32", "e4m3/channel", "none"),
    "fp8_channel_bwd": ("float32", "e4m3/channel", "e5m2/channel"),
    "fp4_channel": ("float32", "e2m1/channel", "none"),
    "fp4_channel_bwd": ("float32", "e2m1/channel", "e2m1/channel"),
    "er_fp8": ("float32", "e4m3/er", "none"),
    "er_fp8_bwd": ("float32", "e4m3/er", "e5m2/er"),
    "er_fp4": ("float32", "e2m1/er", "none"),
    "er_fp4_bwd": ("float32", "e2m1/er", "e2m1/er"),
}


def with_format(c: ml_collections.ConfigDict, run: str) -> ml_collections.ConfigDict:
    """A copy of base run `c` trained as `run` (a key of RUNS), named after it."""
    c = c.copy_and_resolve_references()
    c.model.compute_dtype, c.model.matmul_format, c.model.matmul_grad_format = RUNS[run]
    c.model.logits_dtype = "compute"  # the bf16 run: every weight matmul in bf16, the unembedding too
    c.name = f"{c.name}/{run}"
    return c


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    """Returns the base run at `scale` (tiny | cpu | large), in float32."""
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
        c.model.max_len = 128
        c.data.seq_len = 128
        c.data.batch_size = 16
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 80
        c.train.num_steps = 800
        c.train.log_every = 20
        c.train.eval_every = 200
        c.checkpoint.every = 400
        c.probes.every = 50
    if scale == "large":
        c.model.update(seed_claims.LARGE_MODEL)
        c.data.batch_size = 64
        c.optim.warmup_steps = 200
        c.train.num_steps = 5000
        c.train.eval_every = 500
        c.checkpoint.every = 500
        c.probes.every = 100
    c.name = f"lowprec_training_{scale}"
    return outlier_levers.residual_outliers_only(c)
