"""Liu et al. 2020 ("Understanding the Difficulty of Training Transformers", Admin; arXiv
2004.08249), Figure 3: gradient norm of every layer of a Post-LN and a Pre-LN encoder-decoder
at initialization, encoder layers then decoder layers.  Their finding: Post-LN's decoder
gradients vanish toward its input, its encoder's do not; Pre-LN has no such decay.

Per layer the total norm ``sqrt(sum_W E||dL/dW||_F^2)`` over the layer's weight matrices (norm
gains and biases left out) is drawn; the probe's standard error comes from the per-seed sums.
The 6-6 IWSLT14 configuration of `xiong_fig3` is reused (Liu et al. show 6-6 and 18-18 WMT14
models; synthetic iid tokens here).
"""

from __future__ import annotations

import numpy as np

from normfield import plot
from normfield.figures.common import Context, Result, new_figure, ratio
from normfield.figures.xiong_fig3 import FULL, STACKS, encoder_decoder
from normfield.placements import layer_params
from normfield.profile import control_covariates, seed_moments

TITLE = "Liu et al. 2020 (Admin) Fig. 3: per-layer gradient norm, encoder then decoder"


def layer_total(profile, prefix: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-layer ``sqrt(sum of squared weight-gradient norms)`` of one stack, and (probe) its
    standard error over seeds (the probe's estimator, `seed_moments`, on the per-seed sums)."""
    names = [n for n in layer_params(profile.arch)
             if n.startswith(prefix) and not n.endswith((".scale", ".bias"))]
    if profile.per_seed_sq is None:
        return np.sqrt(sum(profile.grads[n] ** 2 for n in names)), None
    per_seed = {"total": sum(profile.per_seed_sq[n] for n in names)}  # (seeds, layers)
    covariates = control_covariates(profile.arch, profile.per_seed_collisions)
    norm, stderr, _ = seed_moments(per_seed, covariates)
    return norm["total"], stderr["total"]


def make(ctx: Context) -> list[Result]:
    fields = ctx.fields(FULL)
    depth = ctx.depth(6)
    fig, axes = new_figure(1, 1, size=(8.0, 4.6))
    ax = axes[0][0]
    parts = []
    for placement in ("post", "pre"):
        arch = encoder_decoder(ctx, 6, placement, fields)
        th, pr = ctx.theory(arch), ctx.probe(arch)
        color = plot.placement_color(placement)
        x0 = 0
        for (prefix, stack), marker in zip(STACKS, ("o", "s")):
            t, _ = layer_total(th, prefix)
            m, se = layer_total(pr, prefix)
            x = np.arange(x0 + 1, x0 + len(t) + 1)
            ax.plot(x, t, color=color, lw=1.6,
                    label=f"{plot.LABELS[placement]} {stack} (theory)")
            ax.errorbar(x, m, yerr=se, color=color, marker=marker, mfc="white",
                        linestyle="none", capsize=2,
                        label=f"{plot.LABELS[placement]} {stack} (probe)")
            parts.append(f"{plot.LABELS[placement]} {stack} layer {len(t)}/layer 1 = "
                         f"{ratio(m[-1], m[0]):.2f}x probe (theory {ratio(t[-1], t[0]):.2f}x)")
            x0 += len(t)
    ax.axvline(depth + 0.5, color="0.5", lw=0.8)
    ax.set_xticks(range(1, 2 * depth + 1),
                  [f"e{i}" for i in range(1, depth + 1)] + [f"d{i}" for i in range(1, depth + 1)])
    ax.set_xlabel("layer (e = encoder, d = decoder; input side first)")
    ax.set_ylabel(r"layer gradient norm $\sqrt{\sum_W \|\partial L/\partial W\|_F^2}$")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncols=2)
    ax.set_title(TITLE, fontsize="medium")
    a = arch
    caption = (f"Total weight-gradient norm per layer of the {depth}-{depth} encoder-decoder "
               f"(d={a.d_model}, heads {a.n_heads}, d_ff={a.d_ff}, seq {a.seq_len}, batch "
               f"{a.batch_size}, {ctx.seeds} probe seeds, iid tokens): " + "; ".join(parts)
               + ". Liu et al. report the Post-LN decoder's gradients shrinking toward its "
               "input layers and no such decay in the encoder or in Pre-LN.")
    return [Result("liu2020", fig, caption)]
