"""The vendored Pythia weight statistics and the rules that measure claim (a)'s tails on them."""

import numpy as np
import pandas as pd
import pytest

from tdyn_jax.analysis import pythia as lib
from tdyn_jax.analysis.claims import gaussian_max
from tdyn_jax.analysis.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from tdyn_jax.reference import PYTHIA_SIZES, pythia, pythia_elements


def test_pythia_table_holds_the_published_numbers():
    """The source's own example: 19m mlp_h24h layer 2, std 0.028 -> 0.032 and max 0.14 -> 1.87."""
    t = pythia("19m", "mlp_h24h")
    assert list(t.columns) == ["size", "module", "layer", "step", "progress", "stat", "value"]
    assert len(t) == 142 * 6 * 3 and sorted(t.layer.unique()) == list(range(6))
    layer = t[t.layer == 2].sort_values("step")
    std, top = layer[layer.stat == "std"].value.to_numpy(), layer[layer.stat == "max"].value.to_numpy()
    assert std[0] == pytest.approx(0.0278, abs=1e-4) and std[-1] == pytest.approx(0.0322, abs=1e-4)
    assert top[0] == pytest.approx(0.1429, abs=1e-4) and top[-1] == pytest.approx(1.873, abs=1e-3)
    assert layer.step.iloc[0] == 1000 and layer.step.iloc[-1] == 142000
    assert layer.progress.iloc[-1] == pytest.approx(142 / 143)
    every = pythia()
    assert set(every["size"]) == set(PYTHIA_SIZES) and len(every) == 142 * 3 * 4 * (6 + 12 + 24 + 16 + 24)
    assert (every[every.stat == "std"].value > 0).all()


def test_pythia_matrix_sizes_and_bad_names():
    assert pythia_elements("19m", "attn_qkv") == 512 * 1536
    assert pythia_elements("1.3b", "mlp_4h2h") == 8192 * 2048
    with pytest.raises(ValueError, match="unknown Pythia size '7b'"):
        pythia("7b")
    with pytest.raises(ValueError, match="unknown Pythia module 'mlp'"):
        pythia("19m", "mlp")


def tails_of(paths, n=4096):
    """A tail table: one matrix per list of (progress, ratio) points."""
    rows = [
        {"matrix": f"m{i}", "n": n, "step": round(p * 1000), "progress": p, "tail_ratio": r}
        for i, path in enumerate(paths)
        for p, r in path
    ]
    return pd.DataFrame(rows)


def test_tail_measures_by_hand():
    dense = np.linspace(0, 1, 101)
    jump = [(p, 4.0 if p < 0.1 else 10.0 if p < 0.5 else 12.0) for p in dense]  # +6 at 10%, +2 at 50%
    slow = [(p, 4.0 + 8.0 * p) for p in dense]  # a steady rise to 12
    m = lib.tail_measures(tails_of([jump, slow])).set_index("matrix")
    reference = gaussian_max(4096)
    assert m.loc["m0", "reference"] == reference < 12.0 and m.loc["m0", "above"]
    assert m.loc["m0", "largest_change_at"] == pytest.approx(0.10)
    assert m.loc["m0", "early_share"] == pytest.approx(6 / 8)  # 10 at 25%: 6 of the 8 up
    assert m.loc["m0", "sharp_share"] == pytest.approx(6 / 8)  # the jump lies within one 5% window
    assert m.loc["m1", "early_share"] == pytest.approx(0.25)
    assert m.loc["m1", "sharp_share"] == pytest.approx(0.05, abs=1e-9)  # 5% of a steady rise
    flat = lib.tail_measures(tails_of([[(0.0, 5.0), (1.0, 5.0)]]))
    assert np.isnan(flat.early_share[0]) and np.isnan(flat.largest_change_at[0])


def test_tails_claim_rules():
    dense = np.linspace(0, 1, 101)
    early_jump = [(p, 4.0 if p < 0.1 else 12.0) for p in dense]
    late_rise = [(p, 4.0 if p < 0.8 else 12.0 * p) for p in dense]
    low = [(p, 3.0) for p in dense]
    claim = lambda paths: lib.tails_claim("x", lib.tail_measures(tails_of(paths)), "test")
    assert claim([early_jump] * 3).verdict == SUPPORTED
    assert claim([low] * 3).verdict == NOT_SUPPORTED  # tails never beyond a Gaussian's
    late = claim([late_rise] * 3)
    assert late.verdict == INCONCLUSIVE and late.checks[1].holds is False


def test_pythia_tails_are_max_over_std_with_matrix_sizes():
    tails = lib.pythia_tails("19m")
    raw = pythia("19m", "attn_dense")
    layer3 = raw[raw.layer == 3].pivot_table(index="step", columns="stat", values="value")
    mine = tails[tails.matrix == "attn_dense/layer_03"].set_index("step").tail_ratio
    np.testing.assert_allclose(mine.to_numpy(), (layer3["max"] / layer3["std"]).to_numpy(), rtol=1e-12)
    assert set(tails.n) == {512 * 1536, 512 * 512, 512 * 2048}
    assert tails.matrix.nunique() == 24
