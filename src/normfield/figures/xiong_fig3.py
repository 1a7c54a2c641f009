"""Xiong et al. 2020 (arXiv 2002.04745), Figure 3: per-layer gradient norms of the FFN weights
(W1 = ffn.w1, W2 = ffn.w2) at initialization for Post-LN vs Pre-LN in the 6-6 encoder-decoder of
fairseq's IWSLT14 model (d 512, 4 heads, d_ff 1024, embeddings N(0, d^-1/2) * sqrt(d),
sinusoidal positions), encoder and decoder, plus the panel of their Theorem 1: the last layer's
W2 norm for 6-6 ... 14-14 models.  Synthetic data: iid uniform source, decoder-input and target
tokens of `seq_len` positions (the paper uses real IWSLT14 sentences).
"""

from __future__ import annotations

import numpy as np

from normfield import plot
from normfield.figures.common import Context, Result, fairseq_base, new_figure, ratio

TITLE = "Xiong et al. 2020 Fig. 3: FFN gradient norms, Post-LN vs Pre-LN, 6-6 encoder-decoder"
FULL = fairseq_base(512, 4, 1024)
STACKS = (("enc.", "encoder"), ("dec.", "decoder"))


def encoder_decoder(ctx: Context, depth: int, placement: str, fields: dict):
    return ctx.arch(depth, placement, {**fields, "decoder_depth": ctx.depth(depth)})


def make(ctx: Context) -> list[Result]:
    fields = ctx.fields(FULL)
    depth = ctx.depth(6)
    profiles = {}
    for placement in ("post", "pre"):
        arch = encoder_decoder(ctx, 6, placement, fields)
        profiles[placement] = (ctx.theory(arch), ctx.probe(arch))

    depths = sorted({ctx.depth(d) for d in range(6, 15, 2)})
    probe_depths = {depths[0]} if ctx.quick else set(depths[::2])
    scaling = {}  # (placement, stack prefix) -> (theory, measured, stderr) over depths
    for placement in ("pre", "post"):
        rows = {pre: ([], [], []) for pre, _ in STACKS}
        for d in depths:
            arch = encoder_decoder(ctx, d, placement, fields)
            th = ctx.theory(arch)
            pr = ctx.probe(arch) if d in probe_depths else None
            for pre, _ in STACKS:
                name = pre + "ffn.w2"
                rows[pre][0].append(th[name][-1])
                rows[pre][1].append(pr[name][-1] if pr else np.nan)
                rows[pre][2].append(pr.stderr[name][-1] if pr else np.nan)
        for pre, _ in STACKS:
            scaling[placement, pre] = tuple(np.array(v) for v in rows[pre])

    fig, axes = new_figure(2, 3, size=(15.0, 8.4))
    for row, (pre, stack) in enumerate(STACKS):
        params = (pre + "ffn.w1", pre + "ffn.w2")
        for ax, placement in zip(axes[row][:2], ("post", "pre")):
            th, pr = profiles[placement]
            plot.overlay(th, pr, params=params, ax=ax)
            ax.set_title(f"{plot.LABELS[placement]} {stack}, d={th.arch.d_model}")
            ax.set_xticks(range(1, depth + 1))
        lo = min(min(th[n].min(), pr[n].min()) for th, pr in profiles.values() for n in params)
        hi = max(max(th[n].max(), pr[n].max()) for th, pr in profiles.values() for n in params)
        for ax in axes[row][:2]:
            ax.set_ylim(0.9 * lo, 1.1 * hi)
        ax = axes[row][2]
        for placement in ("pre", "post"):
            th, me, se = scaling[placement, pre]
            plot.depth_scaling(depths, th, measured=me, measured_err=se, ax=ax,
                               label=f"{plot.LABELS[placement]} last {stack} W2",
                               color=plot.placement_color(placement),
                               reference=placement == "pre")
        ax.set_title(f"last {stack} layer ffn.w2 vs depth (L-L models)")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        vals = np.concatenate([v[np.isfinite(v)] for (_, p), t in scaling.items() if p == pre
                               for v in t[:2]])
        ticks = np.unique(np.round(np.geomspace(vals.min(), vals.max(), 5), 2))
        ax.set_yticks(ticks, [f"{t:.2f}" for t in ticks])
    fig.suptitle(TITLE)
    return [Result("xiong_fig3", fig, caption(ctx, depth, depths, profiles, scaling))]


def caption(ctx, depth, depths, profiles, scaling) -> str:
    parts = []
    for pre, stack in STACKS:
        for placement in ("post", "pre"):
            th, pr = profiles[placement]
            for n in ("ffn.w1", "ffn.w2"):
                name = pre + n
                parts.append(f"{plot.LABELS[placement]} {stack} {n}: layer {depth}/layer 1 = "
                             f"{ratio(pr[name][-1], pr[name][0]):.2f}x probe (theory "
                             f"{ratio(th[name][-1], th[name][0]):.2f}x)")
    for pre, stack in STACKS:
        pre_th, post_th = scaling["pre", pre][0], scaling["post", pre][0]
        slope = (np.polyfit(np.log(depths), np.log(pre_th), 1)[0] if len(depths) > 1
                 else float("nan"))
        parts.append(f"last {stack} W2 from {depths[0]}-{depths[0]} to {depths[-1]}-"
                     f"{depths[-1]}: Pre-LN theory {pre_th[0]:.3g} -> {pre_th[-1]:.3g} "
                     f"(log-log slope {slope:.2f}; 1/sqrt(L) is -0.50), Post-LN theory "
                     f"{post_th[0]:.3g} -> {post_th[-1]:.3g}")
    arch = profiles["post"][0].arch
    return (f"Per-layer FFN gradient norms of the {depth}-{depth} encoder-decoder, "
            f"d={arch.d_model}, heads {arch.n_heads}, d_ff={arch.d_ff}, seq {arch.seq_len}, "
            f"batch {arch.batch_size}, {ctx.seeds} probe seeds, iid uniform tokens (the paper: "
            "real IWSLT14 sentences, and its Figure 3 shows roughly 20x growth of Post-LN's W1 "
            "from layer 1 to 6). " + "; ".join(parts) + ".")
