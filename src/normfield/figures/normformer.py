"""NormFormer (Shleifer et al. 2021, arXiv 2110.09456) vs Pre-LN: per-layer gradient norms of
ffn.w2 and attn.o at 12 layers (6 in quick mode, sharing the
atlas configurations), GPT-3-125M-like shape (d 768, 12 heads, d_ff 3072).  NormFormer's
extra norms (after attention, after the FFN activation) are meant to even out the
early-layers-get-larger-gradients imbalance of Pre-LN."""

from __future__ import annotations

from normfield import plot
from normfield.figures.common import Context, Result, fairseq_base, new_figure, ratio

FULL = fairseq_base(768, 12, 3072)
PARAMS = ("ffn.w2", "attn.o")


def make(ctx: Context) -> list[Result]:
    fields = ctx.fields(FULL)
    profs = {}
    for placement in ("pre", "normformer"):
        arch = ctx.arch(6 if ctx.quick else 12, placement, fields)
        profs[placement] = (ctx.theory(arch), ctx.probe(arch))
    fig, axes = new_figure(1, 2, size=(12.0, 4.4))
    for ax, name in zip(axes[0], PARAMS):
        plot.overlay(*[p for pair in profs.values() for p in pair], params=(name,), ax=ax,
                     logy=True)
        ax.set_title(f"{name}: Pre-LN vs NormFormer")
    parts = []
    for placement, (th, pr) in profs.items():
        for n in PARAMS:
            parts.append(f"{plot.LABELS[placement]} {n} layer 1/layer {th.arch.depth} = "
                         f"{ratio(pr[n][0], pr[n][-1]):.2f}x probe "
                         f"(theory {ratio(th[n][0], th[n][-1]):.2f}x)")
    a = profs["pre"][0].arch
    caption = (f"Pre-LN vs NormFormer, {a.depth} layers, d={a.d_model}, {a.n_heads} heads, "
               f"d_ff={a.d_ff}, {ctx.seeds} probe seeds: " + "; ".join(parts) + ".")
    return [Result("normformer", fig, caption)]
