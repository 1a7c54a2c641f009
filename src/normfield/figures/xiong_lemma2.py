"""Xiong et al. 2020, Lemma 2: the residual stream of Pre-LN grows linearly with depth,
``(1 + l/2) d <= E||x_l||^2 <= (1 + 3l/2) d`` (their assumptions: ReLU FFN, attention ignored,
E||x_0||^2 = d), while Post-LN keeps ``E||x_l||^2 = d`` after every LayerNorm."""

from __future__ import annotations

import numpy as np

from normfield import plot
from normfield.figures.common import Context, Result, new_figure
from normfield.figures.xiong_fig3 import FULL


def make(ctx: Context) -> list[Result]:
    fields = ctx.fields(FULL)
    profs = []
    for placement in ("post", "pre"):
        arch = ctx.arch(6, placement, fields)
        profs.append((ctx.theory(arch), ctx.probe(arch)))
    depth = profs[0][0].arch.depth
    fig, axes = new_figure(1, 1, size=(6.4, 4.4))
    ax = axes[0][0]
    l = np.linspace(0, depth, 100)
    ax.fill_between(l, 1 + l / 2, 1 + 3 * l / 2, color="0.85",
                    label="Xiong et al. Lemma 2 Pre-LN bounds\n"
                          r"$(1+l/2) \leq E\|x_l\|^2/d \leq (1+3l/2)$ (their assumptions)")
    plot.activations(*[p for pair in profs for p in pair], key="sq_norm", ax=ax)
    ax.set_xticks(range(depth + 1))
    ax.set_title("Lemma 2: residual-stream norm per layer")
    ax.legend(fontsize="x-small", loc="upper left")

    pre_th, pre_pr = profs[1]
    post_th, post_pr = profs[0]
    s_th, s_pr = pre_th.activations["sq_norm"], pre_pr.activations["sq_norm"]
    ll = np.arange(depth + 1)
    inside = int(np.sum((s_th >= 1 + ll / 2 - 1e-9) & (s_th <= 1 + 3 * ll / 2 + 1e-9)))
    slope = np.polyfit(ll[1:], s_th[1:], 1)[0]
    caption = (f"E||x_l||^2/d per layer, {depth} layers, d={pre_th.arch.d_model}. Pre-LN grows "
               f"from {s_pr[0]:.2f} to {s_pr[-1]:.2f} (probe; theory {s_th[0]:.2f} to "
               f"{s_th[-1]:.2f}, slope {slope:.2f} per layer; Lemma 2 band slope 0.5-1.5); "
               f"theory inside the band at {inside}/{depth + 1} points (the band assumes "
               f"E||x_0||^2/d = 1 and ignores attention; our embedding has "
               f"{s_th[0]:.2f} from tokens plus sinusoidal positions). Post-LN stays at "
               f"{post_pr.activations['sq_norm'][1:].mean():.3f} after layer 1 (probe; theory "
               f"{post_th.activations['sq_norm'][1:].mean():.3f}).")
    return [Result("xiong_lemma2", fig, caption)]
