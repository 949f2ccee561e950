"""The seed-claims study: python experiments/seed_claims.py [--scale=cpu] [--out=results].

Trains configs/seed_claims.py at the chosen scale (resuming an interrupted run; a finished run is not
trained again), fits Gaussian and logistic distributions to the weight and residual-stream samples,
measures claims (a)-(d) with the checks of tdyn_jax/analysis/claims.py, and writes OUT/seed_claims.md
with its figures, every check's number and the weight matrices' tail ratios in OUT/seed_claims/.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from configs import seed_claims
from tdyn_jax import cli

flags.DEFINE_enum("scale", "cpu", list(seed_claims.SCALES), "Size of the run (configs/seed_claims.py).")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>); rerun to resume.")
flags.DEFINE_string("out", "results", "Directory of seed_claims.md and its figures.")
flags.DEFINE_integer("workers", 2, "Threads that fit the distributions.", lower_bound=1)


def main(argv: list[str]) -> None:

    from tdyn_jax.analysis import claims, plots, study, study_plots, verdicts
    from tdyn_jax.analysis.fit import fit_captures
    from tdyn_jax.analysis.load import load
    from tdyn_jax.analysis.report import read_metrics, write_atomic
    from tdyn_jax.train import train

    start = time.perf_counter()
    cfg = seed_claims.get_config(flags.FLAGS.scale)
    workdir = Path(flags.FLAGS.workdir or f"runs/{cfg.name}")
    cli.refuse_other_run(workdir, cfg.name)
    train(cfg, workdir)
    trained = time.perf_counter()

    captures = load(workdir)
    sites = claims.weight_sites(captures) + claims.residual_sites(captures)
    fits = fit_captures(captures, sites, flags.FLAGS.workers, families=("gaussian", "logistic"))
    found = claims.seed_claims(captures, fits, cfg.train.num_steps)

    out = Path(flags.FLAGS.out)
    figures = out / "seed_claims"
    study_plots.claims_figure(captures, fits, cfg.train.num_steps, found, figures / "claims.png")
    plots.histograms(captures, fits, claims.RESIDUAL, figures / "resid_out_histograms.png")
    write_atomic(figures / "checks.csv", study.checks_table(found).to_csv(index=False))
    tails = claims.weight_tails(captures, cfg.train.num_steps)  # for experiments/pythia_reference.py
    write_atomic(figures / "weight_tails.csv", tails.to_csv(index=False))
    metrics = read_metrics(workdir)
    done = time.perf_counter()
    m, last = cfg.model, metrics.iloc[-1]
    val = metrics.val_loss.dropna().iloc[-1] if "val_loss" in metrics else float("nan")
    page = f"""# Seed claims, measured

Written by `python experiments/seed_claims.py --scale={flags.FLAGS.scale}`; every number and verdict
below comes from the run and the rules in `tdyn_jax/analysis/claims.py` and `verdicts.py`.

- Run: `configs/seed_claims.py:{flags.FLAGS.scale}`: {m.num_layers} layers, d_model {m.d_model}, d_ff
  {m.d_ff}, {m.norm} ({m.norm_placement}-norm), {cfg.data.source} bytes, {cfg.train.num_steps} steps of
  {cfg.data.batch_size} x {cfg.data.seq_len} tokens, {cfg.optim.name} lr {cfg.optim.lr:g}; captures at
  steps {", ".join(str(s) for s in captures.steps)}. Final loss {last.loss:.4f}, validation loss {val:.4f}.
- Machine: {study.machine()}.
- Training: {study.training_seconds(metrics) / 60:.1f} min of train steps and compiles (from the run's
  metrics.jsonl). This invocation: {(done - start) / 60:.1f} min, of which {done - trained:.0f} s of
  analysis (fits of {fits.site.nunique()} sites x {fits.step.nunique()} captures, figures).
- "Early" is the first {claims.EARLY:.0%} of the steps; tail references are the 99% quantiles of the
  largest |x| / std of n Gaussian or logistic values; the Gaussian KS test uses its simulated 1% critical
  value for the sample size.

{verdicts.RULE}

{verdicts.markdown(found)}
Each check's number is also in `seed_claims/checks.csv`.

![the quantity behind each claim, with its reference](seed_claims/claims.png)

![residual stream histograms with Gaussian and logistic fits](seed_claims/resid_out_histograms.png)
"""
    study.publish(out / "seed_claims.md", page, found)


if __name__ == "__main__":
    cli.run(main)
