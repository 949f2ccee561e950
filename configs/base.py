"""Every field a user can change, with its default. Other configs start from `get_config()` here."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (a mid-sized byte-level model on Shakespeare)."""
    c = ml_collections.ConfigDict()
    c.name = "base"  # run name; the default workdir is runs/<name>
    c.seed = 0  # seed of parameter init and of the data order

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 257  # 256 bytes + BOS; for token files, the tokenizer's vocabulary size
    m.d_model = 256  # residual stream width
    m.num_layers = 4  # transformer blocks
    m.num_heads = 4  # attention heads; must divide d_model
    m.d_ff = 1024  # MLP hidden width
    m.max_len = 256  # longest sequence (learned positions table size); >= data.seq_len
    m.norm = "rmsnorm"  # layernorm | rmsnorm | none
    m.norm_placement = "pre"  # pre | post (norm before the sub-block or after the residual add)
    m.norm_eps = 1e-6  # epsilon of the norms
    m.mlp = "gelu"  # gelu | relu | swiglu
    m.positions = "rope"  # rope | learned
    m.rope_base = 10000.0  # RoPE base frequency
    m.qk_norm = False  # RMS-normalise queries and keys per head before the score matmul
    m.tie_embeddings = True  # unembedding uses the transposed token embedding
    m.use_bias = False  # biases in every Linear
    m.init_std = 0.02  # std of the normal init of kernels and embeddings (residual outputs: / sqrt(2 L))
    m.scan_layers = True  # nn.scan over identical blocks (traced once: fast compile); False: a Python loop
    m.scan_unroll = True  # unroll the scan in XLA: as fast as the loop (a rolled scan is slower on CPU)
    m.remat = "none"  # none | full | dots | dots_no_batch: what a block saves for the backward pass
    m.param_dtype = "float32"  # float32 | bfloat16: parameters and optimizer state
    m.compute_dtype = "float32"  # float32 | bfloat16: matmul inputs (accumulation is always float32)
    # float32 | compute: the unembedding's inputs; float32 (the default) gives the loss float32 logits, as
    # most mixed-precision recipes do (and on XLA:CPU a bfloat16 unembedding is ~1.5x slower at vocab 32k)
    m.logits_dtype = "float32"
    # simulated low-precision training of the weight matmuls (tdyn_jax/fake_quant.py): none | F/S, F one
    # of e4m3, e5m2, e2m1, int8 and S one of none, tensor, channel (A per token, W per column by absmax),
    # er (the E/R-split GEMM) | mxfp8_e4m3, mxfp8_e5m2, mxfp4, nvfp4 (blocks along the contraction axis)
    m.matmul_format = "none"
    m.matmul_grad_format = "none"  # none: backward products straight through; else dL/dC's format in both
    # the weight matmuls in low precision, without the layer: attn/q, attn/k, attn/v, attn/out, mlp/up,
    # mlp/gate, mlp/down, unembed
    m.matmul_sites = ("*",)

    c.data = d = ml_collections.ConfigDict()
    d.source = "shakespeare"  # shakespeare | synthetic | text (file or directory) | tokens (.bin)
    d.path = ""  # file or directory for source=text or source=tokens
    d.token_dtype = "uint16"  # element type of a tokens .bin file (nanoGPT writes uint16)
    d.seq_len = 256  # tokens per training sequence
    d.batch_size = 32  # global batch (sequences per step over all devices and hosts)
    d.val_fraction = 0.05  # share of the corpus held out for validation (its tail)
    d.synthetic_size = 2_000_000  # bytes of generated text for source=synthetic

    c.optim = o = ml_collections.ConfigDict()
    o.name = "adamw"  # adamw | adam | sgd | lion | adafactor
    o.lr = 1e-3  # peak learning rate (adafactor scales it by each parameter's RMS: try 0.01-0.3)
    o.b1 = 0.9  # first-moment decay (adam, adamw, lion)
    o.b2 = 0.95  # second-moment decay (adam, adamw, lion)
    o.eps = 1e-8  # epsilon of adam/adamw
    o.weight_decay = 0.1  # decoupled weight decay (adamw, lion, adafactor)
    o.momentum = 0.9  # momentum of sgd (0 = plain sgd)
    o.schedule = "cosine"  # cosine | constant (both after the linear warmup)
    o.warmup_steps = 100  # linear warmup from 0 to lr
    o.min_lr_ratio = 0.1  # final lr of the cosine as a fraction of lr
    o.grad_clip = 1.0  # global-norm clipping threshold; 0 disables
    o.z_loss = 0.0  # weight of the z-loss mean(logsumexp(logits)^2); 0 disables

    c.train = t = ml_collections.ConfigDict()
    t.num_steps = 2000  # optimizer steps in total (raise it to extend a finished run)
    t.log_every = 20  # steps between metric lines
    t.eval_every = 200  # steps between validation evaluations (and after the last step)
    t.eval_batches = 8  # batches of the validation split per evaluation
    t.progress_bar = True  # tqdm bar with ETA when stderr is a terminal
    t.tensorboard = False  # TensorBoard events: metrics in WORKDIR/tb, captures in tb/probes ([tb] extra)
    # a non-finite loss or gradient norm: stop (save the captures, keep the newest finite checkpoint,
    # exit 3) | skip (leave the state unchanged for that step; stop after max_skipped in a row) | ignore
    t.nonfinite = "stop"
    t.max_skipped = 10  # train.nonfinite=skip: skipped steps in a row before the run stops
    t.compilation_cache = True  # keep compiled steps in <cache dir>/xla: resumes and reruns skip compiling

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every = 200  # steps between checkpoints (and always after the last step)
    k.keep = 3  # newest train-state checkpoints kept
    k.async_save = True  # write checkpoints in a background thread

    c.probes = p = ml_collections.ConfigDict()
    p.enabled = True  # capture statistics inside the train step (False: only the plain step is compiled)
    p.every = 100  # capture at steps 0, every, 2 * every, ... (the index of the step being taken)
    p.at_steps = ()  # more steps to capture, e.g. (10, 50)
    p.sites = ("*",)  # fnmatch patterns over site names without the layer: "attn/*", "resid/out", "params/*"
    p.stats = ("exp_hist", "lin_hist", "sample", "outliers", "energy", "lowprec")  # groups beyond moments
    p.grads = True  # statistics of dL/dx at every captured activation and matmul output (grad taps)
    p.params = True  # statistics of every parameter, its gradient, its update and its second moment
    p.sample_size = 4096  # raw values sampled uniformly per site and capture, for offline fits
    p.exp_min = -48  # smallest exponent of the signed log2 histogram (smaller |x| share its bin)
    p.exp_max = 16  # largest exponent of the signed log2 histogram (larger |x| share its bin)
    p.lin_bins = 64  # bins of the linear histogram (over [min, max] of the tensor; R: [-1, 1])
    p.topk = 4  # largest |x| reported per activation site (massive activations)
    # simulated low-precision formats of A and W: e4m3, e5m2, e2m1, int8 (with probes.scalings) and the
    # block-scaled mxfp8_e4m3, mxfp8_e5m2, mxfp4, nvfp4 (each one more product per matmul and capture)
    p.formats = ("e4m3", "e5m2", "int8")
    # their scalings: channel = A per token, W per column by absmax; er = the E/R-split GEMM (A per token,
    # W per column by the L2 norm: the directions quantised, E exact)
    p.scalings = ("none", "tensor", "channel", "er")
    p.r_bits = (4, 8)  # uniform bits of R when C is stored as E and R
    p.e_frac_bits = (0, 3)  # fractional bits of the 8-bit log2 code of E (0: E as a power of two)
    p.rows = 256  # rows (tokens) per site for the sampled statistics: R, log split, low precision, medians
    p.cols = 256  # columns of a matmul's output per site for R, the log split and low precision
    p.dump_steps = ()  # steps at which the full tensors of dump_sites are written to WORKDIR/dumps
    p.dump_sites = ()  # sites to dump (patterns with the layer): "layer_01/mlp/up", "*/resid/out"

    c.analysis = a = ml_collections.ConfigDict()
    a.report = True  # after training, write WORKDIR/analysis/report.html (fits, figures, animations)
    # sites (patterns without the layer) drawn as histograms, QQ plots, heatmaps and animations
    a.kinds = (
        "resid/out", "resid/mid", "mlp/hidden", "resid/out/grad", "params/mlp/up/kernel",
        "grads/mlp/up/kernel", "mlp/up/R", "attn/scores/R",
    )  # fmt: skip
    a.criterion = "bic"  # aic | bic: how the best-fitting family is chosen in the heatmaps
    a.reference = "none"  # none | pythia: also draw the run's weight tails over Pythia's training
    a.workers = 2  # threads that fit distributions, and processes that draw the figures

    c.mesh = s = ml_collections.ConfigDict()
    s.data = -1  # devices on the data-parallel axis; -1: all devices not used by fsdp
    s.fsdp = 1  # devices that shard parameters and optimizer state (ZeRO-3 style)
    s.fsdp_min_size = 2**14  # parameters with fewer elements stay replicated
    s.distributed = "auto"  # auto | on | off: jax.distributed.initialize() (auto: if a cluster is found)
    s.coordinator_address = ""  # host:port of process 0, for clusters JAX does not detect ("" = detect)
    s.num_processes = 0  # processes in the job, with coordinator_address (0 = detect)
    s.process_id = -1  # this process's index, with coordinator_address (-1 = detect)
    return c
