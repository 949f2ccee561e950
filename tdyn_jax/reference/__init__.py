"""Reference data vendored with the project: weight statistics of Pythia models over their training
(see PROVENANCE.md beside this file for the source, the licence and the assumptions)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

PYTHIA_FILE = Path(__file__).with_name("pythia_weight_statistics.npz")
# original name -> (name since 2023, d_model, layers)
PYTHIA_SIZES = {
    "19m": ("pythia-70m", 512, 6),
    "125m": ("pythia-160m", 768, 12),
    "350m": ("pythia-410m", 1024, 24),
    "800m": ("pythia-1b", 2048, 16),
    "1.3b": ("pythia-1.4b", 2048, 24),
}
PYTHIA_MODULES = {"attn_qkv": (1, 3), "attn_dense": (1, 1), "mlp_h24h": (1, 4), "mlp_4h2h": (4, 1)}  # d x d
PYTHIA_STATS = ("mean", "std", "max")
PYTHIA_STEPS = 143000  # Pythia's training steps; row i of each array is taken as step 1000 (i + 1)


def pythia_elements(size: str, module: str) -> int:
    """The element count of one `module` matrix of Pythia `size` (the n of its Gaussian reference)."""
    d = PYTHIA_SIZES[size][1]
    rows, cols = PYTHIA_MODULES[module]
    return rows * d * cols * d


@cache
def _arrays() -> dict[str, np.ndarray]:
    with np.load(PYTHIA_FILE) as data:
        return {key: data[key] for key in data.files}


def _pick(value: str | None, choices: tuple[str, ...] | dict, what: str) -> list[str]:
    if value is None:
        return list(choices)
    if value not in choices:
        raise ValueError(f"unknown Pythia {what} {value!r}: use one of {', '.join(choices)}")
    return [value]


def pythia(size: str | None = None, module: str | None = None, stat: str | None = None) -> pd.DataFrame:
    """Pythia's weight statistics as a tidy table: columns size, module, layer, step, progress (step /
    143000), stat, value; one row per checkpoint x layer x statistic. None selects every size, module
    (attn_qkv, attn_dense, mlp_h24h, mlp_4h2h) or statistic (mean, std, max)."""
    arrays, frames = _arrays(), []
    for s in _pick(size, PYTHIA_SIZES, "size"):
        for m in _pick(module, PYTHIA_MODULES, "module"):
            for st in _pick(stat, PYTHIA_STATS, "statistic"):
                values = arrays[f"{s}/{m}/{st}"]
                steps = 1000 * (np.arange(values.shape[0]) + 1)
                frame = pd.DataFrame(values, index=pd.Index(steps, name="step"))
                tidy = frame.rename_axis(columns="layer").stack().rename("value").reset_index()
                tidy.insert(0, "size", s)
                tidy.insert(1, "module", m)
                tidy.insert(4, "progress", tidy.step / PYTHIA_STEPS)
                tidy.insert(5, "stat", st)
                frames.append(tidy[["size", "module", "layer", "step", "progress", "stat", "value"]])
    return pd.concat(frames, ignore_index=True)
