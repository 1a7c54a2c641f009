"""Mean-field maps of multi-head softmax self-attention (standard 1/sqrt(d_head) scaling).

Setting (one head; all heads are iid).  Per-coordinate kernels of queries, keys and values
are ``K_q = s_q^2 d K + b_q^2`` etc. (K the input kernel).  In the limit of large d_head the
logits ``s_ij = q_i . k_j / sqrt(d_head)`` form a centred Gaussian field with
``Cov(s_ij, s_i'j') = K_q(i, i') K_k(j, j')`` (DESIGN.md section 2), independent of the values.

Attention rows are split into their mean and a fluctuation, ``A = Abar + Delta``.  ``Abar`` is
uniform over each row's allowed keys (exact when the logit field is exchangeable over keys).
The fluctuation statistics use the *exchangeable-key approximation*: the key kernel restricted
to the keys a row sees is replaced by a common part (which cancels in the softmax) plus
independent parts of variance ``r_k(S) = n/(n-1) (mean diag K_k - mean K_k)`` over the allowed
set S, so that row i's logits fluctuate with variance ``v_i = K_q(i, i) r_k(S_i)`` and rows
i, i' are correlated with ``rho = K_q(i, i') / sqrt(K_q(i, i) K_q(i', i'))``.  A pair of distinct
rows with different variances (causal masks) is evaluated at the geometric mean of the two;
the moments are interpolated between grid variances (`softmax_moments`) so that few distinct
variances need the quadrature.  Sets are
prefixes (bidirectional: the whole sequence; causal: keys 0..i), so two rows share the keys
of the shorter one, n1 = min(n_i, n_i') of them.  Then, by exchangeability and the sum rule
``sum_j Delta_ij = 0``:

    E[Delta_ij Delta_i'j'] = a(i, i') (delta_jj' - 1/n1)   for j, j' < n1, else 0,
    a = (T1 - 1/n2) / (n1 - 1),      T1 = E[sum_j A_ij A_i'j]       (`softmax.pair_moments`).

Forward:   K_o = Abar K_v Abar^T + a * D_v,   D_v(i, i') = tr K_v|S1 - 1^T K_v|S1 1 / n1,
plus the finite-width term of `gram_fluctuation` (keys and values share their input tokens, so
their realized kernels covary; O(n c) with c the input's fluctuation amplitude, 1/d for iid
tokens and larger deep in a network; also in G_q and in the key and value weight gradients,
`weight_gradient_terms`), and the factor 1 + v of the spread's coherent scale on the terms
quadratic in the token spread (`forward`).
Backward (values):  G_v = Abar^T G_o Abar + sum_ii' a G_o (delta - 1/n1) on S1 x S1.
Backward (queries, keys): with ``g_s_ij = A_ij g_o_i . (v_j - o_i)`` the logit gradient,
    G_q(i, i') = G_o(i, i') [M_q(i, i') + r_v r_k (Q - Q0)],
    G_k(j, j') = sum_ii' G_o K_q (i, i') [M_k(i, i')_jj' + r_v (Q - Q0)/(n1 - 1) (delta - 1/n1)],
where M_q, M_k are the same sums with A replaced by Abar and the actual (positional) kernels
(G_k's second term takes ``K_q (Q - Q0)`` as its expectation over the head's realized query Gram,
the leading 1/d_head correction of `query_gram`; not with RoPE or QK-Norm),
``Q = E[sum_j A_ij A_i'j (1 - A_ij - A_i'j)] + E[(sum_j A_ij A_i'j)^2]`` and
``Q0 = (1 - 1/n1)/n2`` its value at Abar.  Tokens of different sequences have independent
fluctuations, so their blocks keep only the mean-attention terms.

Same-token companion (`kernels`: kernels given that a pair of positions holds the same token).
Every term above that sums over pairs of keys or rows is taken from the unconditioned kernels;
the pair's own entries enter where their weight is not small: a pair of query rows gets a and
Q at its own correlation rho (so G_q too), the sandwiches ``Abar K_v Abar^T`` and
``Abar^T G_o Abar`` the pair's own entries with weight `Mask.own_share`
(``Abar_ii Abar_jj + Abar_ij Abar_ji``: 2/n^2 bidirectional, 1/((i+1)(j+1)) causal), and the
key gradient's centred value kernel the pair's own value-kernel entry with its exact weight
(`_key_term_own_share`; ``1 - 2/n + 2/n^2`` bidirectional).  Dropped: the pair's own entries
in the logit moments, in the query gradient's mean term and in the key gradient's sum over
query pairs (weight ~1/(n1 n2) each: tests/test_theory_same_token.py checks the rest against
the maps with one pair conditioned), and the correlation of the two keys' attention columns
(the exchangeable-key approximation applied to the pair).  In cross-attention the queries'
companion (decoder tokens) and the keys' and values' (encoder tokens) are different events:
neither reads the other's entries.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from normfield.data import rope_angles
from normfield.theory.kernels import Blocks, pair_sum
from normfield.theory.maps import Point, norm_backward, norm_forward
from normfield.theory.query_gram import expected_overlap_product
from normfield.theory.softmax import pair_moments, pair_moments_at


@dataclass(frozen=True)
class Mask:
    """Allowed keys of each query: the prefix 0..row_len[i]-1; every row the whole sequence
    (bidirectional) or rows of distinct lengths (causal: 1..n)."""

    row_len: np.ndarray  # (n,) ints
    mean: np.ndarray  # (n, n): Abar

    @staticmethod
    def build(kind: str, n: int) -> "Mask":
        if kind == "causal":
            row_len = np.arange(1, n + 1)
        else:
            row_len = np.full(n, n)
        allowed = np.arange(n)[None, :] < row_len[:, None]
        return Mask(row_len, allowed / row_len[:, None])

    @cached_property
    def full(self) -> bool:
        """Every query sees every key (bidirectional): Abar = 1 1^T / n."""
        return bool(np.all(self.row_len == self.row_len.shape[0]))

    @staticmethod
    def _column_means(x: np.ndarray) -> np.ndarray:
        """``x.mean(axis=-2)`` (the same sum and division) broadcast to x's shape, without
        np.mean's Python-level overhead."""
        return np.broadcast_to(np.add.reduce(x, axis=-2)[..., None, :] / x.shape[-2], x.shape)

    def left(self, x: np.ndarray) -> np.ndarray:
        """``Abar @ x`` in O(n^2): row i is the mean of the first row_len[i] rows of x (x an
        (n, n) matrix or a stack of them, like every product below); causal rows are the
        prefixes 1..n, so these means are the running means down the rows."""
        if self.full:
            return self._column_means(x)
        out = np.cumsum(x, axis=-2)
        return np.divide(out, self.row_len[:, None], out=out)

    def left_t(self, x: np.ndarray) -> np.ndarray:
        """``Abar.T @ x`` in O(n^2): row j sums x_i / row_len[i] over the rows i that see key j."""
        n = x.shape[-2]
        if self.full:
            return self._column_means(x)
        by_len = np.zeros(x.shape[:-2] + (n + 1, x.shape[-1]))
        by_len[..., self.row_len, :] = x / self.row_len[:, None]  # the row lengths are distinct
        return np.cumsum(by_len[..., ::-1, :], axis=-2)[..., ::-1, :][..., 1:, :]

    def sandwich(self, x: np.ndarray) -> np.ndarray:
        """``Abar @ x @ Abar.T`` (a new array)."""
        if self.full:
            return self._full_sandwich(x)
        return self.left(self.left(x).swapaxes(-1, -2)).swapaxes(-1, -2)

    def sandwich_t(self, x: np.ndarray) -> np.ndarray:
        """``Abar.T @ x @ Abar`` (a new array)."""
        if self.full:
            return self._full_sandwich(x)
        return self.left_t(self.left_t(x).swapaxes(-1, -2)).swapaxes(-1, -2)

    @staticmethod
    def _full_sandwich(x: np.ndarray) -> np.ndarray:
        """Both products for Abar = 1 1^T / n: every entry is the mean of the column means,
        summed in order (as the column-means of the broadcast column means sum)."""
        n = x.shape[-1]
        grand = np.cumsum(np.add.reduce(x, axis=-2) / n, axis=-1)[..., -1] / n
        out = np.empty(x.shape)
        out[...] = grand[..., None, None]
        return out

    @cached_property
    def _pair_sets(self):
        a, b = self.row_len[:, None], self.row_len[None, :]
        n1, n2 = np.minimum(a, b), np.maximum(a, b)
        n1.flags.writeable = n2.flags.writeable = False
        return n1, n2

    def pair_sets(self):
        """(n1, n2) for every pair of rows: shared and larger prefix lengths (read-only)."""
        return self._pair_sets

    @cached_property
    def own_share(self) -> np.ndarray:
        """``Abar_ii Abar_jj + Abar_ij Abar_ji``: the weight of the entries (i, j) and (j, i) of
        a kernel in the entry (i, j) of ``Abar K Abar^T`` (and of ``Abar^T K Abar``); 2/n^2
        when every row sees the whole sequence, 1/((i+1)(j+1)) (i != j) for causal rows; on
        the diagonal ``Abar_ii^2`` (one entry)."""
        a = self.mean
        out = np.outer(np.diag(a), np.diag(a)) + a * a.T
        np.fill_diagonal(out, np.diag(a) ** 2)  # (i, i) of the across block: a single entry
        out.flags.writeable = False
        return out


class _RowPairs:
    """The pairs i <= i' of n rows, for maps symmetric in the two rows: `upper` takes them from
    (..., n, n) arrays (scalars pass through), `full` fills both triangles back.  One per n
    (`_row_pairs`)."""

    def __init__(self, n: int):
        self.n = n
        rows, cols = np.triu_indices(n)
        # flat positions of (i, i') and (i', i): one-axis indexing is several times faster
        # than indexing with the (rows, cols) pair
        self.upper_at, self.lower_at = rows * n + cols, cols * n + rows
        self.upper_at.flags.writeable = self.lower_at.flags.writeable = False  # shared per n

    def upper(self, x):
        if np.ndim(x) < 2:
            return x
        return x.reshape(x.shape[:-2] + (self.n * self.n,))[..., self.upper_at]

    def full(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(x.shape[:-1] + (self.n * self.n,))
        out[..., self.upper_at] = x
        out[..., self.lower_at] = x
        return out.reshape(x.shape[:-1] + (self.n, self.n))


@functools.lru_cache(maxsize=8)
def _row_pairs(n: int) -> _RowPairs:
    return _RowPairs(n)


LOG_STEP = 0.05
V_FLOOR = 1e-3


def softmax_moments(n1, n2, v, rho, method: str = "analytic"):
    """`softmax.pair_moments` for two rows of equal logit variance v, interpolated between
    grid variances: linearly in log v on a 5% grid (so that layers, rows and calls share a
    few cached evaluations; the interpolation error is ~(0.05^2/8) |d^2 f/d(log v)^2|, below
    1e-3 of the fluctuation parts), and linearly in v between 0 (exact uniform limit) and
    1e-3, where the fluctuation parts are linear in v.  ``method="mc"`` is not interpolated.
    The analytic range (`softmax.V_MAX`, 30) bounds the upper grid variance, so v itself may
    reach the largest grid variance within it, ``exp(68 LOG_STEP)`` = 29.96; beyond it the
    ValueError names the grid variance (31.5).  The key gradient's realized-Gram term
    (`query_gram`) also reads v one grid step up, so attention logit variances up to
    ``exp(67 LOG_STEP)`` = 28.5 stay within it."""
    return softmax_moments_stepped(n1, n2, v, [(rho, (0,))], method)[0][0]


def softmax_moments_stepped(n1, n2, v, blocks, method: str = "analytic"):
    """`softmax_moments` at several points ``(v exp(j LOG_STEP), rho)``: `blocks` is a list of
    (rho, steps), steps integers j; returns, per block, the list of (T1, Q) at its steps.

    The grid variances of all the points (step j's upper one is step j+1's lower one) are
    evaluated once each, on the entries of every block, in one `softmax.pair_moments_at` call:
    one validation and one set of rho interpolation weights serve every point."""
    v = np.asarray(v, float)
    steps = sorted({j for _, js in blocks for j in js})
    scaled = {j: v * np.exp(j * LOG_STEP) if j else v for j in steps}
    if method == "mc":
        return [[pair_moments(n1, n2, scaled[j], scaled[j], rho, method=method) for j in js]
                for rho, js in blocks]
    cells = {j: _grid_cell(scaled[j]) for j in steps}
    nodes: list = []  # the distinct grid-variance arrays

    def node(x):
        for i, y in enumerate(nodes):
            if x is y or (x.shape == y.shape and np.array_equal(x, y)):
                return i
        nodes.append(x)
        return len(nodes) - 1

    at = {j: (node(lo), node(hi)) for j, (_, lo, hi) in cells.items()}
    if len(blocks) == 1:
        parts = [pair_moments_at(n1, n2, nodes, blocks[0][0])]
    else:  # the blocks' entries one after another: arrays flattened and repeated per block
        shape = np.broadcast_shapes(np.shape(n1), np.shape(n2), v.shape,
                                    *(np.shape(r) for r, _ in blocks))
        size = math.prod(shape)

        def repeated(x):
            x = np.asarray(x, float)
            if x.ndim == 0:
                return x
            return np.concatenate([np.broadcast_to(x, shape).ravel()] * len(blocks))

        rho = np.concatenate([np.broadcast_to(r, shape).ravel() for r, _ in blocks])
        tq = pair_moments_at(repeated(n1), repeated(n2), [repeated(x) for x in nodes], rho)
        parts = [[(t[b * size:(b + 1) * size].reshape(shape),
                   q[b * size:(b + 1) * size].reshape(shape)) for t, q in tq]
                 for b in range(len(blocks))]
    out = []
    for part, (_, js) in zip(parts, blocks):
        row = []
        for j in js:
            (w, _, _), (lo, hi) = cells[j], at[j]
            row.append(((1 - w) * part[lo][0] + w * part[hi][0],
                        (1 - w) * part[lo][1] + w * part[hi][1]))
        out.append(row)
    return out


def _grid_cell(v: np.ndarray):
    """``(w, v_lo, v_hi)``: v's interpolation weight and the grid variances around it
    (`softmax_moments`); below V_FLOOR the cell is [0, V_FLOOR], linear in v."""
    small = v < V_FLOOR
    scaled = np.log(np.maximum(v, V_FLOOR)) / LOG_STEP
    k = np.floor(scaled)
    w = scaled - k
    k0, k1 = k.min(), k.max()
    if np.isfinite(k0) and np.isfinite(k1):
        # exp(k * LOG_STEP) for the few distinct grid indices k, looked up (the same values);
        # a single grid cell gives 0-d variances
        grid = np.exp(np.arange(int(k0), int(k1) + 2) * LOG_STEP)
        if k0 == k1:
            v_lo, v_hi = grid[0, None].reshape(()), grid[1, None].reshape(())
        else:
            at = (k - k0).astype(np.intp)
            v_lo, v_hi = grid[at], grid[at + 1]
    else:  # NaN variances: left to pair_moments_at to report
        v_lo, v_hi = np.exp(k * LOG_STEP), np.exp((k + 1) * LOG_STEP)
    if small.any():
        w = np.where(small, v / V_FLOOR, w)
        v_lo = np.where(small, 0.0, v_lo)
        v_hi = np.where(small, V_FLOOR, v_hi)
    return w, v_lo, v_hi


def prefix_spread(k: np.ndarray) -> np.ndarray:
    """For every prefix length m = 1..n: ``tr K[:m,:m] - sum K[:m,:m] / m`` (index m-1).

    Clamped at 0: the spread of a positive semi-definite kernel is >= 0, but for collapsed
    tokens (deep Post-LN, K = c + eps E) rounding can leave it slightly negative, which would
    make logit variances negative (NaN downstream)."""
    m = np.arange(1, k.shape[0] + 1)
    trace = np.cumsum(np.diag(k))
    total = np.cumsum(np.cumsum(k, axis=0), axis=1)[m - 1, m - 1]
    return np.maximum(trace - total / m, 0.0)


def independent_variance(k: np.ndarray) -> np.ndarray:
    """r(S) = n/(n-1) (mean diag - mean) over each prefix S (0 for a single key)."""
    return _per_extra_key(prefix_spread(k), np.arange(1, k.shape[0] + 1))


def _per_extra_key(x, m):
    """``x / (m - 1)`` where m > 1, else 0, for set sizes m (an array, or an integer)."""
    if isinstance(m, int):
        return x / (m - 1) if m > 1 else np.zeros_like(x)
    return np.where(m > 1, x / np.maximum(m - 1, 1), 0.0)


def _whole_spread(k: np.ndarray) -> float:
    """``prefix_spread(k)[-1]`` (the whole sequence), summed in the same order."""
    spread = np.cumsum(np.diag(k))[-1] - np.cumsum(np.add.reduce(k, axis=0))[-1] / k.shape[0]
    return max(spread, 0.0)


def _spread_by_set(weights: np.ndarray, n1) -> np.ndarray:
    """``sum_{ii'} weights(i, i') (delta_jj' - 1/n1) 1[j, j' < n1(i, i')]`` as an (n, n) matrix;
    n1 an (n, n) array, or the integer n when every pair shares the whole sequence."""
    n = weights.shape[0]
    if isinstance(n1, int):  # the same values as below: only set size n has weight
        total = np.cumsum(weights.ravel())[-1]
        out = np.full((n, n), 0.0 - total / n)
        out.reshape(-1)[::n + 1] = total - total / n
        return out
    w_m = np.bincount((n1 - 1).ravel(), weights=weights.ravel(), minlength=n)  # by set size m+1
    suffix = np.cumsum(w_m[::-1])[::-1]  # sum over sets containing index j: m >= j
    u = np.cumsum((w_m / np.arange(1, n + 1))[::-1])[::-1]
    idx = np.arange(n)
    return np.diag(suffix) - u[np.maximum(idx[:, None], idx[None, :])]


def _double_centred(k: np.ndarray) -> np.ndarray:
    """``k`` minus its row means and column means plus its grand mean (over the last two axes:
    k may be a stack of matrices)."""
    return k - _mean(k, -1) - _mean(k, -2) + _mean(k, (-2, -1))


def _mean(x: np.ndarray, axis) -> np.ndarray:
    """``x.mean(axis, keepdims=True)`` (the same sum and division) without np.mean's
    Python-level overhead."""
    count = math.prod(x.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
    return np.add.reduce(x, axis=axis, keepdims=True) / count


def _clip_unit(x: np.ndarray) -> np.ndarray:
    """``np.clip(x, -1, 1)`` (the same values, NaN kept) without its Python-level overhead."""
    return np.minimum(np.maximum(x, -1.0), 1.0)


def _t(x: np.ndarray) -> np.ndarray:
    """Transpose of a matrix or of every matrix in a stack."""
    return x.swapaxes(-1, -2)


def _mean_query_term(mask: Mask, kk, kv):
    """sum_jj' Abar_ij Abar_i'j' K_k(j,j') Cov_v(ij, i'j') with
    Cov_v = K_v(j,j') - (K_v Abar^T)(j,i') - (Abar K_v)(i,j') + (Abar K_v Abar^T)(i,i')
    (kk, kv: matrices or stacks of them).
    Bidirectional (Abar = 1 1^T / n): ``mean(K_k * D(K_v)) = mean(D(K_k) * D(K_v))`` for every
    (i, i'), D the double centring (D(K_v) has zero row and column sums); centring both first
    keeps near-collapsed kernels (K = c + eps E) free of cancellation: the term is O(eps^2)."""
    if mask.full:
        term = _mean(_double_centred(kk) * _double_centred(kv), (-2, -1))
        return np.broadcast_to(term, kk.shape).copy()
    x, y = _t(mask.left(_t(kv))), mask.left(kv)  # K_v Abar^T, Abar K_v
    kk_r, kk_l = _t(mask.left(_t(kk))), mask.left(kk)  # K_k Abar^T, Abar K_k
    return (mask.sandwich(kk * kv) - mask.left(x * kk_r) - _t(mask.left(_t(y * kk_l)))
            + mask.sandwich(kv) * mask.sandwich(kk))


def _mean_key_term(mask: Mask, w, kv):
    """sum_ii' W(i,i') Abar_ij Abar_i'j' Cov_v(ij, i'j') as an (n, n) matrix over (j, j') (or a
    stack of them).  Bidirectional: ``mean(W) D(K_v)`` (see `_mean_query_term`)."""
    if mask.full:
        return _mean(w, (-2, -1)) * _double_centred(kv)
    x, y = _t(mask.left(_t(kv))), mask.left(kv)
    wa = _t(mask.left_t(_t(w)))  # W Abar
    atw = mask.left_t(w)  # Abar^T W
    return (mask.sandwich_t(w) * kv - _t(mask.left_t(_t(atw * x))) - mask.left_t(wa * y)
            + mask.sandwich_t(w * mask.sandwich(kv)))


def _key_term_own_share(mask: Mask, w: np.ndarray) -> np.ndarray:
    """The weight of a kernel's entries (j, j') and (j', j) (one entry if j = j') in the entry
    (j, j') of ``_mean_key_term(mask, w, K)``, which is linear in K (w an (n, n) matrix or a
    stack).  With ``A2 = Abar * Abar`` (elementwise) and ``L_i`` the keys row i sees, term by
    term of `_mean_key_term`:

        Abar^T W Abar - (Abar^T W) A2 - A2^T (W Abar) + A2^T W A2 + [j != j'] S(max(j, j')),
        S(m) = sum over rows i, i' with L_i, L_i' > m of W(i, i') / (L_i^2 L_i'^2),

    the last from ``Abar_ij Abar_ij' = 1[max(j, j') < L_i] / L_i^2``; for a full mask
    ``mean(W) (1 - 2/n + 2/n^2)`` off the diagonal and ``mean(W) (1 - 1/n)^2`` on it."""
    n = mask.mean.shape[0]
    if mask.full:
        share = np.empty(w.shape)
        share[...] = _mean(w, (-2, -1)) * (1.0 - 2.0 / n + 2.0 / n ** 2)
        share[..., np.arange(n), np.arange(n)] = _mean(w, (-2, -1))[..., 0] * (1.0 - 1.0 / n) ** 2
        return share
    a = mask.mean
    a2 = a * a
    share = mask.sandwich_t(w) - mask.left_t(w) @ a2 - a2.T @ (w @ a) + a2.T @ w @ a2
    lens = mask.row_len.astype(float)
    order = np.argsort(lens, kind="stable")
    r = (w / (lens[:, None] ** 2 * lens[None, :] ** 2))[..., order, :][..., :, order]
    tail = np.cumsum(np.cumsum(r[..., ::-1, ::-1], axis=-2), axis=-1)[..., ::-1, ::-1]
    square = np.concatenate((np.diagonal(tail, axis1=-2, axis2=-1),
                             np.zeros(tail.shape[:-2] + (1,))), axis=-1)
    rows_beyond = np.searchsorted(lens[order], np.arange(n), side="right")  # first L > m
    idx = np.arange(n)
    pair_term = square[..., rows_beyond][..., np.maximum(idx[:, None], idx[None, :])]
    pair_term[..., idx, idx] = 0.0
    return share + pair_term


@dataclass(frozen=True)
class Rotary:
    """RoPE (Su et al. 2021) as seen by the logit field: with R(D) = (2/d_head) sum_f
    cos(theta_f D), ``Cov(s_ij, s_i'j') = K_q(i,i') K_k(j,j') R((j - j') - (i - i'))``, written
    as ``sum_f w [cos_f(j-j') cos_f(i-i') + sin_f(j-j') sin_f(i-i')]`` so that every mean term
    stays a sum of products of n x n matrices.  Without RoPE: one term, cos = 1, sin = 0
    (`identity`)."""

    cos: np.ndarray  # (F, n, n): cos(theta_f (a - b))
    sin: np.ndarray
    weight: float
    phase: np.ndarray  # (F, n): theta_f a, so that cos_f(a - b) = cos(phase_a - phase_b)

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def build(n: int, d_head: int | None) -> "Rotary":
        """The rotation for n positions (cached; its arrays are read-only)."""
        if d_head is None:
            rot = Rotary(np.ones((1, n, n)), np.zeros((1, n, n)), 1.0, np.zeros((1, n)))
        else:
            theta = rope_angles(2, d_head)[1]  # theta_f (the angles of position 1)
            delta = np.arange(n)[:, None] - np.arange(n)[None, :]
            angles = theta[:, None, None] * delta[None]
            rot = Rotary(np.cos(angles), np.sin(angles), 2.0 / d_head,
                         theta[:, None] * np.arange(n)[None, :])
        rot.cos.flags.writeable = rot.sin.flags.writeable = rot.phase.flags.writeable = False
        return rot

    @cached_property
    def identity(self) -> bool:
        """No rotation: `toeplitz` is all ones and `modulated` is the term itself."""
        return self.weight == 1.0 and self.cos.shape[0] == 1 and not self.sin.any() \
            and bool(np.all(self.cos == 1.0))

    @cached_property
    def toeplitz(self) -> np.ndarray:
        """R(a - b) as an (n, n) matrix (read-only)."""
        out = self.weight * self.cos.sum(axis=0)
        out.flags.writeable = False
        return out

    def modulated(self, term, kernel: np.ndarray) -> np.ndarray:
        """``sum_f w [cos_f * term(kernel * cos_f) + sin_f * term(kernel * sin_f)]``: the
        rotation modulates the kernel inside a linear `term` and the term's result; with no
        rotation this is ``term(kernel)``."""
        if self.identity:
            return term(kernel)
        out = 0.0
        for c, s in zip(self.cos, self.sin):
            out = out + c * term(kernel * c)
            if s.any():
                out = out + s * term(kernel * s)
        return self.weight * out

    def apply(self, kernel: np.ndarray) -> np.ndarray:
        """``kernel * toeplitz`` (the kernel itself without rotation)."""
        return kernel if self.identity else kernel * self.toeplitz


@dataclass
class AttentionState:
    """What the backward pass needs from the forward pass."""

    kq: Blocks  # query / key kernels entering the logits (after QK-Norm)
    kk: Blocks
    kv: Blocks
    a_fluct: np.ndarray  # a(i, i')
    q_fluct: np.ndarray  # Q - Q0
    key_fluct: np.ndarray  # the key gradient's E[Qhat (Q - Q0)] (`query_gram`)
    rv: np.ndarray  # r_v over the shared set of each pair
    rk: np.ndarray
    n1: np.ndarray
    raw_q: Blocks | None = None  # before QK-Norm
    raw_k: Blocks | None = None
    gram: Blocks | None = None  # `gram_fluctuation` of the key/value input (output, G_q, W_v)
    gram_k: Blocks | None = None  # its version for the key weight gradient
    s_k: float = 0.0  # key and value kernels per unit of input kernel
    s_v: float = 0.0
    coherent: float = 0.0  # relative variance of the input spread's common scale
    q_fluct_same: np.ndarray | None = None  # Q - Q0 of same-token query pairs (companion)
    cross: bool = False  # queries and keys/values from different streams (cross-attention)


@dataclass(frozen=True)
class HeadSpec:
    """Per-head options: d_head, RoPE, QK-Norm (RMS-normalized queries and keys, gain 1; with
    the usual 1/sqrt(d_head) scale, or Henry et al. 2020's logits = temperature * cos(q, k)) and
    the norm epsilon."""

    d_head: int
    rope: bool = False
    qk_norm: bool = False
    eps: float = 1e-5
    temperature: float | None = None

    @property
    def query_scale_sq(self) -> float:
        """Square of the factor on the normalized queries: logits = g cos(q, k) = (g/sqrt(d_head))
        q^ . k^ / sqrt(d_head) with RMS-normalized q^, k^ (1 without a temperature)."""
        return 1.0 if self.temperature is None else self.temperature ** 2 / self.d_head


def _qk_normalize(k: Blocks, spec: HeadSpec) -> Blocks:
    return norm_forward(Point(k, k.zeros(), spec.d_head), "rmsnorm", spec.eps).k


def _qk_norm_backward(raw: Blocks, normed: Blocks, g: Blocks, spec: HeadSpec) -> Blocks:
    zero = raw.zeros()
    return norm_backward(Point(raw, zero, spec.d_head), Point(normed, zero, spec.d_head), g,
                         "rmsnorm", spec.eps)


def gram_fluctuation(mask: Mask, kx: Blocks, fluct: float, rot: Rotary | None = None):
    """Covariance of the keys' and values' realized kernels through their shared input.

    Keys and values are projections of the same input tokens x, so their realized (per-head,
    per-seed) kernels fluctuate together: with Gaussian inputs of iid coordinates,
    ``Cov(x_a.x_b/d, x_c.x_e/d) = (K(a,c) K(b,e) + K(a,e) K(b,c)) / d``.  Every attention term
    that multiplies a key kernel by a value kernel and sums over key pairs (j, j') (the
    fluctuation of the output, the query-gradient mean term, the key and value weight
    gradients) then gains ``s_k s_v C(i, i')`` with
    ``C = (t t^T + B(K, K)) / d``, ``t(i) = sum_j Abar_ij K(j, j) - (Abar K Abar^T)(i, i)``
    (the spread of the keys row i sees) and ``B = _mean_query_term``.  Relative to the terms
    kept it is ``n/d`` for nearly orthogonal tokens (n keys): the off-diagonal fluctuations
    of the n^2 key pairs add up coherently, so it is the leading finite-width correction of
    the attention maps (0.125 at n = 32, d = 256).  Across sequences t is the same and B
    uses the across block.  In the output fluctuation and the value gradient it enters to
    first order in the logit variance (``Delta A_ij ~ (s_ij - sbar_i) / n``).

    With RoPE (`rot`) the covariance is weighted by the logit field's rotation factor
    ``R((c - e) - (i - i'))`` of the key pair (c, e) that the logits see; the sum is
    ``w sum_f [cos_f(i-i') C(cos_f) + sin_f(i-i') C(sin_f)]`` with
    ``C(P) = tau P tau^T + S(P)``, ``tau = Abar * (diag K - Abar K)`` and S the second
    contraction, evaluated through the separable forms ``cos_f(c - e) = cos cos + sin sin``
    (`_rotated_pair_term`).  The rotation weights the contracted key pair in the output,
    G_q and the value gradient, but the positions of the key gradient in the key weight
    gradient: so two kernels are returned, (C for the output, G_q and W_v; C for W_k), the
    same object twice without RoPE.

    `fluct`: the amplitude of that covariance, ``1/d`` for iid coordinates; deep in a network
    the realized kernel fluctuates more (`fluctuation`, carried through the blocks by the
    interpreter), and every 1/d above reads `fluct`.

    Approximations: the covariance is taken in the pairing form with one matched amplitude
    (`fluctuation.embedding` matches it on this very sum for the embedding, where token
    collisions and deterministic positions make other shapes); QK-Norm rescales the key
    kernel by its mean normalization.  Token collisions enter as this covariance only: a pair
    of keys holding the same token also has a third moment in the query and key gradients'
    fluctuation parts (logit, key and value correlations of the pair at once), not derived;
    with uniform tokens it leaves attn.q and attn.k low by 4-6% per unit of n p_c up to 2;
    Zipfian tokens, whose collisions gather on a few tokens, do not follow n p_c (README,
    "Validation").
    Checks:
    ``tests/test_theory_attention_finite_width.py`` (MC at n/d = 1/8; the RoPE forms against
    their definition summed term by term)."""
    if rot is None and mask.full:  # t a scalar, B = mean(D(K)^2) per block (both at once)
        dk = _double_centred(kx.a)
        t = float(np.add.reduce(kx.diag) / kx.diag.size) - _mean(kx.w, (-2, -1)).item()
        c = Blocks.of(np.broadcast_to(t * t + _mean(dk * dk, (-2, -1)), kx.a.shape) * fluct)
        return c, c
    if rot is None:
        t = mask.left(np.diag(kx.w)[:, None])[:, 0] - np.diag(mask.sandwich(kx.w))
        tt = np.outer(t, t)
        c = Blocks(tt + _mean_query_term(mask, kx.w, kx.w),
                   tt + _mean_query_term(mask, kx.c, kx.c)) * fluct
        return c, c
    tau = mask.mean * (np.diag(kx.w)[None, :] - mask.left(kx.w))
    blocks = [_rotated_pair_term(mask, tau, k, rot) for k in (kx.w, kx.c)]
    (ce_w, jj_w), (ce_c, jj_c) = blocks
    scale = rot.weight * fluct
    return Blocks(ce_w, ce_c) * scale, Blocks(jj_w, jj_c) * scale


def _rotated_pair_term(mask: Mask, tau: np.ndarray, k: np.ndarray, rot: Rotary):
    """``sum_f [cos_f(i-i') C(cos_f) + sin_f(i-i') C(sin_f)]`` with the weight on the
    contracted key pair and with the weight on the key positions (see `gram_fluctuation`;
    without the factor w/d)."""
    def rotated(second):
        out = 0.0
        for cos_m, sin_m, phase in zip(rot.cos, rot.sin, rot.phase):
            cv, sv = np.cos(phase), np.sin(phase)
            out = out + cos_m * (tau @ cos_m @ tau.T + second(mask, k, cv, cv)
                                 + second(mask, k, sv, sv))
            out = out + sin_m * (tau @ sin_m @ tau.T + second(mask, k, sv, cv)
                                 - second(mask, k, cv, sv))
        return out

    return rotated(_second_contracted), rotated(_second_positions)


def _second_contracted(mask: Mask, k: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_jj' Abar_ij Abar_i'j' sum_ce u_ij(c) u_i'j'(e) a(c) b(e) K(c,j') K(e,j)`` with
    ``u_ij = e_j - Abar_i``; ``_mean_query_term(mask, K, K)`` for a = b = 1."""
    ka, kb = a[:, None] * k, b[:, None] * k
    return (mask.sandwich(ka * kb.T) - mask.left(mask.left(kb).T * mask.left(ka.T).T)
            - mask.left((mask.left(ka) * mask.left(kb.T)).T).T
            + mask.sandwich(ka) * mask.sandwich(kb).T)


def _second_positions(mask: Mask, k: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_jj' Abar_ij a(j) Abar_i'j' b(j') (K u_ij)_j' (K u_i'j')_j``;
    ``_mean_query_term(mask, K, K)`` for a = b = 1."""
    aa, ab, ak = mask.mean * a[None, :], mask.mean * b[None, :], mask.left(k)
    return (aa @ (k * k) @ ab.T - aa @ (ak.T * (k @ ab.T)) - (ak * (aa @ k)) @ ab.T
            + (ak @ ab.T) * (aa @ ak.T))


def forward(kx: Blocks, mask: Mask, var_q, var_k, var_v, width: int, bias_var=(0.0, 0.0, 0.0),
            method: str = "analytic", spec: HeadSpec | None = None,
            kx_memory: Blocks | None = None, fluct: float | None = None,
            coherent: float = 0.0):
    """Kernel of the concatenated head outputs, and the state for `backward`.

    var_* are the weight variances of W_q, W_k, W_v (fan-in `width`), bias_var their biases'.
    With `kx_memory` (cross-attention) the keys and values come from the memory tokens (kernel
    `kx_memory`, as many tokens as queries) and the queries from `kx`; the logit field is then
    ``Cov(s_ij, s_i'j') = K_q(i, i') K_k(j, j')`` with K_q from the queries' stream and K_k from
    the memory, and everything below holds unchanged (W_q and W_k are independent, so the
    cross-kernel between the two streams does not enter at this order).  `fluct`: the amplitude
    of the key/value input's realized-kernel covariance (`gram_fluctuation`; default 1/width).
    `coherent`: the relative variance v of the input spread's common scale across draws
    (`fluctuation.coherent`): the terms quadratic in the token spread (the output's logit
    fluctuation and realized-Gram terms here, G_q in `backward`, the key weight gradient in
    the interpreter) are expectations of a squared scale, ``E[S^2] = (1 + v) E[S]^2``."""
    spec = spec or HeadSpec(d_head=width)
    n = kx.w.shape[0]
    kx_kv = kx if kx_memory is None else kx_memory
    done = {}

    def project(src, var, bias):  # the kernel of src @ W + b (one per distinct projection)
        key = (id(src), var, float(bias))
        if key not in done:
            done[key] = src * (var * width) + float(bias) if bias else src * (var * width)
        return done[key]

    kq = project(kx, var_q, bias_var[0])
    kk = project(kx_kv, var_k, bias_var[1])
    kv = project(kx_kv, var_v, bias_var[2])
    raw_q = raw_k = None
    if spec.qk_norm:
        raw_q, raw_k = kq, kk
        kq, kk = _qk_normalize(kq, spec) * spec.query_scale_sq, _qk_normalize(kk, spec)
    rot = Rotary.build(n, spec.d_head if spec.rope else None)
    if mask.full:  # every pair of rows shares the whole sequence: per-set values are scalars
        n1 = n2 = n
        spread_v = _whole_spread(kv.w)
        shared = kk is kv and rot.identity
        rk = rk_rows = _per_extra_key(spread_v if shared else _whole_spread(rot.apply(kk.w)), n)
        rv = _per_extra_key(spread_v, n)
    else:
        n1, n2 = mask.pair_sets()
        m = np.arange(1, n + 1)
        spread_v_set = prefix_spread(kv.w)
        rk_set = _per_extra_key(prefix_spread(rot.apply(kk.w)), m)
        rv_set = _per_extra_key(spread_v_set, m)
        rk_rows, rk, rv, spread_v = (rk_set[mask.row_len - 1], rk_set[n1 - 1], rv_set[n1 - 1],
                                     spread_v_set[n1 - 1])
    row_var = kq.diag * rk_rows
    qd = np.sqrt(kq.diag)
    qd_pairs = np.maximum(qd[:, None] * qd[None, :], 1e-300)
    v_pairs = np.sqrt(row_var[:, None] * row_var[None, :])

    # the pair moments are symmetric in the two rows: evaluated on the pairs i <= i' only
    pairs = _row_pairs(n)
    n1_u, n2_u, v_u = pairs.upper(n1), pairs.upper(n2), pairs.upper(v_pairs)
    q0 = (1.0 - 1.0 / n1_u) / n2_u

    def rho_of(kq_within):
        return pairs.upper(_clip_unit(rot.apply(kq_within) / qd_pairs))

    def moments(kq_within):  # a and Q - Q0 of the row pairs, from their query kernel
        t1, q = softmax_moments(n1_u, n2_u, v_u, rho_of(kq_within), method)
        return pairs.full(_per_extra_key(t1 - 1.0 / n2_u, n1_u)), pairs.full(q - q0)

    a_same = q_same = None
    if kq.same is None:
        a_fluct, q_fluct = moments(kq.w)
    else:  # same-token query pairs (`kernels`): their own a and Q, one call for both
        (a_fluct, a_same), (q_fluct, q_same) = moments(kq.a[0::2])
    if rot.identity and not spec.qk_norm:  # Q - Q0 times the realized query Gram (`query_gram`)
        key_fluct = qd_pairs * pairs.full(expected_overlap_product(
            lambda blocks: [[q - q0 for _, q in row] for row in
                            softmax_moments_stepped(n1_u, n2_u, v_u, blocks, method)],
            rho_of(kq.w), spec.d_head, LOG_STEP))
    else:
        key_fluct = kq.w * q_fluct
    gram, gram_k = gram_fluctuation(mask, kx_kv.main, 1.0 / width if fluct is None else fluct,
                                    None if rot.identity else rot)
    s_k, s_v = var_k * width, var_v * width
    if spec.qk_norm:
        s_k *= np.mean(kk.diag) / np.mean(raw_k.diag)
    ko = mask.sandwich(kv.a[:2])
    ko[0] += a_fluct * spread_v * (1.0 + coherent)
    if a_same is not None:  # the companion: the sums as above, its own a and share of them
        # (a pair of query positions holding the same token says nothing of the memory tokens
        # at those positions: cross-attention takes the values' unconditioned entries)
        own = 0.0 if kx_memory is not None else mask.own_share * (kv.a[2:] - kv.a[:2])
        ko = np.concatenate((ko, ko + own))
        ko[2] += (a_same - a_fluct) * spread_v * (1.0 + coherent)
        gram, gram_k = gram.with_same(), gram_k.with_same()
    ko += kq.a * gram.a * (s_k * s_v * (1.0 + coherent))
    state = AttentionState(kq, kk, kv, a_fluct, q_fluct, key_fluct, rv, rk, n1, raw_q, raw_k,
                           gram, gram_k, s_k, s_v, coherent, q_same, kx_memory is not None)
    return Blocks.of(ko), state


def backward(go: Blocks, mask: Mask, st: AttentionState, spec: HeadSpec | None = None):
    """Per-coordinate gradient kernels (G_q, G_k, G_v) at the queries, keys and values (before
    QK-Norm), given the gradient kernel G_o at the concatenated head outputs (for
    cross-attention G_k and G_v live on the memory tokens)."""
    spec = spec or HeadSpec(d_head=go.w.shape[0])
    rot = Rotary.build(go.w.shape[0], spec.d_head if spec.rope else None)
    gv = mask.sandwich_t(go.a[:2])
    gv[0] += _spread_by_set(st.a_fluct * go.w, st.n1)
    wk = go.a[:2] * st.kq.a[:2]
    kv, kk = st.kv.a[:2], st.kk.a[:2]
    if mask.full and rot.identity:  # the bidirectional mean terms, each kernel centred once
        dv = _double_centred(kv)
        gq = np.empty(dv.shape)
        gq[...] = _mean((dv if st.kk is st.kv else _double_centred(kk)) * dv, (-2, -1))
        gk = _mean(wk, (-2, -1)) * dv
    else:
        gq = rot.modulated(lambda k: _mean_query_term(mask, k, kv), kk)
        gk = rot.modulated(lambda w: _mean_key_term(mask, w, kv), wk)
    gk[0] += _spread_by_set(go.w * (_per_extra_key(st.key_fluct, st.n1) * st.rv), st.n1)
    if st.q_fluct_same is not None:
        gq, gk = (np.concatenate((x, x)) for x in (gq, gk))
        # cross-attention: a memory pair holding the same token says nothing of the output
        # gradient at those (query) positions
        own = 0.0 if st.cross else mask.own_share * (go.a[2:] - go.a[:2])
        gv = np.concatenate((gv, gv + own))
        gq[2] += st.rv * st.rk * (st.q_fluct_same - st.q_fluct)
        dkv = st.kv.a[2:] - kv
        gk[2:] += rot.modulated(lambda w: _key_term_own_share(mask, w) * dkv, wk)
    gq[0::2] += st.rv * st.rk * st.q_fluct
    gq += st.gram.a * (st.s_k * st.s_v)
    gq *= go.a * (1.0 + st.coherent)
    gq, gk, gv = Blocks.of(gq), Blocks.of(gk), Blocks.of(gv)
    if spec.qk_norm:
        c2 = spec.query_scale_sq
        gq = _qk_norm_backward(st.raw_q, st.kq * (1.0 / c2), gq * c2, spec)
        gk = _qk_norm_backward(st.raw_k, st.kk, gk, spec)
    return gq, gk, gv


def weight_gradient_terms(go: Blocks, st: AttentionState, batch_size: int) -> tuple:
    """Per projection (q, k, v), ``(factor, extra)`` with ``E||dL/dW||^2 = factor (fan_in
    fan_out sum K_x G + fan_in fan_out extra)``, G the projection's gradient kernel of
    `backward`.

    extra: the additional ``sum_ij K_x(i, j) G(i, j)`` of the key and value projections from
    the realized input kernel, which multiplies their gradient kernels and is shared by the
    values inside G_k and by the keys inside the attention fluctuation of G_v
    (`gram_fluctuation`): ``s_v sum W C`` and ``s_k sum W C`` with ``W = G_o K_q``, to first
    order in the logit variance (the query projection's term is in G_q itself); with QK-Norm
    extra_k is per raw key unit.  factor: ``1 + v`` for the key projection, whose weight
    gradient is quadratic in the token spread (G_k linear, times the spread of K_x) while G_k
    alone is not (G_q carries the factor itself, `backward`); 1 otherwise."""
    w = go * st.kq
    extra_k = st.s_v * pair_sum(w, st.gram_k, batch_size)
    if st.raw_k is not None:
        extra_k *= np.mean(st.kk.diag) / np.mean(st.raw_k.diag)
    return (1.0, 0.0), (1.0 + st.coherent, extra_k), (1.0, st.s_k * pair_sum(w, st.gram, batch_size))
