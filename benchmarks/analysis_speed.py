"""Time of the offline analysis of a run: fits of every site x capture step, then the full report.

    python benchmarks/analysis_speed.py --workdir=runs/small [--workers=2]

Prints the number of fitted samples, the fit time with 1 thread and with --workers threads side by
side (same process, same data), the time per family, and the time of write_report (fits, figures,
animations and page), with the number of figures it drew.
"""

from __future__ import annotations

import time

from absl import flags

from configs import base
from tdyn_jax import cli
from tdyn_jax.analysis import load
from tdyn_jax.analysis.fit import FAMILIES, fit, fit_captures
from tdyn_jax.analysis.report import write_report

flags.DEFINE_string("workdir", None, "A run directory with captures (e.g. runs/small).")
flags.DEFINE_integer("workers", 2, "Threads for the parallel fit.", lower_bound=1)
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    workdir = cli.run_directory(flags.FLAGS.workdir)
    start = time.perf_counter()
    captures = load(workdir)
    print(f"load: {time.perf_counter() - start:.2f} s")
    sample = captures.arrays["sample"]
    rows = sample.values.reshape(-1, sample.values.shape[-1])
    shape = f"{len(sample.steps)} steps x {len(sample.sites)} sites = {len(rows)} rows of {rows.shape[1]}"
    print(f"samples: {shape}")
    for family in FAMILIES:
        start = time.perf_counter()
        fit(rows, family)
        print(f"  {family:10s} 1 thread: {time.perf_counter() - start:6.2f} s")
    timings = {}
    for workers in (1, flags.FLAGS.workers):
        start = time.perf_counter()
        fit_captures(captures, workers=workers)
        timings[workers] = time.perf_counter() - start
    workers = flags.FLAGS.workers
    one, many = timings[1], timings[workers]
    print(f"fit every site x step: 1 thread {one:.2f} s, {workers} threads {many:.2f} s ({one / many:.2f}x)")
    a = base.get_config().analysis
    start = time.perf_counter()
    page = write_report(workdir, a.kinds, workers=flags.FLAGS.workers, progress=False)
    figures = len([p for p in page.parent.iterdir() if p.suffix in (".png", ".gif")])
    print(f"write_report: {time.perf_counter() - start:.1f} s, {figures} figures -> {page}")


if __name__ == "__main__":
    cli.run(main)
