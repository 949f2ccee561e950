"""Example for a Cloud TPU v5e-64 pod slice (16 hosts x 4 chips): a 350M-parameter model, data x fsdp.

Start the same command on every host; the workdir must be a directory all hosts share (a Filestore
NFS mount, or a bucket mounted with gcsfuse), e.g.
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd tdyn_jax && \
    python run.py --config=configs/tpu_v5e_64.py --workdir=/mnt/shared/runs/v5e64"
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the pod-slice configuration."""
    c = base.get_config()
    c.name = "tpu_v5e_64"
    c.model.d_model = 1024
    c.model.num_layers = 24
    c.model.num_heads = 16
    c.model.d_ff = 4096
    c.model.max_len = 1024
    c.model.remat = "dots_no_batch"
    c.model.scan_unroll = False  # 24 layers: one compiled body keeps the compile short
    c.model.compute_dtype = "bfloat16"
    c.data.source = "tokens"
    c.data.path = "/mnt/disks/data/openwebtext"  # on every host: nanoGPT train.bin and val.bin
    c.model.vocab_size = 50304  # GPT-2 BPE vocabulary, padded to a multiple of 128
    c.data.seq_len = 1024
    c.data.batch_size = 512
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.train.num_steps = 100_000
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.checkpoint.every = 1000
    # every site, every statistic but the two histograms: on a TPU their per-element bin index is
    # written out as a full int32 array at each site, and the probed step then needs 14.4 GiB per chip
    # (v5e: 16), too little margin; without them 11.4 GiB (the plain step 7.5), compiled by
    # benchmarks/tpu_compile.py
    c.probes.stats = ("sample", "outliers", "energy", "lowprec")
    c.mesh.fsdp = 16
    c.mesh.distributed = "on"
    return c
