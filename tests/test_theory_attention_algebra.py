"""The O(n^2) mean-attention products of `theory.attention` against their dense definitions
(the (n, n) matrix Abar and brute-force four-index sums), for bidirectional and causal masks."""

import numpy as np
import pytest

from normfield.theory import attention


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
def test_fast_products_equal_dense_definitions(kind):
    n = 6
    rng = np.random.default_rng(0)
    mask = attention.Mask.build(kind, n)
    a = mask.mean
    x, kk, kv, w = (rng.normal(size=(n, n)) for _ in range(4))
    np.testing.assert_allclose(mask.left(x), a @ x, atol=1e-12)
    np.testing.assert_allclose(mask.left_t(x), a.T @ x, atol=1e-12)
    np.testing.assert_allclose(mask.sandwich(x), a @ x @ a.T, atol=1e-12)
    np.testing.assert_allclose(mask.sandwich_t(x), a.T @ x @ a, atol=1e-12)

    # brute force: Cov_v(ij, i'j') = K_v(j,j') - (K_v A^T)(j,i') - (A K_v)(i,j') + (A K_v A^T)(i,i')
    xa, ya, za = kv @ a.T, a @ kv, a @ kv @ a.T
    query, key = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        for i2 in range(n):
            for j in range(n):
                for j2 in range(n):
                    cov = kv[j, j2] - xa[j, i2] - ya[i, j2] + za[i, i2]
                    query[i, i2] += a[i, j] * a[i2, j2] * kk[j, j2] * cov
                    key[j, j2] += w[i, i2] * a[i, j] * a[i2, j2] * cov
    np.testing.assert_allclose(attention._mean_query_term(mask, kk, kv), query, atol=1e-12)
    np.testing.assert_allclose(attention._mean_key_term(mask, w, kv), key, atol=1e-12)


def test_spread_by_set_matches_its_definition():
    n = 5
    rng = np.random.default_rng(1)
    mask = attention.Mask.build("causal", n)
    n1, _ = mask.pair_sets()
    weights = rng.normal(size=(n, n))
    want = np.zeros((n, n))
    for i in range(n):
        for i2 in range(n):
            m = n1[i, i2]
            want[:m, :m] += weights[i, i2] * (np.eye(m) - 1.0 / m)
    np.testing.assert_allclose(attention._spread_by_set(weights, n1), want, atol=1e-12)


def test_bidirectional_query_term_keeps_its_precision_near_collapse():
    # collapsed tokens: K = 1 + eps E with eps = 1e-7 (1 - cosine ~ 1e-7, as deep Post-LN reaches).
    # The query term is exactly eps^2 mean(E_k D(E_v)) (D: double centring; the 1 and the eps
    # terms cancel identically), ~1e-14: computed from the O(1) kernels it must keep the
    # precision with which K represents E (~1e-16 / eps = 1e-9), not drown in rounding of 1.
    n, eps = 8, 1e-7
    rng = np.random.default_rng(3)
    mask = attention.Mask.build("bidirectional", n)
    e_k, e_v = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    d_v = e_v - e_v.mean(axis=1, keepdims=True) - e_v.mean(axis=0, keepdims=True) + e_v.mean()
    exact = np.mean(e_k * d_v)
    term = attention._mean_query_term(mask, 1.0 + eps * e_k, 1.0 + eps * e_v) / eps ** 2
    np.testing.assert_allclose(term, exact, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
def test_own_shares_are_the_weight_of_one_pair_in_the_mean_terms(kind):
    # the entries (p, q) and (q, p) of a kernel (one entry when p = q) as a unit input E:
    # their weight in the entry (p, q) of the sandwich and of the (linear) key term
    n = 6
    rng = np.random.default_rng(4)
    mask = attention.Mask.build(kind, n)
    w = rng.normal(size=(2, n, n))
    key_share = attention._key_term_own_share(mask, w)
    for p in range(n):
        for q in range(n):
            e = np.zeros((n, n))
            e[p, q] = e[q, p] = 1.0
            assert mask.own_share[p, q] == pytest.approx(mask.sandwich(e)[p, q], abs=1e-14)
            for b in range(2):
                want = attention._mean_key_term(mask, w[b], e)[p, q]
                assert key_share[b, p, q] == pytest.approx(want, abs=1e-12)
