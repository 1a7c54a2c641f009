"""Moments of pairs of softmax rows with jointly Gaussian logits.

Definitions
-----------
Two softmax rows ``A`` (over ``n1`` entries) and ``B`` (over ``n2 >= n1``
entries).  For ``j = 1..n1`` the logit pairs ``(a_j, b_j)`` are iid bivariate
normal with mean 0, variances ``v1``, ``v2`` and correlation ``rho``; for
``j = n1+1..n2`` the ``b_j`` are iid ``N(0, v2)`` independent of everything.
``A_j = exp(a_j) / sum_{k<=n1} exp(a_k)``, ``B_j = exp(b_j) / sum_{k<=n2} exp(b_k)``.

* ``T1 = E[sum_{j<=n1} A_j B_j]``
* ``Q  = E[sum_{j<=n1} A_j B_j (1 - A_j - B_j)] + E[(sum_{j<=n1} A_j B_j)^2]``

Exact limits: ``v1 = v2 = 0`` gives ``T1 = 1/n2``, ``Q = (1/n2)(1 - 1/n1)``;
``rho = 0`` gives ``T1 = 1/n2``; ``n1 = 1`` gives ``Q = 0``.

Method ("analytic")
-------------------
Double Laplace representation (exact, no large-n expansion):
``1/(Z_A^p Z_B^q) = int_0^inf int_0^inf s^{p-1} t^{q-1} / ((p-1)!(q-1)!)
exp(-s Z_A - t Z_B) ds dt``.  With iid entries the expectation over the
logits factorizes into per-entry two-dimensional Laplace transforms of the
bivariate log-normal,

``G_{al,be}(s, t) = E[exp(al a + be b - s e^a - t e^b)]``,
``psi(t) = E[exp(-t e^b)]``,

for instance ``T1 = n1 int int G_11 G_00^{n1-1} psi^{n2-n1} ds dt``.  The
per-entry expectations are computed with a trapezoid rule in the standardized
logits (step 0.25 on [-9, 9], spectrally accurate for these analytic
integrands), using a conditional decomposition so that the bivariate
expectation is a small matrix product; the (s, t) integral uses a trapezoid
rule in (log s, log t) (the integrand is a Gumbel-like bump of width O(1) in
log space, for which the trapezoid rule is spectrally accurate).  The only
approximations are therefore quadrature ones; see ``_quad_moments``.

For speed, ``pair_moments`` evaluates this on Chebyshev nodes in ``rho`` for
each unique ``(n1, n2, v1, v2)`` and interpolates in ``rho`` (the moments are
analytic in ``rho`` on [-1, 1]).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["pair_moments"]

_METHODS = ("analytic", "mc")

# standardized-logit trapezoid grid for per-entry expectations
_ZH = 0.25
_Z = np.arange(-9.0, 9.0 + 1e-9, _ZH)
_ZW = np.exp(-0.5 * _Z**2) * _ZH / np.sqrt(2.0 * np.pi)
_ZW = _ZW / _ZW.sum()


def _validate(n1, n2, v1, v2, rho, method):
    if method not in _METHODS:
        raise ValueError(f"invalid method={method!r}: expected one of {_METHODS}")
    n1 = np.asarray(n1)
    n2 = np.asarray(n2)
    v1 = np.asarray(v1, dtype=np.float64)
    v2 = np.asarray(v2, dtype=np.float64)
    rho = np.asarray(rho, dtype=np.float64)
    n1f = n1.astype(np.float64)
    n2f = n2.astype(np.float64)
    bad = ~np.isfinite(n1f) | (n1f < 1) | (n1f != np.round(n1f))
    if np.any(bad):
        raise ValueError(
            f"invalid n1={n1f[bad].ravel()[0]:g}: expected an integer n1 >= 1")
    n1b, n2b = np.broadcast_arrays(n1f, n2f)
    bad = ~np.isfinite(n2b) | (n2b != np.round(n2b)) | (n2b < n1b)
    if np.any(bad):
        i = np.flatnonzero(bad.ravel())[0]
        raise ValueError(
            f"invalid n2={n2b.ravel()[i]:g}: expected an integer n2 >= n1 "
            f"(n1={n1b.ravel()[i]:g})")
    for name, v in (("v1", v1), ("v2", v2)):
        bad = ~np.isfinite(v) | (v < 0)
        if np.any(bad):
            raise ValueError(
                f"invalid {name}={v[bad].ravel()[0]:g}: expected {name} >= 0 (finite)")
    bad = ~np.isfinite(rho) | (rho < -1) | (rho > 1)
    if np.any(bad):
        raise ValueError(
            f"invalid rho={rho[bad].ravel()[0]:g}: expected -1 <= rho <= 1")
    return np.broadcast_arrays(n1f, n2f, v1, v2, rho)


# ---------------------------------------------------------------------------
# Monte Carlo reference
# ---------------------------------------------------------------------------

def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _mc_moments(n1, n2, v1, v2, rho, samples=4096, seed=0, chunk=None):
    """Monte Carlo estimates and standard errors, flat float arrays in.

    Common random numbers: the same standard normals (seeded by ``seed``) are
    used for every input tuple.  Returns (T1, Q, se_T1, se_Q).
    """
    n1 = np.asarray(n1, dtype=np.int64).ravel()
    n2 = np.asarray(n2, dtype=np.int64).ravel()
    v1 = np.asarray(v1, dtype=np.float64).ravel()
    v2 = np.asarray(v2, dtype=np.float64).ravel()
    rho = np.asarray(rho, dtype=np.float64).ravel()
    m = n1.size
    nmax = int(n2.max()) if m else 1
    if chunk is None:
        chunk = max(1, min(samples, (1 << 21) // nmax))
    s1 = np.zeros(m); s2 = np.zeros(m); q1 = np.zeros(m); q2 = np.zeros(m)
    ss = np.random.SeedSequence(seed)
    nchunks = -(-samples // chunk)
    for c, child in enumerate(ss.spawn(nchunks)):
        k = min(chunk, samples - c * chunk)
        rng = np.random.default_rng(child)
        z1 = rng.standard_normal((k, nmax))
        z2 = rng.standard_normal((k, nmax))
        for i in range(m):
            a_, b_ = int(n1[i]), int(n2[i])
            r = rho[i]
            sa, sb = np.sqrt(v1[i]), np.sqrt(v2[i])
            a = sa * z1[:, :a_]
            b = np.empty((k, b_))
            b[:, :a_] = sb * (r * z1[:, :a_] + np.sqrt(max(0.0, 1 - r * r)) * z2[:, :a_])
            b[:, a_:] = sb * z2[:, a_:b_]
            A = _softmax(a)
            B = _softmax(b)[:, :a_]
            AB = A * B
            t = AB.sum(axis=1)
            q = (AB * (1.0 - A - B)).sum(axis=1) + t * t
            s1[i] += t.sum(); s2[i] += (t * t).sum()
            q1[i] += q.sum(); q2[i] += (q * q).sum()
    T = s1 / samples
    Q = q1 / samples
    seT = np.sqrt(np.maximum(s2 / samples - T * T, 0) / max(samples - 1, 1))
    seQ = np.sqrt(np.maximum(q2 / samples - Q * Q, 0) / max(samples - 1, 1))
    return T, Q, seT, seQ


# ---------------------------------------------------------------------------
# Double-Laplace quadrature (exact up to quadrature error)
# ---------------------------------------------------------------------------

def _quad_moments(n1, n2, v1, v2, rho, h=0.6, tail=18.0):
    """T1, Q for arrays n1, n2 (same shape) at scalar v1, v2, rho."""
    n1 = np.asarray(n1, dtype=np.float64).ravel()
    n2 = np.asarray(n2, dtype=np.float64).ravel()
    s1, s2 = np.sqrt(v1), np.sqrt(v2)
    c = np.sqrt(max(0.0, 1.0 - rho * rho))
    # log-s and log-t grids
    def grid(nmax, v, s):
        lo = -(np.log(nmax) + 0.5 * v + 6.0 * s + tail)
        hi = 7.0 * s + 4.0
        return np.arange(lo, hi + h, h)
    x = grid(n1.max(), v1, s1)
    y = grid(n2.max(), v2, s2)
    a = s1 * _Z                                  # (I,)
    bm = s2 * rho * _Z                           # conditional mean of b given a
    bk = bm[:, None] + s2 * c * _Z[None, :]      # (I, K)
    Ey = np.exp(-np.exp(y[None, None, :] + bk[:, :, None]))   # (I, K, Y)
    eb = np.exp(bk)
    wK = _ZW[None, :, None]
    H0 = np.sum(wK * Ey, axis=1)                 # (I, Y)
    H1 = np.sum(wK * eb[:, :, None] * Ey, axis=1)
    H2 = np.sum(wK * (eb * eb)[:, :, None] * Ey, axis=1)
    Ex = np.exp(-np.exp(x[:, None] + a[None, :])) * _ZW[None, :]   # (X, I)
    ea = np.exp(a)[None, :]
    E0, E1, E2 = Ex, Ex * ea, Ex * ea * ea
    G00 = E0 @ H0
    G11 = E1 @ H1
    G21 = E2 @ H1
    G12 = E1 @ H2
    G22 = E2 @ H2
    # marginal of b alone
    psi = np.exp(-np.exp(y[None, :] + s2 * _Z[:, None])).T @ _ZW   # (Y,)
    L = np.log(G00)
    M = np.log(psi)
    S = np.exp(x)[:, None]
    T = np.exp(y)[None, :]
    J = S * T * h * h
    # (n, X, Y) products
    P = np.exp((n1 - 1.0)[:, None, None] * L[None] + (n2 - n1)[:, None, None] * M[None, None, :])
    W = np.stack([J * G11, J * S * G21, J * T * G12, J * S * T * G22,
                  J * S * T * G11 * G11 / G00])          # (5, X, Y)
    R = np.einsum("nxy,kxy->kn", P, W)
    T1 = n1 * R[0]
    Q = T1 - n1 * (R[1] + R[2]) + n1 * R[3] + n1 * (n1 - 1.0) * R[4]
    return T1, Q


def pair_moments(n1, n2, v1, v2, rho, method="analytic", samples=4096, seed=0):
    """returns (T1, Q)"""
    n1, n2, v1, v2, rho = _validate(n1, n2, v1, v2, rho, method)
    shape = n1.shape
    if method == "mc":
        T, Q, _, _ = _mc_moments(n1.ravel(), n2.ravel(), v1.ravel(), v2.ravel(),
                                 rho.ravel(), samples=samples, seed=seed)
        return T.reshape(shape), Q.reshape(shape)
    T = np.empty(n1.size); Q = np.empty(n1.size)
    for i, (a, b, c, d, e) in enumerate(zip(n1.ravel(), n2.ravel(), v1.ravel(), v2.ravel(), rho.ravel())):
        t, q = _quad_moments([a], [b], c, d, e)
        T[i], Q[i] = t[0], q[0]
    return T.reshape(shape), Q.reshape(shape)
