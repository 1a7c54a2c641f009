"""normfield.plot: right number of lines / markers, labelled axes, and never a file written."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from normfield import Arch, GradProfile
from normfield import plot
from normfield.placements import PLACEMENTS


def _profile(placement, source, depth=4):
    arch = Arch(depth=depth, placement=placement, d_model=16, n_heads=2, d_ff=32, seq_len=4)
    rng = np.random.default_rng(0)
    grads = {"ffn.w1": rng.uniform(0.5, 1, depth), "ffn.w2": rng.uniform(0.5, 1, depth)}
    acts = {"sq_norm": 1 + np.arange(depth + 1.0), "cos_within": np.zeros(depth + 1),
            "cos_across": np.zeros(depth + 1)}
    kw = {}
    if source == "probe":
        kw = dict(stderr={k: 0.05 * v for k, v in grads.items()},
                  activations_stderr={k: 0.1 + 0 * v for k, v in acts.items()})
    return GradProfile(arch=arch, source=source, grads=grads, activations=acts, **kw)


@pytest.fixture(autouse=True)
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    plt.close("all")
    assert os.listdir(tmp_path) == [], "plot functions must not write files"


def test_every_placement_has_its_own_colour():
    assert set(plot.COLORS) >= set(PLACEMENTS)
    assert len({plot.COLORS[p] for p in PLACEMENTS}) == len(PLACEMENTS)


def test_overlay_lines_and_markers():
    th, pr = _profile("post", "theory"), _profile("pre", "probe")
    ax = plot.overlay(th, pr, params=("ffn.w1", "ffn.w2"))
    assert ax.figure is not None
    theory_lines = [l for l in ax.lines if l.get_linestyle() != "None"]
    assert len(theory_lines) == 2                      # theory: one line per param
    assert len(ax.containers) == 2                     # probe: one errorbar per param
    np.testing.assert_allclose(theory_lines[0].get_xdata(), [1, 2, 3, 4])
    assert theory_lines[0].get_color() == plot.COLORS["post"]
    assert ax.get_xlabel() == "layer" and "gradient norm" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("Post-LN L=4 d=16" in s for s in labels) and any("(probe)" in s for s in labels)


def test_overlay_logy_and_existing_axes():
    fig, ax = plt.subplots()
    out = plot.overlay(_profile("peri", "theory"), ax=ax, logy=True)
    assert out is ax and ax.get_yscale() == "log" and len(ax.lines) == 1


def test_depth_scaling_reference_and_measured():
    depths = [6, 12, 24]
    ax = plot.depth_scaling(depths, [1.0, 0.7, 0.5], measured=[1.02, np.nan, 0.49],
                            measured_err=[0.01, np.nan, 0.02])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.containers) == 1
    assert len(ax.containers[0].lines[0].get_xdata()) == 2   # NaN dropped
    ref = [l for l in ax.lines if l.get_linestyle() == "--"]
    assert len(ref) == 1
    np.testing.assert_allclose(ref[0].get_ydata(), np.sqrt(6 / np.array(depths)))


def test_activations():
    ax = plot.activations(_profile("pre", "theory"), _profile("pre", "probe"), key="sq_norm")
    assert len(ax.containers) == 1
    line = [l for l in ax.lines if l.get_linestyle() != "None"][0]
    np.testing.assert_allclose(line.get_xdata(), np.arange(5))
    with pytest.raises(KeyError):
        plot.activations(_profile("pre", "theory"), key="nope")


def test_error_heatmap():
    rows = [{"placement": p, "param": "ffn.w1", "depth": d, "rel_err": -0.1 * (i + 1)}
            for i, p in enumerate(("pre", "post")) for d in (6, 12)]
    rows.append({"placement": "peri", "param": "ffn.w2", "depth": 6, "rel_err": 0.05})
    ax = plot.error_heatmap(rows)
    data = ax.images[0].get_array()
    assert data.shape == (3, 2)
    assert np.ma.is_masked(data[2, 1])               # peri at depth 12 is missing
    texts = [t.get_text() for t in ax.texts]
    assert "20.0%" in texts and "10.0%" in texts and "5.0%" in texts and "n/a" in texts
    with pytest.raises(ValueError):
        plot.error_heatmap([])
