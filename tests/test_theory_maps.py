"""Mean-field maps of single primitives (`normfield.theory.maps`, `gaussian`, `attention`)
against Monte-Carlo simulation of that one node at large width (numpy, fixed seeds).

Tolerances: ``Z`` standard errors of the Monte-Carlo mean (estimated from the samples) plus the
documented approximation of the map (O(1/width) for ratio-of-expectations in norms; O(1/d_head)
and the exchangeable-key approximation for attention).  Where the map is exact given the inputs'
empirical kernels (linear forward/backward, norms conditioned on x) we condition on x and
compare to floating-point precision or to the MC error alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf, expit

from normfield.theory import attention, gaussian
from normfield.theory.kernels import Blocks
from normfield.theory.maps import (Point, _expected_cosine, linear_backward, linear_forward,
                                   linear_grad_sq, norm_backward, norm_forward)

Z = 5.0  # standard errors allowed


def _random_kernel(rng, n, cos=0.3):
    """A random PSD n x n kernel with unit-ish diagonal and typical cosine ~cos."""
    a = rng.normal(size=(n, n + 2))
    k = a @ a.T / (n + 2)
    k = (1 - cos) * k + cos * np.outer(np.ones(n), np.ones(n)) * np.sqrt(np.outer(np.diag(k), np.diag(k)))
    return k


def _batch_kernel(rng, n, b):
    """Full (b n) x (b n) kernel with the Blocks structure: x_{s,i} = a_i + c_{s,i} gives the
    same within block for every sequence and a symmetric across block a a^T."""
    shared, own = _random_kernel(rng, n, 0.2) * 0.5, _random_kernel(rng, n, 0.4)
    full = np.kron(np.ones((b, b)), shared) + np.kron(np.eye(b), own)
    return full, Blocks(shared + own, shared.copy())


def _sample(rng, kfull, width, reps=None):
    """Tokens with iid coordinates of covariance kfull: shape (..., N, width)."""
    chol = np.linalg.cholesky(kfull + 1e-12 * np.eye(len(kfull)))
    shape = (kfull.shape[0], width) if reps is None else (reps, kfull.shape[0], width)
    return chol @ rng.normal(size=shape)


def _emp(x):
    return x @ np.swapaxes(x, -1, -2) / x.shape[-1]


def _blocks(full, n):
    return Blocks(full[:n, :n], full[:n, n:2 * n])


# ---- linear --------------------------------------------------------------------------------------
def test_linear_forward_kernel_and_mean_vs_mc():
    rng = np.random.default_rng(0)
    n, b, din, dout, reps = 3, 2, 64, 48, 1500
    var_w, var_b = 1.3 / din, 0.2
    x = _sample(rng, _batch_kernel(rng, n, b)[0], din)
    kx = _emp(x)
    pred = linear_forward(Point(_blocks(kx, n), _blocks(kx, n) * 0.0, din), var_w, var_b, dout)
    w = rng.normal(scale=np.sqrt(var_w), size=(reps, din, dout))
    bias = rng.normal(scale=np.sqrt(var_b), size=(reps, 1, dout))
    y = x @ w + bias
    ky = _emp(y)  # (reps, N, N)
    ybar = y.mean(-1)
    my = ybar[:, :, None] * ybar[:, None, :]
    for est, want in ((ky, pred.k), (my, pred.m)):
        mean, se = est.mean(0), est.std(0) / np.sqrt(reps)
        for blk, sl in ((want.w, np.s_[:n, :n]), (want.c, np.s_[:n, n:2 * n])):
            np.testing.assert_array_less(np.abs(mean[sl] - blk), Z * se[sl] + 1e-12)
    assert pred.width == dout
    np.testing.assert_allclose(pred.m.w, pred.k.w / dout)


def test_linear_backward_vs_mc():
    rng = np.random.default_rng(1)
    n, din, dout, reps = 4, 48, 64, 1500
    var_w = 2.0 / (din + dout)
    gy = _sample(rng, _random_kernel(rng, n), dout)
    gfull = _emp(gy)
    w = rng.normal(scale=np.sqrt(var_w), size=(reps, din, dout))
    gx = gy @ np.swapaxes(w, -1, -2)  # dL/dx = dL/dy W^T
    est = _emp(gx)
    want = linear_backward(Blocks(gfull, gfull), var_w, dout).w
    mean, se = est.mean(0), est.std(0) / np.sqrt(reps)
    np.testing.assert_array_less(np.abs(mean - want), Z * se)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_linear_weight_grad_sq_vs_mc(batch_size):
    """E||sum_t x_t^T g_t||_F^2 with x and g independent Gaussian (gradient independence)."""
    rng = np.random.default_rng(2 + batch_size)
    n, din, dout, reps = 3, 48, 40, 1500
    kfull, kb = _batch_kernel(rng, n, batch_size)
    gfull, gb = _batch_kernel(rng, n, batch_size)
    x = _sample(rng, kfull, din, reps)
    g = _sample(rng, gfull, dout, reps)
    dw = np.swapaxes(x, -1, -2) @ g  # (reps, din, dout)
    est = np.sum(dw ** 2, axis=(-2, -1))
    want = linear_grad_sq(Point(kb, kb * 0.0, din), gb, dout, batch_size)
    assert want == pytest.approx(din * dout * np.sum(kfull * gfull), rel=1e-12)
    assert abs(est.mean() - want) < Z * est.std() / np.sqrt(reps)


# ---- activations ---------------------------------------------------------------------------------
def _phi(name, x):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu":
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return x * expit(x)


def _dphi(name, x):
    if name == "relu":
        return (x > 0).astype(float)
    h = 1e-5
    return (_phi(name, x + h) - _phi(name, x - h)) / (2 * h)


@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("q1,q2,c", [(1.0, 1.0, 0.6), (0.5, 2.0, 0.4), (3.0, 0.7, -1.2)])
def test_activation_pair_expectations_vs_mc(name, q1, q2, c):
    rng = np.random.default_rng(10)
    m = 150_000
    cov = np.array([[q1, c], [c, q2]])
    u, v = np.linalg.cholesky(cov + 1e-12 * np.eye(2)) @ rng.normal(size=(2, m))
    kf, kd = gaussian.pair_expectations(name, q1, q2, c)
    for got, samples in ((kf, _phi(name, u) * _phi(name, v)), (kd, _dphi(name, u) * _dphi(name, v))):
        se = samples.std() / np.sqrt(m)
        assert abs(float(got) - samples.mean()) < Z * se + 1e-6, (name, got, samples.mean(), se)


def test_gelu_smoothed_closed_form_matches_quadrature():
    """``E[gelu(m + sigma Z)]`` and ``E[gelu'(m + sigma Z)]`` in closed form against a
    Gauss-Hermite quadrature of order 120 of the plain function (accurate to rounding, ~1e-11,
    for these analytic integrands at |m|, sigma <= 3; gelu' by a central difference, ~1e-10);
    sigma 0 is gelu itself.  A wrong power of t moves the values by 1e-3 or more."""
    from numpy.polynomial.hermite_e import hermegauss

    z, w = hermegauss(120)
    w = w / w.sum()
    m, sigma = np.meshgrid(np.linspace(-3, 3, 13), np.array([0.0, 0.01, 0.3, 1.0, 3.0]))
    value, deriv = gaussian._gelu_smoothed(m, sigma)
    x = m[..., None] + sigma[..., None] * z
    want_value = np.sum(w * _phi("gelu", x), axis=-1)
    want_deriv = np.sum(w * _dphi("gelu", x), axis=-1)
    np.testing.assert_allclose(value, want_value, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(deriv, want_deriv, rtol=1e-8, atol=1e-9)  # central difference


@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh", "silu"])
def test_activation_mean_vs_mc(name):
    rng = np.random.default_rng(11)
    q = np.array([0.3, 1.0, 4.0])
    got = gaussian.mean(name, q)
    for qi, gi in zip(q, got):
        s = _phi(name, np.sqrt(qi) * rng.normal(size=150_000))
        assert abs(gi - s.mean()) < Z * s.std() / np.sqrt(s.size)


@pytest.mark.parametrize("name", ["gelu_tanh", "silu"])
def test_activation_map_expanded_in_a_small_variance_spread(name):
    """Variances spread by up to 1e-2 of their largest (GPT-2's first LayerNorm output spreads
    by 0.4%): the map expanded to second order about the mean variance agrees with the
    quadrature entry by entry within 3e-7 of its largest value (the table's interpolation in
    rho leaves ~5e-8, the expansion's O(spread^3) remainder the rest); without the
    second-order terms the error is ~1e-5, without the first-order one ~1e-3."""
    rng = np.random.default_rng(5)
    n = 20
    for q_mean in (0.3, 1.6):
        q = q_mean * (1.0 + 1e-2 * (rng.uniform(size=n) - 0.5))
        x = rng.normal(size=(n, 3 * n))
        cor = np.corrcoef(x)
        cov = cor * np.sqrt(np.outer(q, q))
        got = gaussian.pair_expectations(name, q[:, None], q[None, :], cov)
        want = gaussian._quadrature(name, np.broadcast_to(q[:, None], cor.shape),
                                    np.broadcast_to(q[None, :], cor.shape), np.clip(cor, -1, 1))
        for g, w in zip(got, want):
            assert np.max(np.abs(g - w)) <= 3e-7 * np.max(np.abs(w))


def test_activation_table_matches_quadrature():
    """The tabulated equal-variance path agrees with the direct quadrature."""
    rho = np.linspace(-0.99, 0.99, 37)
    for name in ("gelu", "silu"):
        kf, kd = gaussian.pair_expectations(name, 1.7, 1.7, 1.7 * rho)
        qf, qd = gaussian._quadrature(name, 1.7, 1.7, rho)
        np.testing.assert_allclose(kf, qf, atol=1e-6)
        np.testing.assert_allclose(kd, qd, atol=1e-6)


# ---- norms ---------------------------------------------------------------------------------------
def _norm(kind, x, eps):
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _mean_tokens(rng, n, d, mu, kz, reps=None):
    """x_i = mu_i * 1 + z_i, z Gaussian with per-coordinate covariance kz."""
    z = _sample(rng, kz, d, reps)
    return mu[:, None] + z


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_forward_exact_given_x(kind):
    """Given the empirical K and M of one x, the map's leading term is the exact LN/RMSNorm
    output kernel: at a width so large that the finite-width bias of the cosine vanishes the map
    reproduces it."""
    rng = np.random.default_rng(20)
    n, d, eps = 4, 64, 0.05
    x = _mean_tokens(rng, n, d, np.array([1.5, -0.7, 0.0, 2.0]), _random_kernel(rng, n))
    k, xbar = _emp(x), x.mean(-1)
    pt = Point(Blocks(k, k), Blocks(np.outer(xbar, xbar), np.outer(xbar, xbar)), 10 ** 12)
    y = _norm(kind, x, eps)
    out = norm_forward(pt, kind, eps)
    np.testing.assert_allclose(out.k.w, _emp(y), rtol=1e-9, atol=1e-12)
    ybar = y.mean(-1)
    np.testing.assert_allclose(out.m.w, np.outer(ybar, ybar), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,with_means", [("layernorm", True), ("rmsnorm", False),
                                             ("rmsnorm", True)])
def test_norm_forward_cosine_bias_vs_mc(kind, with_means):
    """At d 32 the realized cosine of Gaussian tokens is biased by O(1/d) (Fisher's bias of the
    sample correlation, `maps._expected_cosine`): MC over 20,000 draws agrees with the map to MC
    error + O(1/d^2), and rejects the ratio of expected kernels."""
    rng = np.random.default_rng(22)
    n, d, reps, eps = 4, 32, 20000, 1e-5
    mu = np.array([0.6, -0.4, 0.0, 0.8]) * with_means
    kz = _random_kernel(rng, n, 0.5)
    k, m = np.outer(mu, mu) + kz, np.outer(mu, mu) + kz / d
    pt = Point(Blocks(k, k), Blocks(m, m), d)
    est = _emp(_norm(kind, _mean_tokens(rng, n, d, mu, kz, reps), eps))
    mean, se = est.mean(0), est.std(0) / np.sqrt(reps)
    out = norm_forward(pt, kind, eps).k.w
    np.testing.assert_array_less(np.abs(mean - out), Z * se + 2.0 / d ** 2)
    c = k - m if kind == "layernorm" else k
    ratio = c / np.sqrt(np.outer(np.diag(c) + eps, np.diag(c) + eps))
    off = ~np.eye(n, dtype=bool)
    assert np.max(np.abs(mean - ratio)[off] / se[off]) > Z


def test_expected_cosine_centred_path_is_the_general_formula():
    """The fused centred branch of `maps._expected_cosine` (LayerNorm) is the general delta-method
    formula with a zero coordinate-mean kernel, for any eps."""
    rng = np.random.default_rng(23)
    a = _random_kernel(rng, 5)
    s = np.stack([a, 0.4 * a])
    for eps in (0.0, 1e-5, 0.3):
        np.testing.assert_allclose(_expected_cosine(s, None, 63.0, eps),
                                   _expected_cosine(s, np.zeros_like(s), 63.0, eps),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_forward_population_vs_mc(kind):
    """Population kernels K = mu mu^T + Kz, M = mu mu^T + Kz/d (nonzero coordinate means);
    MC over x.  Error budget: MC + O(1/d) from E[ratio] vs ratio of E (bias of a sample
    correlation ~ rho (1 - rho^2) / (2 d), now in the map: what is left is O(1/d^2))."""
    rng = np.random.default_rng(21)
    n, d, reps, eps = 4, 1024, 300, 0.1
    mu = np.array([1.5, -0.7, 0.0, 2.0])
    kz = _random_kernel(rng, n)
    k = np.outer(mu, mu) + kz
    m = np.outer(mu, mu) + kz / d
    out = norm_forward(Point(Blocks(k, k), Blocks(m, m), d), kind, eps)
    x = _mean_tokens(rng, n, d, mu, kz, reps)
    y = _norm(kind, x, eps)
    est = _emp(y)
    mean, se = est.mean(0), est.std(0) / np.sqrt(reps)
    np.testing.assert_array_less(np.abs(mean - out.k.w), Z * se + 3.0 / d ** 2)
    ybar = y.mean(-1)
    mest = ybar[:, :, None] * ybar[:, None, :]
    mmean, mse = mest.mean(0), mest.std(0) / np.sqrt(reps)
    scale = np.sqrt(np.outer(np.diag(out.k.w), np.diag(out.k.w)))
    np.testing.assert_array_less(np.abs(mmean - out.m.w), Z * mse + 3.0 / d * scale)
    if kind == "layernorm":  # mean kernel dropped; K_y = (K - M) / (s s)
        assert np.all(out.m.w == 0.0)
    else:  # RMSNorm keeps the means: K_y ~ mu mu^T / s s, visibly nonzero
        assert np.max(np.abs(out.m.w)) > 0.1


@pytest.mark.parametrize("kind,d,with_means", [
    ("layernorm", 64, True), ("layernorm", 256, True), ("rmsnorm", 64, False),
    ("rmsnorm", 256, False),
    ("rmsnorm", 64, True),
])
def test_norm_backward_factor_vs_mc(kind, d, with_means):
    """Isotropic gradients with kernel G through the exact Jacobian of the norm (eps = 0:
    J^T g = (1/s)(I - e e^T)(I - y y^T/d) g for LN), with x drawn afresh per sample from the
    population (x_i = mu_i 1 + z_i, nonzero coordinate means).  The map keeps two O(1/d)
    factors (projection trace (d - p - 1 + rho^2)/d and Jensen E[1/(s_i s_j)]); the MC must
    agree to MC error + O(1/d^2), and at d = 64 must resolve the difference from the naive
    factor 1."""
    rng = np.random.default_rng(30 + d)
    n, reps, eps = 4, 6000, 0.0
    mu = np.array([1.0, -0.5, 0.3, 2.0]) * with_means
    kz = _random_kernel(rng, n, 0.5)
    x = _mean_tokens(rng, n, d, mu, kz, reps)
    y = _norm(kind, x, eps)
    c = x - x.mean(-1, keepdims=True) if kind == "layernorm" else x
    s = np.sqrt(np.mean(c * c, -1, keepdims=True))
    gk = _random_kernel(rng, n, 0.4)
    g = _sample(rng, gk, d, reps)  # E[g_i g_j^T] = gk(i, j) I
    gx = g - np.sum(g * y, -1, keepdims=True) * y / d
    if kind == "layernorm":
        gx = gx - gx.mean(-1, keepdims=True)
    gx = gx / s
    est = _emp(gx)
    mean, se = est.mean(0), est.std(0) / np.sqrt(reps)
    k, m = np.outer(mu, mu) + kz, np.outer(mu, mu) + kz / d
    pt = Point(Blocks(k, k), Blocks(m, m), d)
    out = norm_backward(pt, norm_forward(pt, kind, eps), Blocks(gk, gk), kind, eps)
    scale = np.sqrt(np.outer(np.diag(out.w), np.diag(out.w)))
    np.testing.assert_array_less(np.abs(mean - out.w), Z * se + 10.0 / d ** 2 * scale)
    cc = kz * (1 - 1 / d) if kind == "layernorm" else k
    naive = gk / np.sqrt(np.outer(np.diag(cc), np.diag(cc)))  # both O(1/d) factors dropped
    off = ~np.eye(n, dtype=bool)
    if d == 64 and kind == "layernorm":  # for RMSNorm the two factors nearly cancel
        assert np.max(np.abs(mean - naive)[off] / se[off]) > Z


def test_norm_backward_exact_jacobian_check():
    """The projection formula used in the MC above is the Jacobian of LN (finite differences)."""
    rng = np.random.default_rng(40)
    d = 16
    x, g = rng.normal(size=d) + 0.7, rng.normal(size=d)
    y = _norm("layernorm", x, 0.0)
    s = np.std(x)
    jtg = g - np.dot(g, y) * y / d
    jtg = (jtg - jtg.mean()) / s
    h = 1e-6
    fd = np.array([np.dot(g, _norm("layernorm", x + h * e, 0.0) - _norm("layernorm", x - h * e, 0.0))
                   / (2 * h) for e in np.eye(d)])
    np.testing.assert_allclose(jtg, fd, rtol=1e-5, atol=1e-7)


# ---- attention -----------------------------------------------------------------------------------
def _attention_mc(rng, x, var, n_heads, reps, causal):
    n, d = x.shape
    dh = d // n_heads
    out = np.zeros((reps, n, n))
    mask = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    for r in range(reps):
        q, k, v = (x @ rng.normal(scale=np.sqrt(s2), size=(d, d)) for s2 in var)
        q, k, v = (a.reshape(n, n_heads, dh).transpose(1, 0, 2) for a in (q, k, v))
        logits = np.where(mask, q @ k.transpose(0, 2, 1) / np.sqrt(dh), -np.inf)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(n, d)
        out[r] = o @ o.T / d
    return out


@pytest.mark.parametrize("kernel,mask", [("exchangeable", "bidirectional"),
                                         ("exchangeable", "causal"), ("random", "bidirectional")])
def test_attention_forward_vs_mc(kernel, mask):
    """K_o.w of `attention.forward` vs actual softmax attention with random W_q, W_k, W_v at
    d_model = 512, 4 heads (d_head = 128), conditioned on one x.

    Tolerance: 5 MC standard errors plus 4% of the mean diagonal: the Gaussian-logit limit has
    O(1/d_head) ~ 1% corrections, and for the non-exchangeable kernel the exchangeable-key
    approximation is not exact.  The fluctuation term a * D_v is a sizable fraction of the
    diagonal here, so a theory without it would fail."""
    rng = np.random.default_rng(50)
    n, d, heads, reps = 8, 512, 4, 40
    if kernel == "exchangeable":
        kfull = 0.7 * np.eye(n) + 0.3
    else:
        kfull = _random_kernel(rng, n, 0.3)
    x = _sample(rng, kfull, d)
    x = np.linalg.cholesky(kfull) @ np.linalg.qr(rng.normal(size=(d, n)))[0].T * np.sqrt(d)
    k = _emp(x)  # equals kfull up to rounding
    var = (2.5 / d, 2.5 / d, 1.0 / d)  # logit variance ~ 6 (1 - cos): strong fluctuations
    ko, _ = attention.forward(Blocks(k, k), attention.Mask.build(mask, n), *var, d)
    est = _attention_mc(rng, x, var, heads, reps, mask == "causal")
    mean, se = est.mean(0), est.std(0) / np.sqrt(reps)
    abar = attention.Mask.build(mask, n).mean
    mean_only = abar @ (k * var[2] * d) @ abar.T
    tol = Z * se + 0.04 * np.mean(np.diag(ko.w))
    np.testing.assert_array_less(np.abs(mean - ko.w), tol)
    assert np.max(np.abs(mean - mean_only) - tol) > 0, "fluctuation term not exercised"
