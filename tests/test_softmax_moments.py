"""Tests for normfield.theory.softmax.pair_moments."""

import numpy as np
import pytest

from normfield.theory.softmax import _mc_moments, pair_moments

# Documented bound of the analytic method's own error (quadrature + rho
# interpolation), relative to |T1| and |Q|; measured <= 1e-4 on the task grid.
APPROX_REL = 1e-3


def test_uniform_rows_exact():
    n1 = np.array([1, 4, 16, 64, 3])
    n2 = np.array([1, 8, 16, 256, 7])
    T, Q = pair_moments(n1, n2, 0.0, 0.0, 0.7)
    np.testing.assert_allclose(T, 1.0 / n2, rtol=1e-12)
    np.testing.assert_allclose(Q, (1.0 / n2) * (1.0 - 1.0 / n1), rtol=1e-12, atol=1e-15)


def test_rho_zero_independent_rows():
    n1 = np.array([4, 16, 64, 5])
    n2 = np.array([4, 32, 256, 9])
    T, _ = pair_moments(n1, n2, np.array([0.5, 1.0, 3.0, 2.0]), 1.5, 0.0)
    np.testing.assert_allclose(T, 1.0 / n2, rtol=1e-12)


def test_n1_one():
    # A = 1, so Q = 0 exactly and T1 = E[B_1]; B_1 is exchangeable with the
    # other n2 - 1 entries only when v1 does not matter, i.e. always: T1 = 1/n2.
    T, Q = pair_moments(1, np.array([1, 4, 64]), 2.0, 1.0, 0.8)
    np.testing.assert_allclose(Q, 0.0, atol=1e-15)
    np.testing.assert_allclose(T, 1.0 / np.array([1, 4, 64]), rtol=1e-4)
    # rows of one key only (a causal mask's first row; seq_len 1): nothing left to integrate
    T, Q = pair_moments(np.ones(3, int), np.ones(3, int), 0.5, 0.5, np.array([0.0, 0.3, 1.0]))
    np.testing.assert_array_equal(T, 1.0)
    np.testing.assert_array_equal(Q, 0.0)


def test_fluctuation_sign_and_monotonic_in_rho():
    rho = np.array([0.0, 0.3, 0.7, 1.0])
    T, _ = pair_moments(16, 32, 1.0, 1.0, rho)
    assert np.all(np.diff(T) > 0)
    assert T[0] == pytest.approx(1 / 32, rel=1e-12)


def test_broadcasting_shape():
    T, Q = pair_moments(np.array([[4], [16]]), np.array([[16], [32]]), 1.0, 0.5,
                        np.array([0.1, 0.5, 0.9]))
    assert T.shape == Q.shape == (2, 3)
    assert T.dtype == Q.dtype == np.float64


@pytest.mark.parametrize("n1,n2,v1,v2,rho", [
    (4, 4, 1.0, 1.0, 1.0),       # participation ratio
    (4, 8, 3.0, 3.0, 0.7),       # small rows, large variance
    (5, 20, 0.5, 2.0, 0.95),     # v1 != v2, causal-like
    (16, 32, 2.0, 0.5, 0.3),
    (64, 64, 0.1, 0.1, 0.95),    # small fluctuations
    (16, 64, 10.0, 10.0, 0.9),   # large variance (the method holds up to V_MAX = 30)
])
def test_analytic_vs_mc(n1, n2, v1, v2, rho):
    samples = 40_000
    T, Q = pair_moments(n1, n2, v1, v2, rho)
    Tm, Qm, seT, seQ = _mc_moments([n1], [n2], [v1], [v2], [rho], samples=samples, seed=1)
    assert abs(T - Tm[0]) <= 4 * seT[0] + APPROX_REL * abs(T)
    assert abs(Q - Qm[0]) <= 4 * seQ[0] + APPROX_REL * abs(Q)
    # the test must be able to see the fluctuation part at all
    assert abs(T - 1 / n2) > 8 * seT[0]


def test_mc_deterministic_and_exact_limits():
    a = pair_moments([4, 8], [8, 8], 1.0, 2.0, 0.5, method="mc", samples=256, seed=3)
    b = pair_moments([4, 8], [8, 8], 1.0, 2.0, 0.5, method="mc", samples=256, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    T, Q = pair_moments(4, 8, 0.0, 0.0, 0.5, method="mc", samples=64)
    assert T == pytest.approx(1 / 8, rel=1e-12)
    assert Q == pytest.approx((1 / 8) * (3 / 4), rel=1e-12)
    T, Q = pair_moments(1, 8, 1.0, 1.0, 0.5, method="mc", samples=64)
    assert Q == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n1=0, n2=4, v1=1.0, v2=1.0, rho=0.5), "n1"),
    (dict(n1=2.5, n2=4, v1=1.0, v2=1.0, rho=0.5), "n1"),
    (dict(n1=5, n2=3, v1=1.0, v2=1.0, rho=0.5), r"n2=3.*n2 >= n1.*n1=5"),
    (dict(n1=2, n2=4, v1=-0.1, v2=1.0, rho=0.5), "v1"),
    (dict(n1=2, n2=4, v1=1.0, v2=np.nan, rho=0.5), "v2"),
    (dict(n1=2, n2=4, v1=1.0, v2=1.0, rho=1.2), "rho"),
    (dict(n1=2, n2=4, v1=1.0, v2=30.5, rho=0.5), r"v2=30.5: .* up to 30 .*method='mc'"),
    (dict(n1=2, n2=4, v1=1.0, v2=1.0, rho=0.5, method="exact"), "method"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pair_moments(**kwargs)


def test_pair_moments_at_equals_pair_moments():
    # several variances at shared sizes and rho, as attention's variance interpolation uses it:
    # 0-d and array variances (several groups, a zero-variance entry), scalar and array sizes,
    # exact limits (rho = 0, rho at a node, n1 = 1)
    from normfield.theory.softmax import pair_moments_at

    rng = np.random.default_rng(0)
    rho = rng.uniform(0.0, 1.0, size=(6, 6))
    rho[1, 1], rho[2, 2] = 0.0, 1.0
    v = np.where(rng.random((6, 6)) < 0.5, 0.5, 0.8)
    v[0, 0] = 0.0
    rows = np.arange(1, 7)
    for n1, n2 in ((5, 5), (1, 7), (np.minimum.outer(rows, rows), np.maximum.outer(rows, rows))):
        variances = (v, np.array(1.3), 2.0 * v)
        for (T, Q), var in zip(pair_moments_at(n1, n2, variances, rho), variances):
            want_t, want_q = pair_moments(n1, n2, var, var, rho)
            # equal up to rounding: the variances are interpolated by one matrix product
            np.testing.assert_allclose(T, want_t, rtol=1e-14, atol=0)
            np.testing.assert_allclose(Q, want_q, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="v="):
        pair_moments_at(4, 4, (np.array([0.5, np.nan]),), 0.5)


def test_negative_rho_moments_finite_and_match_mc():
    # with some rho < 0 the nodes span [-1, 1]; at rho = -1 the per-entry transform G00
    # underflows to 0 for large s and t, where the weight G11^2 / G00 must take its limit 0
    # (it was 0/0 = NaN, which made every Q of the group NaN)
    rho = np.array([-0.8, -0.5, 0.3, 0.9])
    T, Q = pair_moments(8, 8, 2.0, 2.0, rho)
    Tm, Qm, seT, seQ = _mc_moments([8] * 4, [8] * 4, [2.0] * 4, [2.0] * 4, rho, samples=20_000,
                                   seed=1)
    assert np.all(np.abs(T - Tm) <= 4 * seT + APPROX_REL * np.abs(T))
    assert np.all(np.abs(Q - Qm) <= 4 * seQ + APPROX_REL * np.abs(Q))


def test_groups_of_one_call_share_its_pair_set_and_give_each_groups_own_moments():
    """A causal-like call (n1, n2 from row lengths 1..12) with entries at three variances: its
    groups share one pair set and one pair of size buckets (one quadrature per variance), and
    every entry gets the moments of its own (n1, n2, v, rho), as a call on that variance's
    entries alone computes them (other size buckets, so equal to the quadrature's accuracy: the
    fluctuation parts within 1e-4 of their size).  A wrong pair lookup moves them by O(1)."""
    from normfield.theory import softmax

    rows = np.arange(1, 13)
    n1, n2 = np.minimum.outer(rows, rows), np.maximum.outer(rows, rows)
    rng = np.random.default_rng(1)
    rho = rng.uniform(0.2, 1.0, n1.shape)
    v = np.choose(rng.integers(0, 3, n1.shape), (0.3, 0.9, 2.1))
    softmax._quadrature.cache_clear()
    T, Q = pair_moments(n1, n2, v, v, rho)
    assert softmax._quadrature.cache_info().misses == 3
    for value in (0.3, 0.9, 2.1):
        sel = (v == value) & (n2 > 1)
        t, q = pair_moments(n1[sel], n2[sel], value, value, rho[sel])
        a, b = n1[sel], n2[sel]
        ft, fq = b * t - 1.0, b * q - (1.0 - 1.0 / a)
        np.testing.assert_allclose(b * T[sel] - 1.0, ft, rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(b * Q[sel] - (1.0 - 1.0 / a), fq, rtol=1e-4, atol=1e-12)


def _clear_softmax_caches(softmax):
    softmax._quadrature.cache_clear()
    softmax._NODE_TABLES.clear()
    softmax._NODE_TABLE_BYTES[0] = 0


def test_groups_of_a_large_pair_set_read_their_own_pairs(monkeypatch):
    """Above `_WHOLE_PAIR_SET` pairs a group asks its quadrature's table only for the pairs
    its own entries hold, and the table keeps them for later calls: the same causal-like call
    (row lengths 1..12, three variances) with the threshold at 10 pairs gives the values of the
    whole-set policy up to the last bits (Laplace sums batched differently); a call on some of
    its rows first stores only their pairs, and a call on those rows afterwards reads the
    stored values bit for bit from tables that hold more pairs, adding nothing.  A wrong
    position in a table moves the fluctuation parts by O(1)."""
    from normfield.theory import softmax

    rows = np.arange(1, 13)
    n1, n2 = np.minimum.outer(rows, rows), np.maximum.outer(rows, rows)
    rng = np.random.default_rng(1)
    rho = rng.uniform(0.2, 1.0, n1.shape)
    v = np.choose(rng.integers(0, 3, n1.shape), (0.3, 0.9, 2.1))
    _clear_softmax_caches(softmax)
    want = pair_moments(n1, n2, v, v, rho)
    whole = {key: node.keys.size for key, node in softmax._NODE_TABLES.items()}
    assert sorted(whole.values()) == [77] * 3  # every distinct (n1, n2) pair with n2 > 1

    monkeypatch.setattr(softmax, "_WHOLE_PAIR_SET", 10)
    _clear_softmax_caches(softmax)
    part = pair_moments(n1[6:], n2[6:], v[6:], v[6:], rho[6:])  # rows 7..12 against all
    held = {key: node.keys.size for key, node in softmax._NODE_TABLES.items()}
    got = pair_moments(n1, n2, v, v, rho)
    grown = {key: node.keys.size for key, node in softmax._NODE_TABLES.items()}
    for key, size in grown.items():
        distinct = {(a, b) for a, b, x in zip(n1.ravel(), n2.ravel(), v.ravel())
                    if b > 1 and x == key[0]}
        assert held.get(key, 0) < size == len(distinct) < whole[key]
    live = n2 > 1
    for g, w in zip(got, want):
        np.testing.assert_allclose((n2 * g - 1.0)[live], (n2 * w - 1.0)[live], rtol=1e-12,
                                   atol=1e-15)
    # read back from tables that hold more pairs than asked for: the stored values
    for a, b in zip(pair_moments(n1[6:], n2[6:], v[6:], v[6:], rho[6:]), got):
        np.testing.assert_array_equal(a, b[6:])
    assert {key: node.keys.size for key, node in softmax._NODE_TABLES.items()} == grown
    for a, b in zip(part, got):
        np.testing.assert_array_equal(a, b[6:])


def test_variances_beyond_the_analytic_range_are_left_to_monte_carlo():
    T, Q = pair_moments(8, 16, 50.0, 50.0, 0.5, method="mc", samples=2048)
    assert np.isfinite(T) and np.isfinite(Q) and 1 / 16 < T < 1


@pytest.mark.parametrize("causal", [False, True])
def test_stepped_blocks_equal_one_call_per_point(causal):
    """`attention.softmax_moments_stepped` evaluates several (rho, steps) blocks in one call on
    shared grid variances; each point must be `softmax_moments` at (v exp(j LOG_STEP), rho),
    here with variances in several grid cells and below V_FLOOR, negative rho, and per-pair row
    lengths (causal) or one length for all pairs."""
    from normfield.theory.attention import LOG_STEP, softmax_moments, softmax_moments_stepped

    rng = np.random.default_rng(7)
    v = np.concatenate([rng.uniform(0.05, 2.0, 30), [5e-4, 9.8e-4, 1e-3]])
    rho = rng.uniform(-0.9, 0.99, v.size)
    n1, n2 = (rng.integers(1, 20, v.size), rng.integers(20, 40, v.size)) if causal else (16, 16)
    blocks = [(rho, (-1, 0, 1)), (np.clip(rho - 0.02, -1, 1), (-1, 0)), (rho * 0.5, (0, 2))]
    got = softmax_moments_stepped(n1, n2, v, blocks)
    for (r, steps), row in zip(blocks, got):
        for j, (t, q) in zip(steps, row):
            want_t, want_q = softmax_moments(n1, n2, v * np.exp(j * LOG_STEP), r)
            np.testing.assert_allclose(t, want_t, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(q, want_q, rtol=1e-12, atol=1e-15)
