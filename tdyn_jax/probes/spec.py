"""`ProbeSpec`: what the probed step measures, read once from the `probes` section of the config."""

from __future__ import annotations

import dataclasses
import fnmatch

import jax
import ml_collections

from tdyn_jax.probes.naming import layer_free
from tdyn_jax.probes.stats import ACCELERATOR_CHUNK, CHUNK, Finite, summary

GROUPS = ("exp_hist", "lin_hist", "sample", "outliers", "energy", "lowprec")
# Statistics estimated on samples: every statistic of a matmul's /R and /lowprec parts (on a grid of
# `probes.rows` sampled rows and `probes.cols` sampled columns of C, stored with them as the
# statistics "rows" and "cols") and these outlier metrics of an activation site (on `probes.rows`
# sampled tokens). Every other statistic covers the whole tensor.
SAMPLED_PARTS = ("R", "lowprec")
SAMPLED_STATS = ("max_median_ratio", "massive_ratio", "rows", "cols")


def is_sampled(site: str, stat: str) -> bool:
    """Whether statistic `stat` of `site` is estimated on sampled rows (see SAMPLED_PARTS)."""
    return site.rsplit("/", 1)[-1] in SAMPLED_PARTS or stat in SAMPLED_STATS


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """Static, hashable settings of the probed step: the fields of `cfg.probes` that shape the
    statistics (defaults and meaning in `configs/base.py`, section probes)."""

    sites: tuple[str, ...]
    stats: frozenset[str]
    grads: bool
    params: bool
    exp_min: int
    exp_max: int
    lin_bins: int
    sample_size: int
    topk: int
    rows: int
    cols: int
    formats: tuple[str, ...]
    scalings: tuple[str, ...]
    r_bits: tuple[int, ...]
    e_frac_bits: tuple[int, ...]
    chunk: int = CHUNK  # elements per chunk of a large tensor (see `stats`; `for_platform` sets it)
    defer: bool = True  # sampled-grid statistics through the backward pass (`capture.deferred`; CPU)
    dump_sites: tuple[str, ...] = ()  # set only in the step variant that runs on probes.dump_steps
    taps_only: bool = False  # only create the grad taps (the pass that learns their shapes)

    @classmethod
    def from_config(cls, probes: ml_collections.ConfigDict) -> ProbeSpec:
        """The spec of `cfg.probes` (without dumps; see `with_dumps`)."""
        fields = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in ("chunk", "defer", "dump_sites", "taps_only")
        ]
        values = {name: probes[name] for name in fields}
        values = {k: tuple(v) if isinstance(v, tuple | list) else v for k, v in values.items()}
        return cls(**values | {"stats": frozenset(values["stats"])})

    def for_platform(self, platform: str) -> ProbeSpec:
        """The same spec for devices of `platform` (cpu, gpu, tpu): the chunk size of statistics, and
        whether the sampled-grid statistics go through the backward pass (on a CPU, where they then
        run outside the layers' forward iterations, on a core the model leaves idle; elsewhere they
        run in place, which holds no grid until the backward pass: a v5e:8x8 pod's probed step needed
        19.6 GiB per chip deferred in 0.12.0, more than its 16)."""
        cpu = platform == "cpu"
        return dataclasses.replace(self, chunk=CHUNK if cpu else ACCELERATOR_CHUNK, defer=cpu)

    def with_dumps(self, dump_sites: tuple[str, ...]) -> ProbeSpec:
        """The same spec that also returns the full tensors of the sites matching `dump_sites`."""
        return dataclasses.replace(self, dump_sites=tuple(dump_sites))

    def taps(self) -> ProbeSpec:
        """The spec of the shape pass: the same grad taps, no statistics."""
        return dataclasses.replace(self, taps_only=True)

    def wants(self, site: str) -> bool:
        """Whether `site` (with or without its layer component) matches one of the site patterns."""
        name = layer_free(site)
        return any(fnmatch.fnmatchcase(name, p) for p in self.sites)

    def dumps(self, site: str) -> bool:
        """Whether a dump pattern could match `site` in some layer (the exact layer is checked later)."""
        name = layer_free(site)
        return any(fnmatch.fnmatchcase(name, layer_free(p)) for p in self.dump_sites)

    def summary(
        self,
        x: jax.Array,
        seed: jax.Array,
        lin_range: tuple[float, float] | None = None,
        only: frozenset[str] | None = None,
        finite: Finite = None,
    ) -> dict[str, jax.Array]:
        """`stats.summary` with this spec's groups (those in `only`, if given), bins and sample size."""
        return summary(
            x,
            seed,
            groups=self.stats if only is None else self.stats & only,
            exp_range=(self.exp_min, self.exp_max),
            lin_bins=self.lin_bins,
            sample_size=self.sample_size,
            lin_range=lin_range,
            chunk=self.chunk,
            finite=finite,
        )
