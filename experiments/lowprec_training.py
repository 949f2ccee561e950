"""Training in simulated low precision: python experiments/lowprec_training.py [--scale=cpu] [--out=results].

Trains configs/lowprec_training.py once per run of its RUNS (the same model, data and seed in float32,
bfloat16 and each simulated format, forward only or forward and backward; resuming runs that stopped,
skipping finished ones), then writes OUT/lowprec_training.md: per run the loss gaps to float32, the
step of divergence, the residual stream's peak RMS kurtosis and massive activations, the verdict on
the E/R-split GEMM, and a figure and runs.csv in OUT/lowprec_training/.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from configs import lowprec_training
from tdyn_jax import cli
from tdyn_jax.cli import fail

flags.DEFINE_enum(
    "scale", "cpu", list(lowprec_training.SCALES), "Size of each run (configs/lowprec_training.py)."
)
flags.DEFINE_list("runs", None, "Runs to train (default: all of configs/lowprec_training.py's RUNS).")
flags.DEFINE_string("workdir", None, "Parent of the run directories (default: runs/<config name>).")
flags.DEFINE_string("out", "results", "Directory of lowprec_training.md and its figure.")

COLUMNS = {
    "final_loss": "final loss", "val_loss": "val loss", "loss_gap": "loss gap", "val_gap": "val gap",
    "diverged_at": "diverged at", "peak_rms_kurtosis": "peak RMS kurt",
    "final_rms_kurtosis": "final RMS kurt", "peak_massive_ratio": "peak max/median", "minutes": "train min",
}  # fmt: skip


def _runs() -> list[str]:
    """The runs to train, float32 (the reference) first, each checked."""
    runs = list(flags.FLAGS.runs or lowprec_training.RUNS)
    unknown = [r for r in runs if r not in lowprec_training.RUNS]
    if unknown:
        fail(f"--runs: unknown {', '.join(unknown)}; use some of {', '.join(lowprec_training.RUNS)}")
    if "float32" not in runs:
        fail("--runs must include float32: every gap is measured against it")
    return ["float32"] + [r for r in dict.fromkeys(runs) if r != "float32"]


def main(argv: list[str]) -> None:
    runs = _runs()
    import pandas as pd

    from tdyn_jax.analysis import levers, study, study_plots, verdicts
    from tdyn_jax.analysis import lowprec_training as lpt
    from tdyn_jax.analysis.load import load
    from tdyn_jax.analysis.report import read_metrics, write_atomic
    from tdyn_jax.guard import NonFiniteStop
    from tdyn_jax.train import train

    start = time.perf_counter()
    scale = flags.FLAGS.scale
    base = lowprec_training.get_config(scale)
    root = Path(flags.FLAGS.workdir or f"runs/{base.name}")
    rows, losses, kurtosis = [], {}, {}
    for run in runs:
        cfg = lowprec_training.with_format(base, run)
        workdir = root / run
        cli.refuse_other_run(workdir, cfg.name)
        stopped_at = None
        try:
            train(cfg, workdir)
        except NonFiniteStop as e:
            stopped_at = e.step
        captures, metrics = load(workdir), read_metrics(workdir)
        losses[run] = metrics
        kurtosis[run] = levers.kurtosis_series(captures)
        summary = lpt.run_summary(captures, metrics, losses[lpt.REFERENCE], stopped_at)
        dtype, forward, grad = lowprec_training.RUNS[run]
        rows.append({"run": run, "compute": dtype, "forward": forward, "backward": grad, **summary})
        rows[-1]["minutes"] = study.training_seconds(metrics) / 60
        print(f"{run}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()), flush=True)
    table = pd.DataFrame(rows)
    found = [lpt.er_claim(table)]

    out = Path(flags.FLAGS.out)
    figure = study_plots.lowprec_training_figure(
        losses, kurtosis, lpt.REFERENCE, out / "lowprec_training" / "losses.png"
    )
    write_atomic(out / "lowprec_training" / "runs.csv", table.to_csv(index=False))
    done = time.perf_counter()
    b = base
    page = f"""# Training in simulated low precision, measured

Written by `python experiments/lowprec_training.py --scale={scale}`: {len(rows)} runs of
`configs/lowprec_training.py:{scale}` ({b.model.num_layers} layers, d_model {b.model.d_model},
{b.train.num_steps} steps of {b.data.batch_size} x {b.data.seq_len} tokens of {b.data.source} bytes,
{b.optim.name} lr {b.optim.lr:g}, seed {b.seed}), identical but for the number format of the weight
matmuls (`model.matmul_format`, every weight matmul including the unembedding; the attention's two
activation products stay in float32) and of the gradient dL/dC in their two backward products
(`model.matmul_grad_format`; "none": straight through, computed in float32 from the forward's
quantised operands).

- Machine: {study.machine()}.
- Training: {table.minutes.sum():.1f} min of train steps and compiles over all runs (from their
  metrics.jsonl); this invocation took {(done - start) / 60:.1f} min.
- Formats (`tdyn_jax/fake_quant.py`): F/tensor and F/channel scale by absmax per tensor or per row of
  A and column of W; F/er is the E/R-split GEMM (each row and column divided by its L2 norm, mapped
  onto F's range, E = the norms kept in float32); mxfp8_e4m3, mxfp4 (blocks of 32, power-of-two
  scales) and nvfp4 (blocks of 16, E4M3 scales and a float32 tensor scale) along the contraction axis.
  Rounding is to nearest, ties to even, saturating; no stochastic rounding or Hadamard transforms.
- Gaps are the final training loss (and the last validation loss) minus float32's, in nats. A run
  diverged at the first logged step whose loss is not finite or exceeds float32's at that step by more
  than {lpt.DIVERGED_GAP:g} nat. Peak RMS kurtosis and peak max/median (massive activations) are over
  the residual stream's layers and captures (every {b.probes.every} steps).

{study.markdown_table(table.rename(columns=COLUMNS))}

## The E/R-split GEMM

{verdicts.RULE}

{verdicts.markdown(found)}
Every number is also in `lowprec_training/runs.csv`.

![loss minus float32's, and the residual stream's RMS kurtosis, per run](lowprec_training/{figure.name})
"""
    study.publish(out / "lowprec_training.md", page, found)


if __name__ == "__main__":
    cli.run(main)
