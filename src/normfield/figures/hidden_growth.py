"""Hidden-state growth: E||x_l||^2/d vs layer for Pre-LN, Peri-LN (Kim et al. 2025) and
LayerNorm Scaling (Sun et al. 2025) at 24 layers (12 in quick mode)."""

from __future__ import annotations

from normfield import plot
from normfield.figures.common import Context, Result, fairseq_base, new_figure

FULL = fairseq_base(512, 8, 2048)
PLACEMENTS = ("pre", "peri", "lns")


def make(ctx: Context) -> list[Result]:
    fields = ctx.fields(FULL)
    depth = 12 if ctx.quick else 24
    profs = {}
    probe_depth = 6 if ctx.quick else depth
    for placement in PLACEMENTS:
        # E||x_l||^2 at block l does not depend on the total depth for these placements, so
        # the quick probe runs the (shared) 6-layer stacks and marks the first 6 layers.
        profs[placement] = (ctx.theory(ctx.arch(depth, placement, fields)),
                            ctx.probe(ctx.arch(probe_depth, placement, fields)))
    fig, axes = new_figure(1, 1, size=(6.4, 4.4))
    ax = axes[0][0]
    plot.activations(*[p for pair in profs.values() for p in pair], key="sq_norm", ax=ax)
    ax.set_yscale("log")
    ax.set_title("hidden-state growth")
    a = profs["pre"][0].arch
    b = profs["pre"][1].arch
    parts = [f"{plot.LABELS[k]} {th.activations['sq_norm'][0]:.2f} -> "
             f"{th.activations['sq_norm'][-1]:.2f}" for k, (th, pr) in profs.items()]
    parts2 = [f"{plot.LABELS[k]} {pr.activations['sq_norm'][-1]:.2f} (theory "
              f"{th.activations['sq_norm'][b.depth]:.2f})" for k, (th, pr) in profs.items()]
    caption = (f"E||x_l||^2/d from embedding to layer {a.depth}, d={a.d_model}, theory: "
               + "; ".join(parts) + f". Probe ({ctx.seeds} seeds) at layer {b.depth}: "
               + "; ".join(parts2) + ".")
    return [Result("hidden_growth", fig, caption)]
