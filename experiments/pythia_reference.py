"""Claim (a) on real Pythia training: python experiments/pythia_reference.py [--workdir=RUN] [--out=results].

Measures the weight tails of Pythia 19M-1.3B over their training from the vendored statistics
(tdyn_jax/reference), and those of one of the project's runs by the same rules on the same axes: a
run directory (--workdir), or by default the committed seed-claims run (results/seed_claims/
weight_tails.csv). Writes OUT/pythia_reference.md with per-model verdicts, a figure of the tails over
training, a figure and table of how they scale with model size, and the numbers in CSV files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import flags

from tdyn_jax import cli
from tdyn_jax.cli import fail

flags.DEFINE_string("workdir", None, "A run to compare (default: the committed seed-claims run's tails).")
flags.DEFINE_string(
    "tails", "results/seed_claims/weight_tails.csv", "Weight tails of a run, used without --workdir."
)
flags.DEFINE_string("out", "results", "Directory of pythia_reference.md and its figures.")


def _run_tails():
    """(label, tail table) of the run to compare: from --workdir's captures or the --tails file."""
    import pandas as pd

    from tdyn_jax.analysis import claims
    from tdyn_jax.analysis import pythia as lib
    from tdyn_jax.analysis.load import CapturesError, load

    if flags.FLAGS.workdir:
        workdir = Path(flags.FLAGS.workdir)
        config = workdir / "config.json"
        if not config.is_file():
            fail(f"{workdir} is not a run directory (no config.json): pass the --workdir of a run")
        cfg = json.loads(config.read_text())
        try:
            tails = claims.weight_tails(load(workdir), cfg["train"]["num_steps"])
        except CapturesError as e:
            fail(f"{workdir}: {e}")
        if tails.empty:
            fail(f"{workdir} captured no weight matrices (params/.../kernel): run it with probes.params")
        return f"this project: {cfg['name']}", lib.run_tails(tails)
    path = Path(flags.FLAGS.tails)
    if not path.is_file():
        fail(f"--tails={path} does not exist: run experiments/seed_claims.py or pass --workdir")
    return "this project: seed_claims_cpu", lib.run_tails(pd.read_csv(path))


def main(argv: list[str]) -> None:
    import pandas as pd

    from tdyn_jax.analysis import pythia as lib
    from tdyn_jax.analysis import study, study_plots, verdicts
    from tdyn_jax.analysis.report import write_atomic
    from tdyn_jax.reference import PYTHIA_SIZES

    start = time.perf_counter()
    run_label, run_tails = _run_tails()
    tails = lib.with_pythia(run_label, run_tails)
    measures = {label: lib.tail_measures(frame) for label, frame in tails.items()}
    found = [
        lib.tails_claim(PYTHIA_SIZES[size][0], measures[size], PYTHIA_SIZES[size][0]) for size in PYTHIA_SIZES
    ]
    found.append(lib.tails_claim("run", measures[run_label], run_label))

    out = Path(flags.FLAGS.out)
    figures = out / "pythia_reference"
    tails_png = study_plots.pythia_tails_figure(tails, figures / "tails.png")
    table = lib.scaling_table(measures)
    scaling_png = study_plots.pythia_scaling_figure(table, figures / "scaling.png")
    per_matrix = pd.concat([m.assign(model=label) for label, m in measures.items()], ignore_index=True)
    write_atomic(figures / "matrices.csv", per_matrix.to_csv(index=False))
    write_atomic(figures / "scaling.csv", table.to_csv(index=False))
    write_atomic(figures / "checks.csv", study.checks_table(found).to_csv(index=False))
    lines = [
        "| model | d_model | layers | matrices | share above | median max/std first -> last | Gaussian ref |"
        " largest change at | share by 25% | share within 5% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    size = lambda v: "" if pd.isna(v) else f"{v:.0f}"  # a project run's row leaves them blank
    for r in table.itertuples():
        lines.append(
            f"| {r.name} | {size(r.d_model)} | {size(r.layers)} | {r.matrices} | {r.share_above:.2f} |"
            f" {r.first_ratio:.2f} -> {r.last_ratio:.2f} | {r.reference:.2f} | {r.largest_change_at:.1%} |"
            f" {r.early_share:.2f} | {r.sharp_share:.2f} |"
        )
    done = time.perf_counter()
    page = f"""# Claim (a) on real Pythia training

Written by `python experiments/pythia_reference.py` in {done - start:.1f} s; every number and
verdict below comes from the vendored Pythia weight statistics (`tdyn_jax/reference/`, see its
PROVENANCE.md for the source, the licence and the assumptions) and the rules in
`tdyn_jax/analysis/pythia.py`, fixed before the data was looked at.

- Pythia: the four weight matrices of every layer (query-key-value, attention output, MLP in and out)
  of five models, at 142 checkpoints 1000 steps apart (row i taken as step 1000 (i + 1) of 143000).
  The compared run: {run_label}, {run_tails.matrix.nunique()} weight matrices at
  {run_tails.step.nunique()} captures. Training progress is the fraction of each run.
- Tail ratio: max / std of each matrix, against the 99% quantile of max |z| over n Gaussian values (n
  the matrix's size; max |z| is the larger reference whether Pythia's `max` is max w or max |w|). A
  change is measured from a matrix's first to its last point; "largest change at" is the progress of
  the largest change between consecutive points (median over matrices); "share by 25%" the share of
  the whole change made by 25% of training; "share within 5%" the largest share made within any 5% of
  training (medians over matrices).
- Claim (a)'s Gaussian bulk cannot be measured from these statistics (no samples), so only its tail
  and timing parts are judged, per model. The first Pythia point is step 1000 (0.7% of training), not
  the initialisation.

{chr(10).join(lines)}

{verdicts.RULE}

{verdicts.markdown(found)}
Every number is also in `pythia_reference/checks.csv`, `scaling.csv` (the table above) and
`matrices.csv` (each matrix).

![max / std over its Gaussian reference over training](pythia_reference/{tails_png.name})

![the tail measures by model size](pythia_reference/{scaling_png.name})
"""
    study.publish(out / "pythia_reference.md", page, found)


if __name__ == "__main__":
    cli.run(main)
