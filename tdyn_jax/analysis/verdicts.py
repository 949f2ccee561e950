"""Claims, the checks that measure them, and the one rule that turns checks into a verdict.

A check compares one measured number with a threshold fixed in advance; a claim's verdict follows
from its checks alone, so no verdict is ever written by hand.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
RULE = (
    "A claim is *supported* when every check holds, *not supported* when its first (core) check fails,"
    " and *inconclusive* otherwise: the core holds but another check fails, or a check could not be"
    " measured (no such sites, too few captures, or a diverged run)."
)


@dataclasses.dataclass(frozen=True)
class Check:
    """One condition: `value` compared with `threshold` by `sense` ('>=' or '<='); a nan value (not
    measurable) decides nothing. `measure` names the number, `detail` gives the figures behind it."""

    measure: str
    value: float
    sense: str
    threshold: float
    detail: str = ""

    def __post_init__(self) -> None:
        if self.sense not in (">=", "<="):
            raise ValueError(f"sense {self.sense!r} must be '>=' or '<='")

    @property
    def holds(self) -> bool | None:
        """True or False, or None when the value is not a finite number."""
        if not np.isfinite(self.value):
            return None
        return bool(self.value >= self.threshold if self.sense == ">=" else self.value <= self.threshold)

    @property
    def criterion(self) -> str:
        """'<measure> >= <threshold>'."""
        return f"{self.measure} {'≥' if self.sense == '>=' else '≤'} {self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class Claim:
    """A statement and its checks, the first being its core."""

    key: str
    statement: str
    checks: tuple[Check, ...]

    @property
    def verdict(self) -> str:
        """The verdict of `RULE`."""
        return verdict(self.checks)


def verdict(checks: tuple[Check, ...] | list[Check]) -> str:
    """supported if every check holds; not supported if the first fails; inconclusive otherwise."""
    holds = [c.holds for c in checks]
    if not holds:
        return INCONCLUSIVE
    if all(h is True for h in holds):
        return SUPPORTED
    if holds[0] is False:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def share(flags: np.ndarray | list[bool]) -> float:
    """The fraction of true entries (nan for none)."""
    flags = np.asarray(flags, bool)
    return float(flags.mean()) if flags.size else float("nan")


def _cell(text: str) -> str:
    """Table cell text with its pipes escaped."""
    return text.replace("|", "\\|")


def markdown(claims: list[Claim]) -> str:
    """Two markdown tables: one row per claim (its core check's figure and criterion, how many checks
    hold, the verdict), then one row per check."""
    lines = [
        "| claim | measured (core check) | criterion | checks that hold | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        core = c.checks[0]
        held = sum(check.holds is True for check in c.checks)
        cells = [f"({c.key}) {c.statement}", f"{core.value:.3g}: {core.detail}", core.criterion]
        cells += [f"{held} of {len(c.checks)}", f"**{c.verdict}**"]
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    lines += ["", "| claim | check | measured | criterion | holds |", "|---|---|---|---|---|"]
    for c in claims:
        for check in c.checks:
            holds = {True: "yes", False: "no", None: "not measurable"}[check.holds]
            sense = "≥" if check.sense == ">=" else "≤"
            cells = [f"({c.key})", check.measure, f"{check.value:.3g} ({check.detail})"]
            cells += [f"{sense} {check.threshold:g}", holds]
            lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"
