"""One head's realized query Gram in the key weight gradient: the leading 1/d_head correction.

Setting (`attention`): per head, queries ``q_i = W_q x_i`` have d_head coordinates, iid over
W_q with covariance ``K_q(i, i')`` (per coordinate).  Given W_q the logits
``s_ij = q_i . k_j / sqrt(d_head)`` are exactly Gaussian over W_k, with covariance
``Qhat(i, i') K_k(j, j')`` where ``Qhat(i, i') = q_i . q_i' / d_head`` is the head's realized
query Gram: a Wishart matrix with d_head degrees of freedom and mean K_q.  The mean-field maps
take Qhat at its mean.  The key weight gradient, ``dW_k = sum_ij g_s_ij x_j q_i^T / sqrt(d_head)``,
holds the queries explicitly besides the logits:

    E||dW_k||^2 = sum_jj' K_x(j, j') sum_ii' E[Qhat(i, i') F_ii'jj'(Qhat)],

F the covariance of the logit gradients of rows i and i', which depends on Qhat only through
``(x, y, z) = (Qhat(i, i), Qhat(i', i'), Qhat(i, i'))`` (the two rows' logits are jointly
Gaussian given them).  Its attention-independent (mean) part is linear in Qhat and unchanged; the
fluctuation part (`attention`'s ``Q - Q0``, a function f(v, rho) of the pair's logit variance v
and correlation rho) makes ``E[z f] != E[z] f``: to leading order in the logit variance
``f ~ z``, and ``E[z^2] = zbar^2 + (xbar ybar + zbar^2) / d_head``, a relative excess
``(1 + rho^2) / (rho^2 d_head)`` that is large for nearly orthogonal tokens (0.76 at rho 0.3,
d_head 16).

In the theory's variables, ``v = sqrt(x y) r_k`` (the geometric mean of the two rows' variances,
as in `attention`) and ``rho = z / sqrt(x y)``; with ``u = log sqrt(x y / (xbar ybar))``,
``z / sqrt(xbar ybar) = e^u rho``.  ``E[h(u, rho)]`` for ``h = e^u rho f(v e^u, rho)`` is taken
to second order in (u, rho - rhobar) with the 2 x 2 Wishart moments to leading order in
1/d_head (delta method; Anderson 2003, *An Introduction to Multivariate Statistical Analysis*,
ch. 4 and 7):

    E[u] = -1/d_head,  Var(u) = (1 + rho^2)/d_head,  Cov(u, rhohat) = rho (1 - rho^2)/d_head,
    E[rhohat] - rho = -rho (1 - rho^2) / (2 d_head),  Var(rhohat) = (1 - rho^2)^2 / d_head

(the last two: the sample correlation of d_head zero-mean pairs).  This is exact when f is linear
in v and rho (the small-logit-variance limit above).  The derivatives of f are central
differences on the softmax moments' own log-variance grid (`attention.LOG_STEP`) and in rho with a
step proportional to ``1 - rho^2``, so that the stencil stays within [-1, 1] and the rho terms
vanish at rho = +-1 without a division by zero.

Not covered (`attention` keeps the mean-field Gram there):
  * RoPE: the rotation makes the realized Gram depend on the key positions;
  * QK-Norm: normalized keys are not Gaussian given W_q, so the conditional argument fails.
    Measured (one attention, n 32, d 128, input cosine 0.3, 1,024 samples): the mean-field
    Gram reads attn.k +1.6 / +1.6 / +2.6% at d_head 8 / 16 / 32 and this correction would
    give +12.7 / +6.9 / +5.2%;
  * the key Gram's realization in the query gradient, ``G_q ~ sum_jj' A_ij A_i'j' Khat(j, j')
    ...``.  Given the queries, the keys are iid (the exchangeable-key approximation) and, in
    expectation over the part of the keys orthogonal to the two queries,
    ``Khat(j, j') = common + ((d_head - 2) r_k delta_jj' + s_j^T Qhat^-1 s_j') / d_head``
    (s_j the pair's two logits of key j, covariance Sigma = r_k Qhat).  Stein's lemma on each
    key's logits turns the second part into 2 Q plus ``X = E[sum_jj' D_jj' f_jj']``, with
    ``D_jj' = sum_bc Sigma_bc d/ds_jb d/ds_j'c`` and f the weights of Khat in G_q
    (``delta_jj' a_j b_j - a_j b_j b_j' - a_j a_j' b_j' + (a.b) a_j b_j'``), so that Q becomes
    ``E[Q(Qhat)] + X / d_head``: the pair's realized query Gram in Q (the delta method above,
    with f in place of z f) plus X, higher polynomial moments of the two rows that `softmax`
    does not compute.  Sampled at n 32, rho 0.3 (fluctuation part Q - Q0):
    ``X / (Q - Q0)`` = +0.61 (se 0.06) at logit variance 0.05 (its first order,
    ``(rho (n - 2) - 4) / (rho (n - 2) - 2)``, gives 0.71) and -0.07 (se 0.02) at 0.7, where
    the query Gram's part is +6.8% at d_head 8 (se 1.2%) and both together, over sampled
    Wishart key Grams, +4.0% (se 0.4%).  Either part alone is wrong over part of the range, so
    neither is used; and higher orders in 1/d_head (one attention as above at d_head 4: attn.k
    -22.4% with the mean-field Gram, +1.9% with this term).
Checked: `tests/test_theory_query_gram.py` (exactness for linear f, a sampled Wishart
expectation) and `tests/test_theory_attention_finite_width.py` (one-attention Monte Carlo at
d_head 8, bidirectional and causal)."""

from __future__ import annotations

import numpy as np

RHO_STEP = 0.05  # the rho stencil's half-width, in units of 1 - rho^2


def wishart_moments(rho: np.ndarray, d_head: int):
    """``(E[u], E[rhohat - rho] / eps, Var(u), Cov(u, rhohat) / eps, Var(rhohat) / eps^2)``
    with ``eps = 1 - rho^2`` (module docstring), to leading order in 1/d_head."""
    k = 1.0 / d_head
    return -k, -0.5 * rho * k, (1.0 + rho * rho) * k, rho * k, k


def expected_overlap_product(f, rho: np.ndarray, d_head: int, log_step: float) -> np.ndarray:
    """``E[z f(v', rhohat)] / sqrt(xbar ybar)`` over the head's realized query Gram (module
    docstring), ``v' = v sqrt(x y / (xbar ybar))``; ``rho f(v, rho)`` at d_head = infinity.

    ``f(blocks)`` evaluates the fluctuation moment at the stencil's 7 points, asked for as
    blocks (r, steps): rho = r (an array like `rho`) and the log-variances
    ``log v + j log_step`` for each integer j of steps; it returns, per block, the list of
    values at its steps."""
    eps = 1.0 - rho * rho
    dr = RHO_STEP * eps
    (fm, f0, fp), (f_mm, f_rm), (f_rp, f_pp) = f([
        (rho, (-1, 0, 1)), (np.clip(rho - dr, -1.0, 1.0), (-1, 0)),
        (np.clip(rho + dr, -1.0, 1.0), (0, 1))])
    h = log_step
    f_s = (fp - fm) / (2.0 * h)
    f_ss = (fp - 2.0 * f0 + fm) / (h * h)
    g_r = (f_rp - f_rm) / (2.0 * RHO_STEP)  # eps f_rho
    g_rr = (f_rp - 2.0 * f0 + f_rm) / RHO_STEP ** 2  # eps^2 f_rho,rho
    g_sr = (f_pp + f_mm - fp - fm - f_rp - f_rm + 2.0 * f0) / (2.0 * h * RHO_STEP)  # eps f_s,rho
    # derivatives of h = e^u rho f(v e^u, rho) at u = 0 (rho ones times eps, eps^2)
    h_u = rho * (f0 + f_s)
    h_uu = rho * (f0 + 2.0 * f_s + f_ss)
    eh_r = eps * f0 + rho * g_r
    eh_ur = eps * (f0 + f_s) + rho * (g_r + g_sr)
    e2h_rr = 2.0 * eps * g_r + rho * g_rr
    e_u, e_r, var_u, cov_ur, var_r = wishart_moments(rho, d_head)
    return (rho * f0 + h_u * e_u + eh_r * e_r + 0.5 * h_uu * var_u + eh_ur * cov_ur
            + 0.5 * e2h_rr * var_r)
