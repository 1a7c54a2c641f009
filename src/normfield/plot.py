"""Plots of `GradProfile`s: theory as lines, probe measurements as markers with error bars.

Every function draws into `ax` (a new figure's axes when `ax` is None) and returns the axes;
nothing here ever writes a file (``ax.figure.savefig(...)`` is the caller's business).

* `overlay(*profiles, params=("ffn.w1",), ax=None, logy=False)`: per-layer gradient norms.
* `depth_scaling(depths, theory_values, measured=None, measured_err=None, ax=None, ...)`:
  log-log norm vs depth with a ``1/sqrt(L)`` reference line.
* `activations(*profiles, key="sq_norm", ax=None)`: residual-stream statistics per layer.
* `error_heatmap(table_rows, ax=None)`: |relative error| (percent) of theory vs probe.

Colours are fixed per placement (`COLORS`), so one placement looks the same in every figure.
"""

from __future__ import annotations

import numpy as np

from normfield.placements import PLACEMENTS

__all__ = ["COLORS", "LABELS", "overlay", "depth_scaling", "activations", "error_heatmap",
           "placement_color", "arch_label"]

COLORS = {
    "post": "#d62728",        # red
    "pre": "#1f77b4",         # blue
    "peri": "#2ca02c",        # green
    "normformer": "#9467bd",  # purple
    "deepnorm": "#8c564b",    # brown
    "mixln": "#ff7f0e",       # orange
    "lns": "#17becf",         # cyan
    "scaled_pre": "#e377c2",  # pink
    "b2t": "#bcbd22",         # olive
}
LABELS = {"post": "Post-LN", "pre": "Pre-LN", "peri": "Peri-LN", "normformer": "NormFormer",
          "deepnorm": "DeepNorm", "mixln": "Mix-LN", "lns": "LN-Scaling",
          "scaled_pre": "scaled Pre-LN", "b2t": "B2T"}
assert set(COLORS) >= set(PLACEMENTS), "every placement needs a colour"

LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
GRAD_YLABEL = r"gradient norm $\|\partial L/\partial W\|_F$"
ACT_YLABELS = {"sq_norm": r"$E\|x_l\|^2 / d$", "cos_within": "mean cosine, same sequence",
               "cos_across": "mean cosine, across sequences"}


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5.5, 4.0), layout="constrained")
    return ax


def placement_color(placement: str) -> str:
    return COLORS.get(placement, "#7f7f7f")


def arch_label(arch) -> str:
    """``"Post-LN L=6 d=512"`` (``L=6+6`` for an encoder-decoder): placement, depth and width of
    an Arch."""
    depth = f"{arch.depth}+{arch.decoder_depth}" if arch.decoder_depth else f"{arch.depth}"
    return f"{LABELS.get(arch.placement, arch.placement)} L={depth} d={arch.d_model}"


def _check_source(p) -> None:
    if p.source not in ("theory", "probe"):
        raise ValueError(f"invalid profile source={p.source!r}: expected 'theory' or 'probe'")


def overlay(*profiles, params=("ffn.w1",), ax=None, logy: bool = False):
    """Per-layer gradient norms of `params` for every profile: theory profiles as lines, probe
    profiles as markers with (stderr) error bars.  x is the 1-based layer index.  Colour =
    placement, line style / marker = parameter.  Returns the axes."""
    ax = _axes(ax)
    if isinstance(params, str):
        params = (params,)
    for p in profiles:
        _check_source(p)
        color = placement_color(p.arch.placement)
        for j, name in enumerate(params):
            y = np.asarray(p[name], dtype=float)
            x = np.arange(1, len(y) + 1)
            label = f"{arch_label(p.arch)} {name} ({p.source})"
            if p.source == "theory":
                ax.plot(x, y, color=color, linestyle=LINESTYLES[j % len(LINESTYLES)], lw=1.6,
                        label=label)
            else:
                err = p.stderr.get(name) if p.stderr else None
                ax.errorbar(x, y, yerr=err, color=color, marker=MARKERS[j % len(MARKERS)],
                            linestyle="none", ms=5, mfc="white", capsize=2, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel(GRAD_YLABEL)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return ax


def depth_scaling(depths, theory_values, measured=None, measured_err=None, ax=None,
                  label: str = "theory", color=None, reference: bool = True,
                  measured_depths=None):
    """Log-log plot of a gradient norm vs depth L: `theory_values` as a line, `measured`
    (optionally at `measured_depths`, default `depths`; NaN = not measured) as markers with
    `measured_err` error bars, and a dashed ``c/sqrt(L)`` reference through the first theory
    point.  Returns the axes."""
    ax = _axes(ax)
    depths = np.asarray(depths, dtype=float)
    theory_values = np.asarray(theory_values, dtype=float)
    line, = ax.plot(depths, theory_values, color=color, marker=".", lw=1.6,
                    label=f"{label} (theory)")
    if measured is not None:
        md = depths if measured_depths is None else np.asarray(measured_depths, dtype=float)
        m = np.asarray(measured, dtype=float)
        ok = np.isfinite(m)
        err = None if measured_err is None else np.asarray(measured_err, dtype=float)[ok]
        ax.errorbar(md[ok], m[ok], yerr=err, color=line.get_color(), marker="o", mfc="white",
                    linestyle="none", capsize=2, label=f"{label} (probe)")
    if reference:
        ref = theory_values[0] * np.sqrt(depths[0] / depths)
        ax.plot(depths, ref, color="0.5", linestyle="--", lw=1.0,
                label=r"$\propto 1/\sqrt{L}$ reference")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("depth L (number of layers)")
    ax.set_ylabel(GRAD_YLABEL)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
    return ax


def activations(*profiles, key: str = "sq_norm", ax=None):
    """Residual-stream statistic `key` (``sq_norm``, ``cos_within``, ``cos_across``; an
    encoder-decoder's ``enc.sq_norm``, ``dec.sq_norm``, ...) at the stream points (0 = embedding
    output): theory as lines, probe as markers with error bars."""
    ax = _axes(ax)
    for p in profiles:
        _check_source(p)
        if key not in p.activations:
            raise KeyError(f"no activation statistic {key!r}; have {', '.join(p.activations)}")
        y = np.asarray(p.activations[key], dtype=float)
        x = np.arange(len(y))
        color = placement_color(p.arch.placement)
        label = f"{arch_label(p.arch)} ({p.source})"
        if p.source == "theory":
            ax.plot(x, y, color=color, lw=1.6, label=label)
        else:
            err = p.activations_stderr.get(key) if p.activations_stderr else None
            ax.errorbar(x, y, yerr=err, color=color, marker="o", mfc="white", ms=5,
                        linestyle="none", capsize=2, label=label)
    ax.set_xlabel("layer l (0 = embedding output)")
    ax.set_ylabel(ACT_YLABELS.get(key, key))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return ax


def error_heatmap(table_rows, ax=None, cmap: str = "viridis"):
    """Heat map of ``100 * |rel_err|`` with one row per (placement, param) and one column per
    depth; each cell is annotated with its value (``n/a`` where missing).  `table_rows` are dicts
    with keys ``placement, param, depth, rel_err``; repeated cells keep the largest |rel_err|.
    Returns the axes."""
    ax = _axes(ax)
    rows = list(table_rows)
    if not rows:
        raise ValueError("error_heatmap needs at least one row")
    keys = []
    for r in rows:
        k = (r["placement"], r["param"])
        if k not in keys:
            keys.append(k)
    order = {p: i for i, p in enumerate(PLACEMENTS)}
    keys.sort(key=lambda k: (order.get(k[0], len(order)), k[0], k[1]))
    depths = sorted({int(r["depth"]) for r in rows})
    grid = np.full((len(keys), len(depths)), np.nan)
    for r in rows:
        i, j = keys.index((r["placement"], r["param"])), depths.index(int(r["depth"]))
        v = 100.0 * abs(float(r["rel_err"]))
        grid[i, j] = v if np.isnan(grid[i, j]) else max(grid[i, j], v)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", vmin=0)
    finite = grid[np.isfinite(grid)]
    top = finite.max() if finite.size else 1.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            text = "n/a" if np.isnan(v) else f"{v:.1f}%"
            dark = np.isnan(v) or v < 0.6 * top
            ax.text(j, i, text, ha="center", va="center", fontsize="x-small",
                    color="white" if dark else "black")
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_yticks(range(len(keys)), [f"{LABELS.get(p, p)} {n}" for p, n in keys])
    ax.set_xlabel("depth L")
    ax.set_ylabel("placement / parameter")
    ax.figure.colorbar(im, ax=ax, label="|theory - probe| / probe  (%)")
    return ax
