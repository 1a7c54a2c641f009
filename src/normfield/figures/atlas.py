"""Placement atlas: one small multiple per placement (ffn.w1 per layer, theory vs probe), and
a heat map of the theory's relative error against every probe run of this figure."""

from __future__ import annotations

import math

import numpy as np

from normfield import plot
from normfield.figures.common import Context, Result, fairseq_base, new_figure
from normfield.placements import PLACEMENTS

FULL = fairseq_base(512, 8, 2048)
ERR_PARAMS = ("ffn.w1", "ffn.w2", "attn.o")


def make(ctx: Context) -> list[Result]:
    fields = ctx.fields(FULL)
    depth = 6 if ctx.quick else 24
    profs = {}
    for placement in PLACEMENTS:
        arch = ctx.arch(depth, placement, fields)
        profs[placement] = (ctx.theory(arch), ctx.probe(arch))
    ncols = 4
    nrows = math.ceil(len(profs) / ncols)
    fig, axes = new_figure(nrows, ncols, size=(14.0, 3.2 * nrows + 0.4))
    flat = [ax for row in axes for ax in row]
    errs = {}
    rows = []
    for ax, (placement, (th, pr)) in zip(flat, profs.items()):
        plot.overlay(th, pr, params=("ffn.w1",), ax=ax)
        ax.get_legend().remove()
        ax.set_title(plot.LABELS[placement], color=plot.placement_color(placement))
        ax.set_xticks(range(1, th.arch.depth + 1, max(1, th.arch.depth // 6)))
        for n in ERR_PARAMS:
            if n in th.grads and n in pr.grads:
                rel = (th[n] - pr[n]) / pr[n]
                rows.append({"placement": placement, "param": n, "depth": th.arch.depth,
                             "rel_err": float(np.max(np.abs(rel)))})
        errs[placement] = float(np.max(np.abs((th["ffn.w1"] - pr["ffn.w1"]) / pr["ffn.w1"])))
    for ax in flat[len(profs):]:
        ax.set_visible(False)
    handles = [plot_handle(ax_kind) for ax_kind in ("theory", "probe")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small")
    a = profs["pre"][0].arch
    fig.suptitle(f"ffn.w1 gradient norm per layer, {a.depth} layers, d={a.d_model} "
                 f"(lines: theory, markers: probe, {ctx.seeds} seeds)")
    worst = max(errs, key=errs.get)
    caption = (f"Atlas, ffn.w1 per layer, {a.depth} layers, d={a.d_model}: max |theory-probe|/"
               f"probe over layers per placement: "
               + ", ".join(f"{plot.LABELS[k]} {100 * v:.0f}%" for k, v in errs.items())
               + f" (worst {plot.LABELS[worst]}).")

    fig2, axes2 = new_figure(1, 1, size=(6.0, 0.32 * len(rows) + 1.5))
    plot.error_heatmap(rows, ax=axes2[0][0])
    axes2[0][0].set_title("max over layers of |theory - probe| / probe")
    med = float(np.median([100 * abs(r["rel_err"]) for r in rows]))
    top = max(rows, key=lambda r: abs(r["rel_err"]))
    caption2 = (f"Theory vs probe ({ctx.seeds} seeds; includes seed noise), {a.depth} layers: "
                f"median max-over-layers error {med:.0f}%, largest "
                f"{100 * abs(top['rel_err']):.0f}% ({plot.LABELS[top['placement']]} "
                f"{top['param']}).")
    return [Result("atlas", fig, caption), Result("atlas_error", fig2, caption2)]


def plot_handle(kind: str):
    from matplotlib.lines import Line2D

    if kind == "theory":
        return Line2D([], [], color="k", lw=1.6, label="theory (mean field)")
    return Line2D([], [], color="k", marker="o", mfc="white", linestyle="none",
                  label="probe (± stderr)")
