"""Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture" (arXiv 2002.04745),
beside normfield's exact mean-field values.

Their setting (section 3.3 and appendix): one head, all weight matrices d x d (so d_ff = d),
W^Q = W^K = 0 (attention is uniform, x1 = (1/n) sum_j x_j W^V), Xavier-normal weights, zero
biases, LayerNorm gain 1 / bias 0, Gaussian input vectors.  `xiong_arch` builds that setting as an
ordinary `Arch`; the numbers below come from the general interpreter (`normfield.predict`):
uniform attention falls out of W^Q = W^K = 0, nothing is special-cased.

* Lemma 2: Post-LN: E||x^{post,5}_{l,i}||^2 = 3d/2 (the sum before each block's last LN);
  Pre-LN: (1 + l/2) d <= E||x^{pre}_{l,i}||^2 <= (1 + 3l/2) d.  We read l as the number of
  blocks applied (l = 0: the Gaussian input, E||x||^2 = d, where both bounds are d), which is
  normfield's ``activations["sq_norm"][l]`` (E||x||^2 / d at the output of block l); with the
  other offset (l = 1 for the input) the exact values fall below the lower bound at l <= 3.
* Theorem 1: ||dL/dW^{2,L}||_F <= O(d sqrt(ln d)) for Post-LN and O(d sqrt(ln d / L)) for
  Pre-LN (with high probability); the scaling in L is what our exact values can be held to:
  constant in L for Post-LN, proportional to 1/sqrt(L) for Pre-LN.
"""

from __future__ import annotations

import numpy as np

from normfield.arch import Arch, Init
from normfield.theory.predict import predict


def xiong_arch(depth: int, placement: str, d: int = 512, seq_len: int = 64, **fields) -> Arch:
    """Their analysis setting as an Arch (see module docstring); `fields` override."""
    base = dict(d_model=d, n_heads=1, d_ff=d, seq_len=seq_len, batch_size=1, positions="none",
                init=Init(scheme="xavier_normal", embed_std=1.0,
                          stds=(("attn.q", 0.0), ("attn.k", 0.0))))
    base.update(fields)
    return Arch(depth=depth, placement=placement, **base)


def lemma2_bounds(layer: int, d: int) -> dict:
    """Lemma 2 in units of E||x||^2 after `layer` blocks (layer >= 0)."""
    if layer < 0:
        raise ValueError(f"invalid layer={layer}: expected an integer >= 0 (blocks applied)")
    return {"post": 1.5 * d, "pre_low": (1 + layer / 2) * d, "pre_high": (1 + 1.5 * layer) * d}


def compare_lemma2(depth: int = 12, d: int = 512, seq_len: int = 64) -> list[dict]:
    """Rows ``layer, ours_pre, pre_low, pre_high, ours_post_sum, post`` for l = 0..depth:
    our exact E||x_l||^2 for Pre-LN, and for Post-LN the E||x5||^2 before the block's last LN
    (``x3 + FFN(x3)`` with x3 a LayerNorm output: 1 + E||FFN(x3)||^2 / d per coordinate, from
    the same linear and activation maps the interpreter uses)."""
    pre = predict(xiong_arch(depth, "pre", d, seq_len)).activations["sq_norm"]
    post_sum = 1.0 + _post_ffn_output(d, seq_len)
    rows = []
    for layer in range(depth + 1):
        b = lemma2_bounds(layer, d)
        rows.append({"layer": layer, "ours_pre": float(d * pre[layer]),
                     "pre_low": b["pre_low"], "pre_high": b["pre_high"],
                     "ours_post_sum": float(d * post_sum), "post": b["post"]})
    return rows


def _post_ffn_output(d: int, seq_len: int) -> float:
    """E||ReLU(h W1) W2||^2 / d for a LayerNorm output h (unit per-coordinate variance), from
    the general maps: a Pre-LN block's FFN branch equals Post-LN's x4."""
    from normfield.theory.maps import Point, activation_forward, linear_forward
    from normfield.theory.kernels import Blocks

    arch = xiong_arch(1, "post", d, seq_len)
    h = Point(Blocks(np.eye(seq_len), np.zeros((seq_len, seq_len))),
              Blocks.full(seq_len, 0.0, 0.0), d)
    u = linear_forward(h, arch.param_init("ffn.w1").std ** 2, 0.0, d)
    z, _ = activation_forward(u, "relu")
    y = linear_forward(z, arch.param_init("ffn.w2").std ** 2, 0.0, d)
    return float(np.mean(y.k.diag))


def theorem1_scaling(depths=(6, 12, 24, 48), d: int = 512, seq_len: int = 64) -> list[dict]:
    """Last-layer ||dL/dW^{2,L}||_F (our exact expectation) per depth and placement, with
    ``value * sqrt(L)`` (constant for Pre-LN if Theorem 1's 1/sqrt(L) holds) and ``value``
    (constant for Post-LN)."""
    rows = []
    for depth in depths:
        for placement in ("post", "pre"):
            value = float(predict(xiong_arch(depth, placement, d, seq_len))["ffn.w2"][-1])
            rows.append({"depth": depth, "placement": placement, "last_w2": value,
                         "last_w2_times_sqrt_L": value * np.sqrt(depth)})
    return rows
