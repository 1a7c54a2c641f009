"""Gaussian expectations of activation functions (the activation's mean-field map).

For a centred Gaussian pair (u, v) with variances q1, q2 and covariance c:
``E[phi(u) phi(v)]`` (forward kernel) and ``E[phi'(u) phi'(v)]`` (backward factor),
and the mean ``E[phi(u)]``.

* ReLU: arc-cosine closed forms (Cho & Saul 2009):
  ``E[relu(u) relu(v)] = sqrt(q1 q2) (sin t + (pi - t) cos t) / (2 pi)``,
  ``E[1(u>0) 1(v>0)] = (pi - t) / (2 pi)``, t = arccos(rho), and ``E[relu(u)] = sqrt(q / (2 pi))``.
* GELU (erf and tanh forms) and SiLU: Gauss-Hermite quadrature of order 32 over
  ``u = sqrt(q1) z1, v = sqrt(q2) (rho z1 + sqrt(1 - rho^2) z2)`` (deterministic; exact for
  polynomials of degree < 64 in z): for the erf GELU over z1 only, the expectation over z2
  being in closed form (`_gelu_smoothed`), for the others a tensor quadrature over (z1, z2).
  When all variances agree to 1e-6 (the usual case after a norm; the mean variance is used)
  the map is tabulated on 2049 values of rho and interpolated linearly; when they spread by up
  to 1e-2 of their largest (a norm whose eps is not small next to its input's variance, as at
  GPT-2's init scale: 0.4%), it is expanded to second order in the variances about their mean,
  with the derivatives tabulated the same way (error O(spread^3): against the quadrature entry
  by entry, within 3e-7 of the map's largest value at spread 1e-2 and variances 0.3-4, where
  the table's linear interpolation in rho alone leaves 2e-8 to 5e-8); beyond, the quadrature
  runs entry by entry.
  Accuracy of the order-32 sum over z1 for GELU, against order 160 (largest absolute error
  of E[phi' phi'] over variances up to q and every rho): 2e-10 for q <= 1, 1e-6 for q <= 2,
  3e-3 for q <= 6 (the derivative's step, of width 1/sqrt(q), is resolved ever more coarsely).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import erf

_SQRT2PI = np.sqrt(2.0 * np.pi)


def _phi_pdf(x):
    return np.exp(-0.5 * x * x) / _SQRT2PI


def _gelu(x):
    cdf = 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    return x * cdf, cdf + x * _phi_pdf(x)


def _gelu_smoothed(m, sigma):
    """``(E[gelu(X)], E[gelu'(X)])`` for ``X = m + sigma Z``, Z ~ N(0, 1), in closed form.

    With ``t = sqrt(1 + sigma^2)``: ``E[Phi(X)] = Phi(m / t)`` and ``E[pdf(X)] = pdf(m / t) / t``
    (a Gaussian convolved with a Gaussian), so by Stein's lemma ``E[X Phi(X)] = m Phi(m / t) +
    sigma^2 pdf(m / t) / t``, and ``E[X pdf(X)] = m pdf(m / t) / t^3`` (the product of the two
    densities is a Gaussian in x of mean m / t^2); ``gelu(x) = x Phi(x)``,
    ``gelu'(x) = Phi(x) + x pdf(x)``."""
    t = np.sqrt(1.0 + sigma * sigma)
    x = m / t
    cdf = 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    pdf = _phi_pdf(x)
    return m * cdf + sigma * sigma * pdf / t, cdf + m * pdf / (t * t * t)


def _gelu_tanh(x):
    a = np.sqrt(2.0 / np.pi)
    inner = a * (x + 0.044715 * x ** 3)
    t = np.tanh(inner)
    value = 0.5 * x * (1.0 + t)
    deriv = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * a * (1.0 + 3 * 0.044715 * x * x)
    return value, deriv


def _silu(x):
    s = 0.5 * (1.0 + np.tanh(0.5 * x))
    return x * s, s * (1.0 + x * (1.0 - s))


SMOOTH = {"gelu": _gelu, "gelu_tanh": _gelu_tanh, "silu": _silu}
SMOOTHED = {"gelu": _gelu_smoothed}  # E over a Gaussian perturbation in closed form
ORDER = 32
TABLE_SIZE = 2049
EQUAL_SPREAD = 1e-6  # relative spread of the variances up to which the map is read at their mean
TAYLOR_SPREAD = 1e-2  # ... up to which it is expanded to second order about it (`_spread_tables`)
SPREAD_TABLE_SIZE = 257  # values of rho of the derivative tables (their terms are <= 1e-2 q f')


@lru_cache(maxsize=1)
def gauss_hermite():
    """Gauss-Hermite nodes and weights (normalized) for expectations over N(0, 1)."""
    z, w = hermegauss(ORDER)
    return z, w / w.sum()


_CHUNK = 1024  # entries evaluated at a time (temporaries of _CHUNK * ORDER^2 values)


def _quadrature(name, q1, q2, rho):
    """E[phi phi], E[phi' phi'] by Gauss-Hermite quadrature (module docstring); inputs
    broadcast to one shape.  Given z1, v is Gaussian with mean ``sqrt(q2) rho z1`` and
    standard deviation ``sqrt(q2 (1 - rho^2))``: with `SMOOTHED` its expectation is exact and
    only z1 is summed; otherwise z2 is summed too."""
    z, w = gauss_hermite()
    q1, q2, rho = np.broadcast_arrays(q1, q2, rho)
    shape = rho.shape
    q1, q2, rho = q1.ravel(), q2.ravel(), rho.ravel()
    smoothed = SMOOTHED.get(name)
    z1, z2 = (z, None) if smoothed else (z[:, None], z[None, :])
    ww = w if smoothed else w[:, None] * w[None, :]
    axes = tuple(range(1, 1 + ww.ndim))
    pad = (slice(None),) + (None,) * ww.ndim
    kf, kd = np.empty(rho.size), np.empty(rho.size)
    for s0 in range(0, rho.size, _CHUNK):
        part = slice(s0, s0 + _CHUNK)
        s1, s2 = np.sqrt(q1[part])[pad], np.sqrt(q2[part])[pad]
        r = np.clip(rho[part], -1.0, 1.0)[pad]
        f1, d1 = SMOOTH[name](s1 * z1)
        if smoothed:
            f2, d2 = smoothed(s2 * r * z1, s2 * np.sqrt(1.0 - r * r))
        else:
            f2, d2 = SMOOTH[name](s2 * (r * z1 + np.sqrt(1.0 - r * r) * z2))
        kf[part] = np.sum(ww * f1 * f2, axis=axes)
        kd[part] = np.sum(ww * d1 * d2, axis=axes)
    return kf.reshape(shape), kd.reshape(shape)


@lru_cache(maxsize=64)
def _table(name, q1, q2=None, size=TABLE_SIZE):
    """The map at variances (q1, q2) (q2 = q1 by default) on `size` values of rho in [-1, 1]."""
    rho = np.linspace(-1.0, 1.0, size)
    kf, kd = _quadrature(name, np.full_like(rho, q1), np.full_like(rho, q1 if q2 is None else q2),
                         rho)
    return rho, kf, kd


@lru_cache(maxsize=16)
def _spread_tables(name, q):
    """The derivatives of the map in the two variances at (q, q), on SPREAD_TABLE_SIZE values
    of rho, for the forward kernel and the backward factor: (d/dq1, d^2/dq1^2, d^2/dq1 dq2)
    each, by central differences of step 1e-3 q (the map is smooth in q: truncation O(1e-6)
    relative, rounding ~1e-16 / 1e-6 = 1e-10 of the second derivatives).  d/dq2 and
    d^2/dq2^2 equal them at (q, q) (the map is symmetric in its two arguments).  Returns the
    rho grid and the two triples."""
    h, size = 1e-3 * q, SPREAD_TABLE_SIZE
    grid, f0, d0 = _table(name, q, q, size)
    (_, fp, dp), (_, fm, dm) = _table(name, q + h, q, size), _table(name, q - h, q, size)
    corners = [_table(name, q + a, q + b, size)[1:]
               for a, b in ((h, h), (h, -h), (-h, h), (-h, -h))]
    out = []
    for k, (center, plus, minus) in enumerate(((f0, fp, fm), (d0, dp, dm))):
        pp, pm, mp, mm = (c[k] for c in corners)
        out.append(((plus - minus) / (2 * h), (plus - 2 * center + minus) / (h * h),
                    (pp - pm - mp + mm) / (4 * h * h)))
    return grid, out


def pair_expectations(name: str, q1, q2, c):
    """(E[phi(u) phi(v)], E[phi'(u) phi'(v)]) for covariance [[q1, c], [c, q2]]."""
    q1, q2, c = (np.asarray(x, float) for x in (q1, q2, c))
    norm = np.sqrt(np.maximum(q1 * q2, 1e-300))
    # the operations below write into fresh arrays in place (the same values as the plain
    # expressions, without a temporary per step: the kernels are stacks of n x n blocks)
    rho = np.divide(c, norm, out=np.empty(np.broadcast_shapes(c.shape, norm.shape)))
    np.maximum(rho, -1.0, out=rho)  # np.clip, without its overhead
    np.minimum(rho, 1.0, out=rho)
    if name == "relu":  # sin t = sqrt((1 - rho)(1 + rho)), accurate up to |rho| = 1
        rest = np.arccos(rho, out=np.empty_like(rho))
        np.subtract(np.pi, rest, out=rest)
        value = np.subtract(1.0, rho, out=np.empty_like(rho))
        cross = np.add(1.0, rho, out=np.empty_like(rho))
        np.multiply(value, cross, out=value)
        np.sqrt(value, out=value)
        np.multiply(rest, rho, out=cross)
        np.add(value, cross, out=value)
        np.multiply(norm, value, out=value)
        np.divide(value, 2 * np.pi, out=value)
        return value, np.divide(rest, 2 * np.pi, out=rest)
    q_all = np.concatenate([q.ravel() for q in np.broadcast_arrays(q1, q2)])
    spread, top = np.ptp(q_all), np.max(q_all)
    if not spread <= TAYLOR_SPREAD * top:  # NaN variances too: the quadrature reports them
        return _quadrature(name, q1, q2, rho)
    q = float(f"{np.mean(q_all):.9g}")
    grid, kf, kd = _table(name, q)
    kf, kd = np.interp(rho, grid, kf), np.interp(rho, grid, kd)
    if spread <= EQUAL_SPREAD * top:  # all zero included
        return kf, kd
    a, b = q1 - q, q2 - q  # second order in the variances about their mean
    first, square, cross = a + b, 0.5 * (a * a + b * b), a * b
    coarse, derivatives = _spread_tables(name, q)
    for out, (t1, t11, t12) in zip((kf, kd), derivatives):
        out += (first * np.interp(rho, coarse, t1) + square * np.interp(rho, coarse, t11)
                + cross * np.interp(rho, coarse, t12))
    return kf, kd


def homogeneous(name: str) -> bool:
    """Whether phi is positively homogeneous of degree 1, ``phi(a z) = a phi(z)`` for a > 0
    (ReLU), so that ``phi'(z) z = phi(z)`` (Euler)."""
    return name == "relu"


def mean(name: str, q):
    """E[phi(u)] for u ~ N(0, q)."""
    q = np.asarray(q, float)
    if name == "relu":
        return np.sqrt(q / (2 * np.pi))
    z, w = gauss_hermite()
    return np.sum(w * SMOOTH[name](np.sqrt(q)[..., None] * z)[0], axis=-1)
