"""A norm whose output feeds a homogeneous branch that closes in a norm (Post-LN's first norm:
``u = h + W2 relu(W1 h)``, then ``LN(u)``) receives a gradient exactly orthogonal to its
output, so its backward map removes only the coordinate mean (`maps.norm_backward` with
``radial=False``; `predict._radial_free_norms` finds these norms)."""

from __future__ import annotations

import numpy as np
import pytest

import normfield as nf
from normfield.placements import Norm, block, stacks
from normfield.theory.kernels import Blocks
from normfield.theory.maps import (Point, activation_forward, linear_backward, linear_forward,
                                   norm_backward, norm_forward)
from normfield.theory.predict import _Block

Z = 5.0  # standard errors allowed


def _layernorm(x):
    c = x - x.mean(-1, keepdims=True)
    s = np.sqrt(np.mean(c * c, -1, keepdims=True))
    return c / s, s


def _layernorm_vjp(y, s, g):
    """J^T g of LayerNorm (eps = 0) at output y and scale s: (1/s)(I - e e^T)(I - y y^T/d) g."""
    d = y.shape[-1]
    g = g - np.sum(g * y, -1, keepdims=True) * y / d
    return (g - g.mean(-1, keepdims=True)) / s


def _ffn_sub_block_mc(rng, kx, d, d_ff, reps):
    """Per-sample gradient kernels at the sub-block input x of ``y = LN(h + W2 relu(W1 h))``,
    ``h = LN(x)``, with fresh weights (variance 2/fan_in, 1/fan_in) and an isotropic output
    gradient with kernel gy per sample; returns the per-sample kernels and gy."""
    n = len(kx)
    x = np.linalg.cholesky(kx) @ rng.normal(size=(reps, n, d))
    gy_kernel = 0.5 * np.eye(n) + 0.5
    gy = np.linalg.cholesky(gy_kernel) @ rng.normal(size=(reps, n, d))
    h, sh = _layernorm(x)
    w1 = rng.normal(size=(reps, d, d_ff)) * np.sqrt(2.0 / d)
    w2 = rng.normal(size=(reps, d_ff, d)) * np.sqrt(1.0 / d_ff)
    z = h @ w1
    u = h + np.maximum(z, 0.0) @ w2
    y, su = _layernorm(u)
    gu = _layernorm_vjp(y, su, gy)
    gh = gu + ((gu @ np.swapaxes(w2, -1, -2)) * (z > 0)) @ np.swapaxes(w1, -1, -2)
    radial = np.sum(gh * h, -1)  # exactly zero (Euler): h + FFN(h) is homogeneous in h
    gx = _layernorm_vjp(h, sh, gh)
    return gx @ np.swapaxes(gx, -1, -2) / d, gy_kernel, radial, np.sum(gh * gh, -1)


def _theory(kx, d, d_ff, gy_kernel, radial):
    x = Point(Blocks(kx, kx), Blocks(np.zeros_like(kx), np.zeros_like(kx)), d)
    h = norm_forward(x, "layernorm", 0.0)
    z = linear_forward(h, 2.0 / d, 0.0, d_ff)
    a, dphi = activation_forward(z, "relu")
    f = linear_forward(a, 1.0 / d_ff, 0.0, d)
    u = Point(h.k + f.k, h.m + f.m, d)
    y = norm_forward(u, "layernorm", 0.0)
    gu = norm_backward(u, y, Blocks(gy_kernel, gy_kernel), "layernorm", 0.0)
    gh = gu + linear_backward(linear_backward(gu, 1.0 / d_ff, d) * dphi, 2.0 / d, d_ff)
    return norm_backward(x, h, gh, "layernorm", 0.0, radial=radial).w


def test_post_ln_ffn_norm_backward_removes_only_the_mean():
    """Monte Carlo of the sub-block at d 64: the radial component of the gradient at h is zero
    to rounding, and the kernel at x matches the map with radial=False to MC error plus
    O(1/d^2); the isotropic map (radial=True) is off by ~1/d = 1.6% and must be rejected."""
    rng = np.random.default_rng(7)
    n, d, d_ff, reps = 4, 64, 256, 6000
    a = rng.normal(size=(n, n + 2))
    kx = a @ a.T / (n + 2) * 0.6 + 0.4
    est, gy_kernel, radial, gh_sq = _ffn_sub_block_mc(rng, kx, d, d_ff, reps)
    assert np.max(np.abs(radial)) < 1e-9 * np.max(gh_sq)
    mean, se = est.mean(0), est.std(0) / np.sqrt(reps)
    exact = _theory(kx, d, d_ff, gy_kernel, radial=False)
    isotropic = _theory(kx, d, d_ff, gy_kernel, radial=True)
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    np.testing.assert_array_less(np.abs(mean - exact), Z * se + 10.0 / d ** 2 * scale)
    assert np.max(np.abs(mean - isotropic) / se) > Z
    # on the diagonal the isotropic map removes d - 2 of d directions, the exact one d - 1
    np.testing.assert_allclose(np.diag(isotropic) / np.diag(exact), (d - 2) / (d - 1), rtol=1e-12)


@pytest.mark.parametrize("placement,activation,expected", [
    ("post", "relu", {"norm1"}), ("post", "gelu", set()), ("pre", "relu", set()),
    ("deepnorm", "relu", {"norm1"}), ("peri", "relu", {"norm2"}),
    ("normformer", "relu", {"norm2"}), ("b2t", "relu", set()),
])
def test_radial_free_norms_of_the_recipes(placement, activation, expected):
    """Post-LN and DeepNorm's norm before a ReLU FFN (closed by the block's last norm), Peri-LN's
    and NormFormer's pre-FFN norm (closed by the FFN's output or middle norm); none when the
    activation is not homogeneous, in Pre-LN (the branch sum is not normed) or in B2T (the
    closing add also takes the block input)."""
    arch = nf.Arch(depth=2, placement=placement, d_model=64, n_heads=2, seq_len=8,
                   activation=activation)
    stack = stacks(arch)[0]
    steps = block(arch, 0, stack)
    blk = _Block(arch, steps, {}, "analytic", stack)
    assert {steps[i].name for i in blk.radial_free} == expected
    assert all(isinstance(steps[i], Norm) for i in blk.radial_free)
