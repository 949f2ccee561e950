"""`ProbeSpec`: what the probed step measures, read once from the `probes` section of the config."""

from __future__ import annotations

import dataclasses
import fnmatch
import re

import jax
import ml_collections

from tdyn_jax.probes.lowprec import FORMATS, SCALINGS
from tdyn_jax.probes.stats import summary

GROUPS = ("exp_hist", "lin_hist", "sample", "outliers", "energy", "lowprec")
_LAYER = re.compile(r"^(layers|layer_\d+)$")


def layer_free(path: tuple[str, ...] | str) -> str:
    """A site name without its layer component: ('layer_03', 'attn', 'q') -> 'attn/q'."""
    parts = path.split("/") if isinstance(path, str) else path
    return "/".join(p for p in parts if not _LAYER.match(p))


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """Static, hashable settings of the probed step (see `configs/base.py`, section probes)."""

    sites: tuple[str, ...] = ("*",)
    groups: frozenset[str] = frozenset(GROUPS)
    grads: bool = True
    params: bool = True
    exp_min: int = -48
    exp_max: int = 16
    lin_bins: int = 64
    sample_size: int = 4096
    topk: int = 4
    quant_rows: int = 256
    formats: tuple[str, ...] = tuple(FORMATS)
    scalings: tuple[str, ...] = SCALINGS
    r_bits: tuple[int, ...] = (4, 8)
    e_frac_bits: tuple[int, ...] = (0, 3)
    dump_sites: tuple[str, ...] = ()  # set only in the step variant that runs on probes.dump_steps
    taps_only: bool = False  # only create the grad taps (the pass that learns their shapes)

    @classmethod
    def from_config(cls, probes: ml_collections.ConfigDict) -> ProbeSpec:
        """The spec of `cfg.probes` (without dumps; see `with_dumps`)."""
        return cls(
            sites=tuple(probes.sites),
            groups=frozenset(probes.stats),
            grads=probes.grads,
            params=probes.params,
            exp_min=probes.exp_min,
            exp_max=probes.exp_max,
            lin_bins=probes.lin_bins,
            sample_size=probes.sample_size,
            topk=probes.topk,
            quant_rows=probes.quant_rows,
            formats=tuple(probes.formats),
            scalings=tuple(probes.scalings),
            r_bits=tuple(probes.r_bits),
            e_frac_bits=tuple(probes.e_frac_bits),
        )

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
        key: jax.Array,
        lin_range: tuple[float, float] | None = None,
        only: frozenset[str] | None = None,
    ) -> dict[str, jax.Array]:
        """`stats.summary` with this spec's groups (those in `only`, if given), bins and sample size."""
        return summary(
            x,
            key,
            groups=self.groups if only is None else self.groups & only,
            exp_range=(self.exp_min, self.exp_max),
            lin_bins=self.lin_bins,
            sample_size=self.sample_size,
            lin_range=lin_range,
        )
