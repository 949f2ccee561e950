"""Offline analysis of a run directory (never imports the training code)."""

from tdyn_jax.analysis.load import Captures, ProbeArray, load

__all__ = ["Captures", "ProbeArray", "load"]
