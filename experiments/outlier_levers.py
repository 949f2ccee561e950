"""The outlier-lever sweep: python experiments/outlier_levers.py [--scale=cpu] [--out=results].

Trains configs/outlier_levers.py once per learning rate x Adam epsilon x norm placement (resuming runs
that stopped, skipping finished ones), then writes OUT/outlier_levers.md: peak and final kurtosis and
outlier channels of the residual stream per run, the lever verdicts, and a figure in OUT/outlier_levers/.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from absl import flags

from configs import outlier_levers
from tdyn_jax import cli
from tdyn_jax.cli import fail

flags.DEFINE_enum(
    "scale", "cpu", list(outlier_levers.SCALES), "Size of each run (configs/outlier_levers.py)."
)
flags.DEFINE_list("lrs", None, "Learning rates (default: the scale's grid).")
flags.DEFINE_list("eps", None, "Adam epsilons (default: the scale's grid).")
flags.DEFINE_list("norms", None, "Norm placements among pre, post, none (default: all three).")
flags.DEFINE_string("workdir", None, "Parent of the run directories (default: runs/<config name>).")
flags.DEFINE_string("out", "results", "Directory of outlier_levers.md and its figure.")

COLUMNS = {
    "final_loss": "final loss", "val_loss": "val loss", "peak_rms_kurtosis": "peak RMS kurt",
    "final_rms_kurtosis": "final RMS kurt", "peak_kurtosis": "peak excess kurt",
    "final_kurtosis": "final excess kurt", "peak_outlier_channels": "peak outlier ch",
    "final_outlier_channels": "final outlier ch", "minutes": "train min",
}  # fmt: skip


def _grid(scale: str) -> tuple[list[float], list[float], list[str]]:
    """The sweep's values: flags over the scale's defaults, each checked."""
    default = outlier_levers.grid(scale)
    try:
        lrs = [float(v) for v in flags.FLAGS.lrs] if flags.FLAGS.lrs else list(default["lr"])
        eps = [float(v) for v in flags.FLAGS.eps] if flags.FLAGS.eps else list(default["eps"])
    except ValueError:
        fail("--lrs and --eps take numbers, e.g. --lrs=1e-3,4e-3 --eps=1e-8,1e-4")
    norms = list(flags.FLAGS.norms or default["norm"])
    unknown = sorted(set(norms) - set(outlier_levers.NORMS))
    if unknown:
        fail(f"--norms: unknown {', '.join(unknown)}; use some of {', '.join(outlier_levers.NORMS)}")
    if min(lrs + eps) <= 0:
        fail("--lrs and --eps must be positive")
    return lrs, eps, norms


def main(argv: list[str]) -> None:
    scale = flags.FLAGS.scale
    lrs, epss, norms = _grid(scale)
    import pandas as pd

    from tdyn_jax.analysis import levers, study, study_plots, verdicts
    from tdyn_jax.analysis.load import load
    from tdyn_jax.analysis.report import read_metrics, write_atomic
    from tdyn_jax.train import train

    start = time.perf_counter()
    base = outlier_levers.get_config(scale)
    root = Path(flags.FLAGS.workdir or f"runs/{base.name}")
    rows, series = [], {}
    for lr, eps, norm in itertools.product(lrs, epss, norms):
        cfg = outlier_levers.with_lever(base, lr, eps, norm)
        workdir = root / cfg.name.split("/", 1)[1]
        cli.refuse_other_run(workdir, cfg.name)
        train(cfg, workdir)
        captures, metrics = load(workdir), read_metrics(workdir)
        summary = levers.run_summary(captures, metrics)
        rows.append({"lr": lr, "eps": eps, "norm": norm, **summary})
        rows[-1]["minutes"] = study.training_seconds(metrics) / 60
        series[(lr, eps, norm)] = levers.kurtosis_series(captures)
        print(f"lr {lr:g} eps {eps:g} norms {norm}: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
    table = pd.DataFrame(rows)
    found = levers.lever_claims(table)

    out = Path(flags.FLAGS.out)
    figure = study_plots.levers_figure(series, out / "outlier_levers" / "kurtosis.png")
    write_atomic(out / "outlier_levers" / "runs.csv", table.to_csv(index=False))
    runs_table = study.markdown_table(table.rename(columns=COLUMNS))
    values = {k: ", ".join(f"{v:g}" for v in vs) for k, vs in (("lr", lrs), ("eps", epss))}
    done = time.perf_counter()
    b = base
    page = f"""# Outlier levers, measured

Written by `python experiments/outlier_levers.py --scale={scale}`: {len(rows)} runs of
`configs/outlier_levers.py:{scale}` ({b.model.num_layers} layers, d_model {b.model.d_model},
{b.train.num_steps} steps of {b.data.batch_size} x {b.data.seq_len} tokens of {b.data.source} bytes,
{b.optim.name}, residual stream captured every {b.probes.every} steps), varying the learning rate
({values["lr"]}), Adam's epsilon ({values["eps"]}) and the norms ({", ".join(norms)}: rmsnorm before
each sub-block, after each residual add, or none).

- Machine: {study.machine()}.
- Training: {table.minutes.sum():.1f} min of train steps and compiles over all runs (from their
  metrics.jsonl); this invocation took {(done - start) / 60:.1f} min.
- RMS kurtosis (He et al. 2024) is mean_j(s_j^4) / mean_j(s_j^2)^2 over the channels' RMS s_j: 1 when
  every channel carries the same energy. Each figure is the largest over the layers; peak is over the
  captures, final is the last capture. Excess kurtosis is over all elements. Outlier channels (LLM.int8:
  |x| >= 6 in >= 6% of tokens) are summed over the layers. A run whose loss is not finite is diverged and
  its outlier figures are nan.

{runs_table}

## Levers

{verdicts.RULE}

{verdicts.markdown(found)}
Every number is also in `outlier_levers/runs.csv`.

![largest RMS kurtosis over training per run](outlier_levers/{figure.name})
"""
    study.publish(out / "outlier_levers.md", page, found)


if __name__ == "__main__":
    cli.run(main)
