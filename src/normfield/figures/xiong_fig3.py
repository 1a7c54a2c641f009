"""Xiong et al. 2020 (arXiv 2002.04745), Figure 3: per-layer gradient norms of the FFN weights
(W1 = ffn.w1, W2 = ffn.w2) at initialization for Post-LN vs Pre-LN, 6 layers, fairseq IWSLT
shape (d 512, 4 heads, d_ff 1024, embeddings N(0, d^-1/2) * sqrt(d), sinusoidal positions), plus
the depth panel of their Theorem 1: the last layer's W2 norm vs depth.

Only the encoder is modelled (bidirectional attention; there is no decoder here), so the numbers
are the encoder analogue of their decoder/encoder panels.
"""

from __future__ import annotations

import numpy as np

from normfield import plot
from normfield.figures.common import Context, Result, fairseq_base, new_figure, ratio

TITLE = "Xiong et al. 2020 Fig. 3: FFN gradient norms, Post-LN vs Pre-LN"
FULL = fairseq_base(512, 4, 1024)


def make(ctx: Context) -> list[Result]:
    fields = ctx.fields(FULL)
    depth = ctx.depth(6)
    profiles = {}
    for placement in ("post", "pre"):
        arch = ctx.arch(6, placement, fields)
        profiles[placement] = (ctx.theory(arch), ctx.probe(arch))

    depths = sorted({ctx.depth(d) for d in range(6, 15, 2)})
    probe_depths = {depths[0]} if ctx.quick else set(depths[::2])
    scaling = {}
    for placement in ("pre", "post"):
        th, me, se = [], [], []
        for d in depths:
            arch = ctx.arch(d, placement, fields)
            th.append(ctx.theory(arch)["ffn.w2"][-1])
            want = d in probe_depths
            if want:
                p = ctx.probe(arch)
                me.append(p["ffn.w2"][-1])
                se.append(p.stderr["ffn.w2"][-1])
            else:
                me.append(np.nan)
                se.append(np.nan)
        scaling[placement] = (np.array(th), np.array(me), np.array(se))

    fig, axes = new_figure(1, 3, size=(15.0, 4.4))
    for ax, placement in zip(axes[0][:2], ("post", "pre")):
        th, pr = profiles[placement]
        plot.overlay(th, pr, params=("ffn.w1", "ffn.w2"), ax=ax)
        ax.set_title(f"{plot.LABELS[placement]} (encoder, d={th.arch.d_model})")
    lo = min(min(th[n].min(), pr[n].min()) for th, pr in profiles.values() for n in ("ffn.w1", "ffn.w2"))
    hi = max(max(th[n].max(), pr[n].max()) for th, pr in profiles.values() for n in ("ffn.w1", "ffn.w2"))
    for ax in axes[0][:2]:
        ax.set_ylim(0.9 * lo, 1.1 * hi)
        ax.set_xticks(range(1, depth + 1))
    ax = axes[0][2]
    for placement in ("pre", "post"):
        th, me, se = scaling[placement]
        plot.depth_scaling(depths, th, measured=me, measured_err=se, ax=ax,
                           label=f"{plot.LABELS[placement]} last-layer W2",
                           color=plot.placement_color(placement), reference=placement == "pre")
    ax.set_title("last layer ffn.w2 vs depth")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    vals = np.concatenate([v[np.isfinite(v)] for t in scaling.values() for v in t[:2]])
    ticks = np.unique(np.round(np.geomspace(vals.min(), vals.max(), 5), 2))
    ax.set_yticks(ticks, [f"{t:.2f}" for t in ticks])
    fig.suptitle(TITLE + " (encoder only, bidirectional attention)")

    parts = []
    for placement in ("post", "pre"):
        th, pr = profiles[placement]
        for n in ("ffn.w1", "ffn.w2"):
            parts.append(f"{plot.LABELS[placement]} {n}: layer {depth}/layer 1 = "
                         f"{ratio(pr[n][-1], pr[n][0]):.2f}x probe "
                         f"(theory {ratio(th[n][-1], th[n][0]):.2f}x)")
    pre_th = scaling["pre"][0]
    post_th = scaling["post"][0]
    slope = np.polyfit(np.log(depths), np.log(pre_th), 1)[0] if len(depths) > 1 else float("nan")
    parts.append(f"last-layer W2 from L={depths[0]} to L={depths[-1]}: Pre-LN theory "
                 f"{pre_th[0]:.3g} -> {pre_th[-1]:.3g} (log-log slope {slope:.2f}; 1/sqrt(L) is "
                 f"-0.50), Post-LN theory {post_th[0]:.3g} -> {post_th[-1]:.3g}")
    arch = profiles["post"][0].arch
    caption = (f"Per-layer FFN gradient norms, {depth} layers, d={arch.d_model}, heads "
               f"{arch.n_heads}, d_ff={arch.d_ff}, seq {arch.seq_len}, batch {arch.batch_size}, "
               f"{ctx.seeds} probe seeds; encoder only (bidirectional, no decoder). "
               + "; ".join(parts) + ".")
    return [Result("xiong_fig3", fig, caption)]
