"""Offline analysis of a run directory (never imports the training code)."""

from tdyn_jax.analysis.load import Captures, CapturesError, ProbeArray, load

__all__ = ["Captures", "CapturesError", "ProbeArray", "load"]
