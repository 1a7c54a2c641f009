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

Resolution: per-entry logit grid step 0.5 on [-8.5, 8.5] (35 nodes),
(log s, log t) step 0.6 with 14 e-folds of lower tail.  For each unique
``(v1, v2)`` the per-entry transforms are computed at 13 Chebyshev-Lobatto
nodes in ``rho`` (on [0, 1], or [-1, 1] if some rho < 0); the
``(n1, n2)`` contraction is exact for every unique pair, and the result is
interpolated in ``rho`` (barycentric; the moments are analytic in rho).
Exact limits (``v1 = v2 = 0``, ``rho = 0`` for T1, ``n1 = 1`` for Q) are
returned exactly.

Memoization (a repeated call returns the cached node moments, bit for bit; after
other calls the same inputs can differ in the last bit, ~3e-16 relative, where a
quadrature's per-n1 sums were computed in one matrix product with other n1's):
each row's conditional transforms per ``(v, size bucket, rho range)`` (`_side`;
the two rows share one when v1 = v2), the combined transforms per ``(v1, v2,
size buckets, rho range)`` (`_Quadrature`, with its sums over s per n1;
``G00^(n1-1)`` is a fixed product of squarings), and the node moments per
quadrature and (n1, n2) pair (`_NodeTable`, one per quadrature, filled as calls ask for
new pairs; up to 256 MiB over all of them), so that a repeated prediction needs no
quadrature.  The groups of one call (entries at one exact (v1, v2)) share the call's size
buckets, so that a variance's quadrature serves every group, causal row and layer it
appears in (a deep causal Post-LN stack meets each grid variance in several layers as its
tokens collapse: 142 quadratures instead of 898 at depth 48, seq 128).  Up to
`_WHOLE_PAIR_SET` (2^15) distinct pairs in a call (causal rows up to 255 tokens) every
group asks for the call's whole pair set, computed once per quadrature; above it a group
asks only for the pairs its own entries hold, a few percent of the 131,328 pairs of a
causal 512-token sequence (a Pre-LN depth-12 prediction at seq 512: 258 s -> 59-65 s).  Several
variances at the same n1, n2 and rho (`pair_moments_at`) share one set of rho
interpolation weights.

Accuracy (against the same quadrature at step 0.5 / 18 e-folds, and MC):
fluctuation parts ``T1 - 1/n2`` and ``Q - (1/n2)(1 - 1/n1)`` within 1e-4
relative for n1 in {4..256}, n2/n1 in {1, 2, 4}, v in [0.1, 3], rho in
[0, 1], and n1 = n2 up to 32000 with v <= 2; the only exceptions are
``rho = 0`` vocabulary-size rows, where the Q fluctuation is ~1e-5 of Q and
the absolute error is < 3e-6 |Q|.

Range (`V_MAX`): logit variances up to 30.  Beyond that the fixed standardized-logit grid
(step 0.5) under-resolves the per-entry integrand, which varies on the scale 1/sqrt(v).
Against MC (200,000 draws, n1 = n2 in {16, 64}): T1 and Q within 1 se at v = 10; at v = 30
T1 within 0.2% and Q 1.5% high (n 64, rho 0.9: 0.0455 against 0.0448 +- 0.0001); at v = 100
Q 13-20% high; NaN (overflow) at v = 300.  The (log s) grid also grows with v (4,764 nodes
and 2.2 GiB per array near v = 4,700).  Larger variances therefore raise ValueError;
method="mc" has no limit.  The validation grids and the presets stay below v = 2; QK-Norm
with Henry et al.'s temperature g has v ~ g^2 / d_head (12.5 at g 20, d_head 32).

Cost (one core): ~2-4 ms for 16,384 tuples sharing one (v1, v2) and one
(n1, n2) pair once their node moments are cached (the rho interpolation);
~35 ms more per new (v1, v2), mostly the 13 x 35 x 35 x ~60 exponentials of
each row's conditional transforms; ~0.1 s for the 8,256 distinct (n1, n2)
pairs of a causal 128-token sequence at a new variance, ~5 ms once cached.
"""

from __future__ import annotations

import collections
import functools
import math

import numpy as np

__all__ = ["pair_moments", "pair_moments_at"]

_METHODS = ("analytic", "mc")

# standardized-logit trapezoid grid for per-entry expectations
_ZH = 0.5
_Z = np.arange(-8.5, 8.5 + 1e-9, _ZH)
_ZW = np.exp(-0.5 * _Z**2) * _ZH / np.sqrt(2.0 * np.pi)
_ZW = _ZW / _ZW.sum()


_FMAX = np.finfo(np.float64).max
# The largest logit variance of the analytic method (module docstring, "Range").
V_MAX = 30.0


def _within(x, lo, hi, whole=False):
    """Whether every entry of x lies in [lo, hi] (NaN does not) and, if `whole`, is an integer."""
    if x.ndim == 0:
        value = float(x)
        return lo <= value <= hi and (not whole or value == round(value))
    if x.size == 0:
        return True
    if not (x.min() >= lo and x.max() <= hi):
        return False
    return not whole or bool(np.all(x == np.round(x)))


def _validate(n1, n2, variances, rho, method):
    """The arguments as float64 arrays (not broadcast: n1, n2, the variance arrays, rho) and
    their broadcast shape; ValueError naming the first invalid value.  `variances` is a
    sequence of (name, value) pairs.  Valid input costs a few reductions: the offending entry
    is only located once a check has failed (integer-typed sizes need no integrality check)."""
    if method not in _METHODS:
        raise ValueError(f"invalid method={method!r}: expected one of {_METHODS}")
    n1 = np.asarray(n1)
    n2 = np.asarray(n2)
    whole1, whole2 = (n.dtype.kind not in "iu" for n in (n1, n2))
    vs = [np.asarray(v, dtype=np.float64) for _, v in variances]
    rho = np.asarray(rho, dtype=np.float64)
    n1f = n1.astype(np.float64)
    n2f = n2.astype(np.float64)
    if not _within(n1f, 1.0, _FMAX, whole1):
        bad = ~np.isfinite(n1f) | (n1f < 1) | (n1f != np.round(n1f))
        raise ValueError(
            f"invalid n1={n1f[bad].ravel()[0]:g}: expected an integer n1 >= 1")
    n1b, n2b = (n1f, n2f) if n1f.ndim == n2f.ndim == 0 else np.broadcast_arrays(n1f, n2f)
    if not (_within(n2f, 1.0, _FMAX, whole2) and np.all(n2b >= n1b)):
        bad = ~np.isfinite(n2b) | (n2b != np.round(n2b)) | (n2b < n1b)
        i = np.flatnonzero(bad.ravel())[0]
        raise ValueError(
            f"invalid n2={n2b.ravel()[i]:g}: expected an integer n2 >= n1 "
            f"(n1={n1b.ravel()[i]:g})")
    for (name, _), v in zip(variances, vs):
        if not _within(v, 0.0, _FMAX):
            bad = ~np.isfinite(v) | (v < 0)
            raise ValueError(
                f"invalid {name}={v[bad].ravel()[0]:g}: expected {name} >= 0 (finite)")
        if method == "analytic" and not _within(v, 0.0, V_MAX):
            raise ValueError(
                f"invalid {name}={v.max():g}: the analytic softmax moments hold for logit "
                f"variances up to {V_MAX:g} (softmax.V_MAX); method='mc' has no limit")
    if not _within(rho, -1.0, 1.0):
        bad = ~np.isfinite(rho) | (rho < -1) | (rho > 1)
        raise ValueError(
            f"invalid rho={rho[bad].ravel()[0]:g}: expected -1 <= rho <= 1")
    shapes = [x.shape for x in (n1b, *vs) if x.ndim]
    shape = np.broadcast_shapes(rho.shape, *shapes) if shapes else rho.shape
    return n1f, n2f, vs, rho, shape


def _flat(x, shape):
    """x broadcast to `shape`, as a flat array."""
    return (x if x.shape == shape else np.broadcast_to(x, shape)).ravel()


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

def _grid(nmax, v, h, tail):
    s = np.sqrt(v)
    lo = -(np.log(nmax) + 0.5 * v + 6.0 * s + tail)
    hi = 7.0 * s + 4.0
    return np.arange(lo, hi + h, h)


def _conditional(s, rhos, grid, mirrored=()):
    """Conditional per-entry transforms of one row given the shared factor u, at each rho of
    `rhos`.

    The row's logit is ``s (sign(rho) sqrt|rho| u + sqrt(1-|rho|) w)``; returns
    ``F[m, k] = E_w[e^(m logit) exp(-e^x e^logit)]`` at rhos[k] for m = 0, 1, 2: an array
    (3, len(rhos), X, U).  `mirrored`: pairs (k, j), j < k, with rhos[k] = 1 - rhos[j] >= 0 up
    to rounding: node k's logit is node j's with u and w exchanged, so its exponentials are
    node j's, transposed (it is evaluated at 1 - rhos[j]).
    """
    out = np.empty((len(rhos), _Z.size, grid.size, 3))
    scale = np.exp(grid)[:, None, None]
    shape = (_Z.size, _Z.size)
    source = dict(mirrored)
    kept = {}
    for k, rho in enumerate(rhos):
        if k in source:
            K, e = kept.pop(source[k])
            K, e = K.swapaxes(1, 2), e.T
        else:
            r = abs(rho)
            sg = 1.0 if rho >= 0 else -1.0
            cu, cw = np.sqrt(r), np.sqrt(1.0 - r)
            # e (U, W), kept in a broadcast shape (U, 1) or (1, W) when it depends on u or w
            # only (r = 1 or 0: the other term is +-0, so the values are the same)
            u_part, w_part = sg * cu * _Z[:, None], cw * _Z[None, :]
            e = np.exp(s * (u_part if cw == 0.0 else w_part if cu == 0.0 else u_part + w_part))
            K = np.broadcast_to(np.exp(-scale * e[None]), (grid.size,) + shape)  # (X, U, W)
            if k in source.values():
                kept[k] = K, e
        e = np.broadcast_to(e, shape)
        moments = np.stack((np.broadcast_to(_ZW, shape), e * _ZW, e * e * _ZW), axis=-1)
        np.matmul(K.transpose(1, 0, 2), moments, out=out[k])         # (U, X, 3)
    return out.transpose(3, 0, 2, 1)


def _log_psi(s, y):
    """log psi(t) = log E[exp(-t e^b)], b ~ N(0, s^2), on the log t grid y."""
    return np.log(np.exp(-np.exp(y)[:, None] * np.exp(s * _Z)[None, :]) @ _ZW)


def _combine(A, B, x, y):
    """G00 and the stacked weights W from the conditional transforms A of row a (unsigned,
    (3, ..., X, U)) and B of row b ((3, ..., Y, U)): the expectation over the shared factor u
    is a matrix product (see `_entry_transforms`).  Laid out for the sums over s (x): G00 is
    (..., Y, X) and W (..., Y, X, 5)."""
    A0w, A1w, A2w = (F.swapaxes(-1, -2) for F in A * _ZW)    # (..., U, X)
    B0, B1, B2 = B
    G00 = B0 @ A0w
    G11 = B1 @ A1w
    G21 = B1 @ A2w
    G12 = B2 @ A1w
    G22 = B2 @ A2w
    S = np.exp(x)[None, :]
    T = np.exp(y)[:, None]
    J = S * T
    # G11^2 / G00: where G00 underflows to 0 so does G11 (G11^2 <= G00 G22), and the limit is 0
    ratio = np.divide(J * S * T * G11 * G11, G00, out=np.zeros(G00.shape), where=G00 > 0)
    W = np.stack([J * G11, J * S * G21, J * T * G12, J * S * T * G22, ratio], axis=-1)
    return G00, W


def _entry_transforms(v1, v2, rho, x, y):
    """Per-entry Laplace transforms on the (log s, log t) grid.

    Returns L = log G00 (X, Y), M = log psi (Y,), and the stacked weights
    W (5, X, Y) = (J G11, J s G21, J t G12, J s t G22, J s t G11^2 / G00), with
    J = s t (Jacobian of the log grid, without the step factors).

    Uses the symmetric factor decomposition a = s1 (sqrt|rho| u + sqrt(1-|rho|) w1),
    b = s2 (sign(rho) sqrt|rho| u + sqrt(1-|rho|) w2), so the bivariate
    expectation is a matrix product over the shared factor u.
    """
    s1, s2 = np.sqrt(v1), np.sqrt(v2)
    G00, W = _combine(_conditional(s1, [abs(rho)], x)[:, 0], _conditional(s2, [rho], y)[:, 0],
                      x, y)
    return np.log(G00.T), _log_psi(s2, y), W.transpose(2, 1, 0)


def _contract(L, M, W, n1, n2, h):
    """Moment sums for (possibly non-integer) arrays n1 (N1,) and d = n2 - n1 grid.

    n1: (N1,), n2: (N1, N2) -> T1, Q of shape (N1, N2).
    """
    P = np.exp((n1 - 1.0)[:, None, None] * L[None])          # (N1, X, Y)
    U = np.einsum("nxy,kxy->nky", P, W)                       # (N1, 5, Y)
    D = np.exp((n2 - n1[:, None])[:, :, None] * M[None, None, :])   # (N1, N2, Y)
    R = np.einsum("nmy,nky->knm", D, U) * (h * h)
    n1c = n1[:, None]
    T1 = n1c * R[0]
    Q = T1 - n1c * (R[1] + R[2]) + n1c * R[3] + n1c * (n1c - 1.0) * R[4]
    return T1, Q


def _quad_moments(n1, n2, v1, v2, rho, h=0.6, tail=18.0):
    """T1, Q for arrays n1, n2 (same shape) at scalar v1, v2, rho (reference quadrature)."""
    n1 = np.asarray(n1, dtype=np.float64).ravel()
    n2 = np.asarray(n2, dtype=np.float64).ravel()
    x = _grid(n1.max(), v1, h, tail)
    y = _grid(n2.max(), v2, h, tail)
    L, M, W = _entry_transforms(v1, v2, rho, x, y)
    T = np.empty(n1.size); Q = np.empty(n1.size)
    for i in range(n1.size):
        t, q = _contract(L, M, W, n1[i:i + 1], n2[i:i + 1, None], h)
        T[i], Q[i] = t[0, 0], q[0, 0]
    return T, Q


# resolution of the analytic method
_QUAD_H = 0.6       # trapezoid step in (log s, log t)
_QUAD_TAIL = 14.0   # e-folds kept below the bulk of the (log s, log t) integrand
_N_RHO = 13         # Chebyshev-Lobatto nodes in rho (on [0, 1], or [-1, 1] if any rho < 0)
_PEEL = 8           # (v1, v2) groups split off by comparison before np.unique sorts the rest
_MOMENT_CACHE_BYTES = 256 * 2**20   # node moments kept over all quadratures (`_NodeTable`)
_WHOLE_PAIR_SET = 2**15  # up to this many pairs in a call, every group asks for all of them


def _bucket(n):
    """Round a size up to a power of two (>= 4) so cached transforms are reused."""
    return int(max(4, 1 << math.ceil(math.log2(max(n, 1.0)) - 1e-9)))


@functools.lru_cache(maxsize=None)
def _rho_nodes(rho_lo):
    """Chebyshev-Lobatto nodes on [rho_lo, 1] and their barycentric weights (read-only)."""
    k = np.arange(_N_RHO)
    t = np.cos(np.pi * k / (_N_RHO - 1))[::-1]         # -1 .. 1, includes 0
    nodes = rho_lo + (1.0 - rho_lo) * (t + 1.0) / 2.0
    nodes[0], nodes[-1] = rho_lo, 1.0
    bw = (-1.0) ** k
    bw[0] *= 0.5
    bw[-1] *= 0.5
    nodes.flags.writeable = bw.flags.writeable = False
    return nodes, bw


@functools.lru_cache(maxsize=128)
def _side(v, nmax, rho_lo, signed):
    """One row's (log s or log t) grid and its conditional transforms at every rho node
    ((3, _N_RHO, X, U), read-only).

    Row a takes the unsigned side (|rho|), row b the signed one; they coincide for rho_lo = 0,
    so callers pass ``signed=False`` there.  Cached: a side depends on its own row only, so
    pairs of (v, size bucket) share it.
    """
    grid = _grid(nmax, v, _QUAD_H, _QUAD_TAIL)
    nodes, _ = _rho_nodes(rho_lo)
    # on [0, 1] the Chebyshev-Lobatto nodes are symmetric about 1/2
    mirrored = [(_N_RHO - 1 - j, j) for j in range(_N_RHO // 2)] if rho_lo == 0.0 else ()
    F = _conditional(np.sqrt(v), nodes if signed else np.abs(nodes), grid, mirrored)
    F.flags.writeable = False
    return grid, F


class _Quadrature:
    """The analytic method at one (v1, v2), size buckets and rho range.

    Holds the per-entry transforms at every rho node (G00 and W stacked over the nodes; M does
    not depend on rho) and memoizes per n1 the sums over the s grid
    ``U(n1) = sum_s G00^(n1-1) W`` (computed by one matrix product per batch of n1's, whose
    last bits can depend on the batch).  The power
    ``G00^m`` is the product of the squarings ``G00^(2^j)`` of the bits j of m, in increasing
    order: the same values whatever else is computed.
    """

    def __init__(self, v1, v2, n1max, n2max, rho_lo):
        x, A = _side(v1, n1max, rho_lo, False)
        y, B = _side(v2, n2max, rho_lo, rho_lo < 0)
        self.rho_lo = rho_lo
        G00, self.W = _combine(A, B, x, y)                 # (K, Y, X), (K, Y, X, 5)
        self.M = _log_psi(np.sqrt(v2), y)
        self._squares = [G00]
        self._rows: dict = {}

    def _power(self, m):
        """``G00^m`` (K, Y, X) for an integer m >= 1."""
        out, j = None, 0
        while m:
            if j == len(self._squares):
                self._squares.append(self._squares[-1] * self._squares[-1])
            if m & 1:
                out = self._squares[j] if out is None else out * self._squares[j]
            m >>= 1
            j += 1
        return out

    def _laplace_sums(self, un1):
        """``U[k, y, i] = sum_s G00_k^(un1[i] - 1) W_k``, shape (_N_RHO, Y, len(un1), 5)."""
        missing = [int(n) for n in un1 if n not in self._rows]
        K, Y, X = self._squares[0].shape
        step = max(1, 2_000_000 // (K * Y * X))
        for s0 in range(0, len(missing), step):
            part = missing[s0:s0 + step]
            P = np.empty((len(part), K, Y, X))  # filled whole (K, Y, X) blocks at a time
            for i, n in enumerate(part):
                P[i] = 1.0 if n == 1 else self._power(n - 1)
            U = np.moveaxis(P, 0, 2) @ self.W                      # (K, Y, part, 5)
            self._rows.update((n, U[:, :, i]) for i, n in enumerate(part))
        return np.stack([self._rows[n] for n in un1], axis=2)

    def node_moments(self, pairs):
        """Fluctuation parts ``Ft = n2 T1 - 1`` and ``Fq = n2 Q - (1 - 1/n1)`` of every
        (n1, n2) row of `pairs` (sorted by n1) at every rho node: one array
        (2, len(pairs), _N_RHO)."""
        pa, pb = pairs[:, 0], pairs[:, 1]
        un1 = np.unique(pa)
        ud, idd = np.unique(pb - pa, return_inverse=True)
        U = self._laplace_sums(un1)                                # (K, Y, N1, 5)
        E = np.exp(ud[:, None] * self.M[None, :])                  # (D, Y): psi^(n2-n1)
        K, Y, N1, _ = U.shape
        U = U.transpose(2, 1, 0, 3).reshape(N1, Y, K * 5)          # per n1: (Y, K * 5)
        R = np.empty((pairs.shape[0], K * 5))
        starts = np.searchsorted(pa, un1)  # one product per run of equal n1 (sorted pairs)
        for i, (lo, hi) in enumerate(zip(starts, [*starts[1:], pa.size])):
            np.matmul(E[idd[lo:hi]], U[i], out=R[lo:hi])
        R = R.reshape(-1, K, 5)
        R *= _QUAD_H * _QUAD_H
        a, b = pa[:, None], pb[:, None]
        T1 = a * R[..., 0]
        Q = T1 - a * (R[..., 1] + R[..., 2]) + a * R[..., 3] + a * (a - 1.0) * R[..., 4]
        return np.stack((b * T1 - 1.0, b * Q - (1.0 - 1.0 / a)))


_quadrature = functools.lru_cache(maxsize=8)(_Quadrature)


class _NodeTable:
    """The node moments of one quadrature (`_Quadrature` at ``key``) for the (n1, n2) pairs
    computed so far: their keys (`_pair_keys`, sorted) and tables (2, pairs, _N_RHO), filled
    as calls ask for new pairs."""

    __slots__ = ("key", "keys", "tables")

    def __init__(self, key):
        self.key = key
        self.keys = np.empty(0, np.int64)
        self.tables = np.empty((2, 0, _N_RHO))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.tables.nbytes

    def add(self, pairs, keys):
        """Compute and store the node moments of new pairs (`keys` = ``_pair_keys(pairs)``)."""
        merged = np.concatenate((self.keys, keys))
        order = np.argsort(merged, kind="stable")
        new = _quadrature(*self.key).node_moments(pairs)
        self.keys, self.tables = merged[order], np.concatenate((self.tables, new), axis=1)[:, order]
        self.tables.flags.writeable = False


_NODE_TABLES: collections.OrderedDict = collections.OrderedDict()
_NODE_TABLE_BYTES = [0]


def _pair_keys(pairs):
    """One int64 per (n1, n2) row of a float pair array, ordered as the rows are
    lexicographically (sizes below 2^31)."""
    return pairs[:, 0].astype(np.int64) << 31 | pairs[:, 1].astype(np.int64)


def _node_moments(key, pairs, keys):
    """The node moments of `pairs` at the quadrature `key` (`_Quadrature.node_moments`): the
    tables of its `_NodeTable` (2, stored pairs, _N_RHO) and the position of each row of
    `pairs` in them (None when they hold exactly `pairs`).  Only the pairs the table has not
    met yet are computed; the tables of every key are kept within _MOMENT_CACHE_BYTES (least
    recently used first out).  `keys`: ``_pair_keys(pairs)``, ascending.  A repeated call
    reads the stored values bit for bit; the tables are replaced, not written, when pairs are
    added."""
    node = _NODE_TABLES.get(key)
    if node is None:
        node = _NODE_TABLES[key] = _NodeTable(key)
    _NODE_TABLES.move_to_end(key)
    if node.keys.size == keys.size and np.array_equal(node.keys, keys):
        return node.tables, None
    at = np.searchsorted(node.keys, keys)
    found = at < node.keys.size
    found[found] = node.keys[at[found]] == keys[found]
    if not found.all():
        before = node.nbytes
        node.add(pairs[~found], keys[~found])
        _NODE_TABLE_BYTES[0] += node.nbytes - before
        at = np.searchsorted(node.keys, keys)
        while _NODE_TABLE_BYTES[0] > _MOMENT_CACHE_BYTES and len(_NODE_TABLES) > 1:
            _, old = _NODE_TABLES.popitem(last=False)
            _NODE_TABLE_BYTES[0] -= old.nbytes
    return node.tables, at


def _subset(at, size):
    """The distinct values of the indices `at` (into `size` rows), ascending, and each entry's
    position among them (a presence table: no sort)."""
    seen = np.zeros(size, bool)
    seen[at] = True
    return np.flatnonzero(seen), (np.cumsum(seen) - 1)[at]


def _distinct_pairs(n1, n2):
    """The distinct (n1, n2) pairs in lexicographic order, a float (P, 2) array, and each
    entry's row in it: ``np.unique`` on a pair key, by a presence table when the keys span a
    small range (sizes up to a sequence length)."""
    b = n2.astype(np.int64)
    m = int(b.max()) + 1
    key = n1.astype(np.int64) * m + b
    lo, hi = int(key.min()), int(key.max())
    if hi - lo > 8 * key.size + 1024:
        values, at = np.unique(key, return_inverse=True)
        at = at.ravel()
    else:
        values, at = _subset(key - lo, hi - lo + 1)
        values += lo
    return np.stack(np.divmod(values, m), axis=1).astype(np.float64), at


def _barycentric(r, rho_lo):
    """Barycentric interpolation weights for the Chebyshev-Lobatto nodes, unnormalized: c
    (_N_RHO, len(r)) and their column sums; the interpolant of node values f is
    ``(f @ c) / sums``.  Where r is a node the column is one-hot (sum 1)."""
    nodes, bw = _rho_nodes(rho_lo)
    c = np.subtract(r[None, :], nodes[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(bw[:, None], c, out=c)
        sums = np.add.reduce(c, axis=0)
    hit = np.flatnonzero(~np.isfinite(sums))
    if hit.size:
        c[:, hit] = nodes[:, None] == r[hit]
        sums[hit] = 1.0
    return c, sums


def _interpolate(weights, tables, at):
    """``sum_k C[k, e] table[at[e], k]`` for the entries e of a group and both node tables
    (2, len(pairs), _N_RHO) of `_Quadrature.node_moments`, C the normalized `_barycentric`
    weights."""
    c, sums = weights
    out = np.einsum("ke,tke->te", c, tables.swapaxes(1, 2)[:, :, at])
    out /= sums
    return out


def _groups(v1, v2, live):
    """Split the live entries (a boolean mask; None: every entry) by their exact (v1, v2);
    yields (v1, v2, selection).  0-d variances are one group.

    The variances usually take a few grid values, so groups are split off by comparison (a
    single group covering every entry is selected by a slice, without copies) and np.unique
    sorts only what is left after _PEEL groups.
    """
    if v1.ndim == 0 and v2.ndim == 0:
        yield float(v1), float(v2), slice(None) if live is None else np.flatnonzero(live)
        return
    equal = v1 is v2
    if live is None:
        idx, a, b = None, v1, v2
    else:
        idx = np.flatnonzero(live)
        a = v1[idx]
        b = a if equal else v2[idx]
    for _ in range(_PEEL):
        if a.size == 0:
            return
        same = a == a[0] if equal else (a == a[0]) & (b == b[0])
        if idx is None:
            if same.all():
                yield float(a[0]), float(b[0]), slice(None)
                return
            idx = np.arange(v1.size)
        yield float(a[0]), float(b[0]), idx[same]
        rest = ~same
        idx, a = idx[rest], a[rest]
        b = a if equal else b[rest]
    keys, inv = np.unique(a + 1j * b, return_inverse=True)
    inv = inv.ravel()
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(keys.size + 1))
    for g, key in enumerate(keys):
        yield float(key.real), float(key.imag), idx[order[bounds[g]:bounds[g + 1]]]


def _analytic(n1, n2, sides, rho):
    """(T1, Q) at each (v1, v2) of `sides`; rho a flat array, the variances flat arrays like it
    or 0-d (the same for every entry), n1 and n2 too.  The entries at one exact (v1, v2) form
    a group, one `_Quadrature`; the rho interpolation weights are computed once per rho range
    for every entry, and groups that select the same entries, in different sides, share one
    matrix product when each has a single (n1, n2) pair."""
    fixed = n1.ndim == 0 and n2.ndim == 0
    if fixed:
        a, b = float(n1), float(n2)
        pairs = np.array([[a, b]])
        n1b, n2b, buckets = a, b, (_bucket(a), _bucket(b))
    else:
        n1b, n2b = np.broadcast_to(n1, rho.shape), np.broadcast_to(n2, rho.shape)
        # one pair index and one pair of size buckets (one quadrature per grid variance) for
        # every group of this call; a group reads the node moments of its own pairs from its
        # quadrature's table, which keeps them for the other rows and layers it meets
        many = n2b > 1  # the entries a group can hold (single-key rows keep uniform values)
        if many.any():
            pairs, at_many = _distinct_pairs(n1b[many], n2b[many])
            at_all = np.zeros(rho.shape, np.intp)
            at_all[many] = at_many
            buckets = _bucket(n1b.max()), _bucket(n2b.max())

    def uniform():  # T1 and Q of uniform attention, for every entry
        if fixed:
            return np.full(rho.shape, 1.0 / b), np.full(rho.shape, (1.0 - 1.0 / a) / b)
        return 1.0 / n2b, (1.0 - 1.0 / n1b) / n2b

    keys = _pair_keys(pairs) if fixed or many.any() else None
    out, jobs, ranges = [], {}, {}
    for v1, v2 in sides:
        res = [None, None]  # T1, Q: filled by the groups, uniform-limit values elsewhere
        out.append(res)
        if fixed and b <= 1:
            continue
        if fixed and v1.ndim == 0 and v2.ndim == 0:  # one group, or none
            if not (v1 > 0 or v2 > 0):
                continue
            groups = [(float(v1), float(v2), slice(None))]
        else:
            live = v1 > 0 if v1 is v2 else (v1 > 0) | (v2 > 0)
            if not fixed:
                live = live & (n2b > 1)
            if not live.any():
                continue
            groups = _groups(v1, v2, None if live.all() else live)
        for g1, g2, sel in groups:
            key = "all" if isinstance(sel, slice) else sel.tobytes()
            if key not in ranges:
                r = rho[sel]
                ranges[key] = r, 0.0 if r.min() >= 0 else -1.0
            r, rho_lo = ranges[key]
            if fixed:
                tables, at = _node_moments((g1, g2, *buckets, rho_lo), pairs, keys)
                tables, at = (tables if at is None else tables[:, at]), None
            else:
                a, b, at = n1b[sel], n2b[sel], at_all[sel]
                rows = slice(None)
                if len(pairs) > _WHOLE_PAIR_SET:  # the group's own pairs
                    rows, at = _subset(at, len(pairs))
                tables, stored = _node_moments((g1, g2, *buckets, rho_lo), pairs[rows],
                                               keys[rows])
                if stored is not None:
                    at = stored[at]
            jobs.setdefault((rho_lo, key), (sel, rho_lo, []))[2].append((res, sel, a, b, tables,
                                                                         at))
    weights = {}  # per rho range, over every entry (a group takes its columns)
    for sel, rho_lo, items in jobs.values():
        if rho_lo not in weights:
            weights[rho_lo] = _barycentric(rho, rho_lo)
        c, sums = weights[rho_lo]
        c, sums = c[:, sel], sums[sel]
        single = [item for item in items if item[-1] is None]
        parts = []
        if single:  # one matrix product for every single-pair table of these entries
            fluct = np.concatenate([item[4][:, 0] for item in single]) @ c
            fluct /= sums
            parts = zip(single, fluct[0::2], fluct[1::2])
        others = [(item, *_interpolate((c, sums), item[4], item[5]))
                  for item in items if item[-1] is not None]
        for (res, sel, a, b, _, _), ft, fq in [*parts, *others]:
            t, q = (1.0 + ft) / b, (fq + 1.0 - 1.0 / a) / b
            if isinstance(sel, slice):
                res[:] = t, q
                continue
            if res[0] is None:
                res[:] = uniform()
            res[0][sel], res[1][sel] = t, q
    zero = rho == 0.0
    zero = np.flatnonzero(zero) if zero.any() else None
    if fixed:
        one = slice(None) if n1 == 1 else None
    else:
        one = n1b == 1.0
        one = np.flatnonzero(one) if one.any() else None
    for res in out:
        if res[0] is None:
            res[:] = uniform()
        if zero is not None:  # exact limits
            res[0][zero] = 1.0 / (n2b if fixed else n2b[zero])
        if one is not None:
            res[1][one] = 0.0
    return out


def pair_moments(n1, n2, v1, v2, rho, method="analytic", samples=4096, seed=0):
    """Moments of a pair of softmax rows with Gaussian logits; returns (T1, Q).

    ``T1 = E[sum_{j<=n1} A_j B_j]`` and
    ``Q = E[sum_j A_j B_j (1 - A_j - B_j)] + E[(sum_j A_j B_j)^2]``, where A is
    the softmax of n1 logits of variance v1 and B the softmax of n2 >= n1
    logits of variance v2, the first n1 logit pairs having correlation rho
    (see the module docstring).  All arguments broadcast; float64 out.

    method="analytic": exact double-Laplace representation evaluated by
    trapezoid quadrature (per-entry logits and log Laplace variables) at 13
    Chebyshev nodes in rho, interpolated in rho; fluctuation parts accurate
    to ~1e-4 relative on n1 <= 32000, v <= 3 (module docstring).
    method="mc": Monte Carlo with ``samples`` draws, common random numbers
    across inputs, deterministic given ``seed``.

    Raises ValueError for n1 < 1 or non-integer, n2 < n1, v < 0, |rho| > 1,
    or an unknown method.
    """
    n1, n2, (v1, v2), rho, shape = _validate(n1, n2, (("v1", v1), ("v2", v2)), rho, method)
    n1, n2, v1, v2, rho = (_flat(x, shape) for x in (n1, n2, v1, v2, rho))
    if method == "mc":
        T, Q, _, _ = _mc_moments(n1, n2, v1, v2, rho, samples=samples, seed=seed)
        return T.reshape(shape), Q.reshape(shape)
    [(T, Q)] = _analytic(n1, n2, [(v1, v2)], rho)
    return T.reshape(shape), Q.reshape(shape)


def pair_moments_at(n1, n2, variances, rho):
    """`pair_moments` (analytic) of two rows of equal logit variance v (v1 = v2 = v) for each
    array v of `variances`, at the same n1, n2 and rho: one validation of the sizes and rho,
    and one set of rho interpolation weights per group of entries, serve every variance.
    Returns a list of (T1, Q), one per variance, each in the broadcast shape; the values are
    those of ``pair_moments(n1, n2, v, v, rho)`` up to rounding (single-pair groups of all the
    variances are interpolated by one matrix product)."""
    n1, n2, vs, rho, shape = _validate(n1, n2, [("v", v) for v in variances], rho, "analytic")
    if n1.ndim or n2.ndim:
        n1, n2 = _flat(n1, shape), _flat(n2, shape)
    rho = _flat(rho, shape)
    out = _analytic(n1, n2, [(v, v) for v in (v if v.ndim == 0 else _flat(v, shape) for v in vs)],
                    rho)
    return [(T.reshape(shape), Q.reshape(shape)) for T, Q in out]
