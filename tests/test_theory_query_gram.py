"""`theory.query_gram`: the expectation of ``z f(v', rhohat)`` over one head's realized query
Gram, against closed forms and a sampled 2 x 2 Wishart matrix."""

from __future__ import annotations

import numpy as np
import pytest

from normfield.theory.attention import LOG_STEP
from normfield.theory.query_gram import expected_overlap_product


def stepped(f, v):
    """f(v, rho) as `expected_overlap_product` asks for it: per block (r, steps), at rho = r
    and the variances v exp(j LOG_STEP) for the steps j."""
    return lambda blocks: [[f(v * np.exp(j * LOG_STEP), r) for j in steps] for r, steps in blocks]


@pytest.mark.parametrize("rho", [0.3, 0.8, 1.0, -0.5])
@pytest.mark.parametrize("d_head", [8, 64])
def test_exact_for_a_moment_linear_in_v_and_rho(rho, d_head):
    """With f = c v rho, ``z f(v sqrt(x y), z / sqrt(x y)) = c v z^2`` (unit mean diagonal), whose
    expectation is ``c v (rho^2 + (1 + rho^2) / d_head)`` (the Wishart second moment): the
    expansion is exact but for the central difference of e^u on the log-variance grid, LOG_STEP^2/6
    = 4e-4 of the correction."""
    v = np.array([0.7])
    got = expected_overlap_product(stepped(lambda vs, rs: 2.0 * vs * rs, v), np.array([rho]),
                                   d_head, LOG_STEP)
    want = 2.0 * 0.7 * (rho ** 2 + (1.0 + rho ** 2) / d_head)
    np.testing.assert_allclose(got, want, rtol=2e-4)


@pytest.mark.parametrize("rho", [0.3, 0.8, 1.0])
def test_matches_a_sampled_wishart_gram_for_a_nonlinear_moment(rho):
    """A moment nonlinear in v and rho, d_head 64: the correction ``E[z f] - rho f`` against
    200,000 sampled Gram matrices; tolerance 4 sampling standard errors plus 5% of the correction
    (the next order, relatively O(1/d_head) = 1.6%); the correction itself is 6-11x the tolerance."""
    d_head, v = 64, 0.7

    def f(vs, rs):
        return vs * rs / (1.0 + vs) + 0.2 * (vs * rs) ** 2

    rng = np.random.default_rng(1)
    chol = np.linalg.cholesky(np.array([[1.0, rho], [rho, 1.0]]) + 1e-12 * np.eye(2))
    u = rng.standard_normal((200_000, d_head, 2)) @ chol.T
    x, y, z = (u[..., 0] ** 2).mean(1), (u[..., 1] ** 2).mean(1), (u[..., 0] * u[..., 1]).mean(1)
    sample = z * f(v * np.sqrt(x * y), np.clip(z / np.sqrt(x * y), -1.0, 1.0))
    lead = rho * f(v, rho)
    sampled = sample.mean() - lead
    se = sample.std() / np.sqrt(len(sample))
    got = expected_overlap_product(stepped(f, np.array([v])), np.array([rho]), d_head,
                                   LOG_STEP)[0] - lead
    assert abs(got - sampled) < 4 * se + 0.05 * abs(sampled), (got, sampled, se)
    assert abs(sampled) > 5 * (4 * se + 0.05 * abs(sampled))  # the correction is resolved
