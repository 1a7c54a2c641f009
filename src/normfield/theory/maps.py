"""Mean-field forward and backward maps of the primitive steps (leading order in 1/width, under
the gradient-independence assumption; DESIGN.md section 2), side by side per primitive.

Forward state at a point (`Point`): the kernel ``K = E[x_i . x_j]/width`` and the kernel of the
per-token coordinate means ``M = E[xbar_i xbar_j]`` (sinusoidal positions and activations give
tokens an O(1) coordinate mean that LayerNorm removes).  Backward state: the gradient kernel
``G = E[g_i . g_j]/width`` of g = dL/dx.

* Linear ``y = x W + b``, W iid with variance s^2, b with variance s_b^2:
  ``K_y = s^2 fan_in K_x + s_b^2``, ``M_y = K_y / fan_out``, ``G_x = s^2 fan_out G_y``,
  ``E||dL/dW||^2 = fan_in fan_out sum_ij K_x(i,j) G_y(i,j)``, ``E||dL/db||^2 = fan_out sum_ij G_y``.
* Activation: ``K = E[phi(u_i) phi(u_j)]``, ``M = mu_i mu_j + (K - mu_i mu_j)/width``,
  ``G_u = E[phi'(u_i) phi'(u_j)] G``  (see `gaussian`).
* Product (gate) of independent a, b: ``K = K_a K_b``, ``G_a = K_b G``, ``G_b = K_a G``.
* Norm (LayerNorm: centre, then divide by the RMS; RMSNorm: divide by the RMS), gain 1:
  ``K_y(i,j) = C(i,j) / (s_i s_j)`` with ``C = K - M`` (LayerNorm) or ``K`` (RMSNorm) and
  ``s_i^2 = C(i,i) + eps``, times the O(1/d) bias of a realized cosine (`_expected_cosine`,
  ``1 - (1 - rho^2)/(2 dof)`` when centred).  Backward: the Jacobian is ``(1/s)(I - e e^T - u u^T)`` (Xiong et al.
  2020, Lemma 3; u the output direction, e = 1/sqrt(d) only for LayerNorm); for an isotropic
  gradient ``E[(P_i g_i).(P_j g_j)] = G(i,j) tr(P_i P_j)`` with ``tr = d - p - 1 + rho_ij^2``
  (i != j) or ``d - p`` (i = j), p the number of projected directions; so
  ``G_x(i,j) = G_y(i,j) E[1/(s_i s_j)] tr(P_i P_j) / d`` with the Jensen factor of the random
  per-token scales (see `norm_backward`) -- both O(1/d) factors are kept (they compound over
  depth); a gradient exactly orthogonal to the output (Euler's theorem, `norm_backward`'s
  `radial`) has ``tr = d - p + 1``.  Gain gradient: ``E||dL/dgain||^2 = d sum_ij K_y(i,j) G_y(i,j)``.
* Scale by c: K, M and G scale by c^2.
* Add ``alpha a + beta b``: kernels add with weights alpha^2, beta^2 (cross terms vanish because
  each branch ends in a zero-mean random weight); backward ``G_a += alpha^2 G``, ``G_b += beta^2 G``.
  An add of two correlated operands (B2T's skip of the block input) adds the cross terms; the
  block interpreter (`predict._Block`) tracks them with `norm_cross_forward` and
  `norm_cross_backward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from normfield.theory import gaussian
from normfield.theory.kernels import Blocks, block_sums, cosine, pair_sum

if TYPE_CHECKING:
    from normfield.theory.fluctuation import Fluct


@dataclass(frozen=True)
class Point:
    """Forward state: kernel K, coordinate-mean kernel M, width, and the fluctuation of the
    realized kernel (`fluctuation.Fluct`; None: iid Gaussian coordinates)."""

    k: Blocks
    m: Blocks
    width: int
    fluct: Fluct | None = None

    @property
    def c(self) -> float:
        """Pairing amplitude of the token-spread part (`fluctuation`)."""
        return 1.0 / self.width if self.fluct is None else self.fluct.c

    @property
    def c_diag(self) -> float:
        """Pairing amplitude of the tokens' squared norms."""
        return 1.0 / self.width if self.fluct is None else self.fluct.c_diag

    @property
    def coherent(self) -> float:
        """Relative variance of the spread's common scale across draws."""
        return 0.0 if self.fluct is None else self.fluct.v


def linear_forward(x: Point, var_w: float, var_b: float, fan_out: int) -> Point:
    k = x.k * (var_w * x.width)
    if var_b:
        k = k + float(var_b)
    return Point(k, k * (1.0 / fan_out), fan_out)


def linear_backward(g: Blocks, var_w: float, fan_out: int) -> Blocks:
    return g * (var_w * fan_out)


def linear_grad_sq(x: Point, g: Blocks, fan_out: int, batch_size: int,
                   collision: float = 0.0) -> float:
    """``E||dL/dW||^2 = fan_in fan_out sum_ij K_x(i, j) G(i, j)`` (`pair_sum`, with the
    token-collision covariance when `collision` = p_c is given)."""
    return x.width * fan_out * pair_sum(x.k, g, batch_size, collision)


def bias_grad_sq(g: Blocks, fan_out: int, batch_size: int) -> float:
    b = batch_size
    w, c = block_sums(g.a)  # pair_sum with a kernel of ones
    return fan_out * float(b * w + b * (b - 1) * c)


def activation_forward(u: Point, name: str) -> tuple[Point, Blocks]:
    """Returns the output point and E[phi'(u_i) phi'(u_j)] (the backward factor)."""
    d = u.k.diag
    k, dk = gaussian.pair_expectations(name, d[:, None], d[None, :], u.k.a)
    mu = gaussian.mean(name, d)
    mm = mu[:, None] * mu[None, :]
    m = Blocks.of(mm + (k - mm) * (1.0 / u.width))
    return Point(Blocks.of(k), m, u.width), Blocks.of(dk)


def _norm_scale(x: Point, kind: str, eps: float) -> np.ndarray:
    """Per-token scale s_i = sqrt(C(i, i) + eps) (C = K - M for LayerNorm, K for RMSNorm)."""
    d = x.k.diag + x.m.diag * -1.0 if kind == "layernorm" else x.k.diag
    return np.sqrt(d + eps)


def _expected_cosine(s: np.ndarray, mean: np.ndarray | None, dof: float, eps: float) -> np.ndarray:
    """``E[u_i . u_j / (|u_i| |u_j|)]`` (with eps added to the squared norms' means) of tokens
    whose `dof` coordinates are iid Gaussian with second moments ``s`` (stacked blocks) and
    coordinate-mean kernel `mean` (None: centred), to O(1/dof).

    The ratio of expectations ``s_ij / sqrt(s_ii s_jj)`` is biased: the realized cosine of two
    Gaussian vectors is smaller in magnitude (Fisher 1915, the bias of the sample correlation:
    ``E[r] = rho (1 - (1 - rho^2)/(2 dof))`` when centred).  By the delta method for
    ``a/sqrt(bc)`` with ``a = S_ij, b = S_ii + eps, c = S_jj + eps`` (S the realized second
    moments),

        E[r] = r0 (1 + Cov(b,c)/(4bc) + 3 Var(b)/(8b^2) + 3 Var(c)/(8c^2))
               - (Cov(a,b)/(2b) + Cov(a,c)/(2c)) / sqrt(bc),

    with the Gaussian (Wishart) covariances ``dof Cov(S_ij, S_kl) = C_ik C_jl + C_il C_jk +
    M_ik C_jl + M_il C_jk + M_jk C_il + M_jl C_ik`` (C = s - M the centred part).  Near token
    collapse (rho -> 1) this raises the spread 1 - cos by the factor ``1 + (1 + rho)/(2 dof)``,
    which compounds over depth in Post-LN.  On the diagonal (a = b - eps) the same expansion
    gives ``E[S/(S + eps)] = 1 - eps/b (1 + Var(b)/b^2)``: keeping it keeps the eps terms of the
    cosine consistent, which matters near collapse, where 1 - cos is as small as eps/d."""
    if mean is None:  # centred: the covariances below with M = 0, in a few fused terms
        cd = s[0].diagonal()
        b = cd + eps
        ri, root = cd / b, np.sqrt(b)
        inv = 1.0 / (root[:, None] * root[None, :])
        r = s * inv
        rr = ri * (0.75 * ri - 1.0)
        out = np.multiply(0.5, r)  # r (1 + (r^2/2 + rr_i + rr_j)/dof), step by step in place
        out *= r
        out += rr[:, None]
        out += rr[None, :]
        out /= dof
        out += 1.0
        out *= r
        return out
    m = mean
    c = s - m
    cd, md = c[0].diagonal(), m[0].diagonal()
    ci, cj, mi, mj = cd[:, None], cd[None, :], md[:, None], md[None, :]
    b, e = s[0].diagonal()[:, None] + eps, s[0].diagonal()[None, :] + eps
    root = np.sqrt(b * e)
    cov_ab = 2.0 * (c * (ci + mi) + m * ci) / dof
    cov_ac = 2.0 * (c * (cj + mj) + m * cj) / dof
    cov_bc = 2.0 * c * (c + 2.0 * m) / dof
    var_b, var_c = 2.0 * ci * (ci + 2.0 * mi) / dof, 2.0 * cj * (cj + 2.0 * mj) / dof
    return (s / root * (1.0 + cov_bc / (4.0 * b * e) + 0.375 * (var_b / (b * b) + var_c / (e * e)))
            - (cov_ab / (2.0 * b) + cov_ac / (2.0 * e)) / root)


def norm_forward(x: Point, kind: str, eps: float) -> Point:
    """Output kernel ``E[y_i . y_j]/d``: the expected cosine of the (centred, for LayerNorm)
    input tokens, with its O(1/d) finite-width bias (`_expected_cosine`; dof d - 1 for
    LayerNorm, d for RMSNorm), which is ``C(i,i)/(C(i,i) + eps)`` up to O(eps/d) on the diagonal;
    for RMSNorm also the coordinate-mean kernel ``M/(s_i s_j)``."""
    if kind == "layernorm":
        k = _expected_cosine(x.k.a + x.m.a * -1.0, None, x.width - 1.0, eps)
        return Point(Blocks.of(k), Blocks.of(np.zeros(k.shape)), x.width)
    scale = _norm_scale(x, kind, eps)
    inv = 1.0 / (scale[:, None] * scale[None, :])
    return Point(Blocks.of(_expected_cosine(x.k.a, x.m.a, float(x.width), eps)),
                 Blocks.of(x.m.a * inv), x.width)


def _scale_dof(x: Point, kind: str) -> tuple[int, np.ndarray]:
    """``(p, k)``: the number p of directions the norm's Jacobian projects out (LayerNorm 2: the
    mean and the output direction; RMSNorm 1) and the degrees of freedom k_i of each token's
    mean square s_i^2 (relative variance 2/k_i; see `norm_backward`)."""
    d = x.width
    if kind == "layernorm":
        return 2, np.full(x.k.w.shape[0], d - 1.0)
    m2 = x.m.diag
    c = np.maximum(x.k.diag - m2, 1e-300)
    return 1, d * (c + m2) ** 2 / (c * c + 2 * m2 * c)


def norm_backward(x: Point, y: Point, g: Blocks, kind: str, eps: float,
                  radial: bool = True) -> Blocks:
    """G_x(i,j) = G_y(i,j) E[1/(s_i s_j)] tr(P_i P_j)/d, both factors to O(1/d).

    ``E[1/(s_i s_j)]``: the per-token mean square s_i^2 fluctuates (Gaussian coordinates) with
    relative variance 2/k_i: k = d - 1 for LayerNorm (centred), and for RMSNorm with a
    coordinate mean m^2 = M(i,i) and centred variance c = K(i,i) - M(i,i),
    ``k = d (c + m^2)^2 / (c^2 + 2 m^2 c)``.  Then ``E[1/s_i^2] = k_i/(k_i - 2) / C(i,i)`` on the
    diagonal and, by the delta method, ``(1 + 3/(4 k_i) + 3/(4 k_j) + rho^2/(2 sqrt(k_i k_j)))
    / sqrt(C(i,i) C(j,j))`` off it.  This Jensen factor and the projection's ``tr(P_i P_j)/d``
    nearly cancel on the diagonal; keeping only one of them biases every norm's backward map by
    O(1/d), which compounds over depth in Post-LN.

    `radial`: whether the output gradient has its isotropic share along the output direction.
    When it is exactly orthogonal to it (``g_y,i . y_i = 0``; `predict._radial_free_norms`),
    the projection onto the output direction removes nothing and ``tr(P_i P_j) = d - p + 1``
    for every pair (LayerNorm: the coordinate mean alone; RMSNorm: nothing)."""
    scale = _norm_scale(x, kind, eps)
    d = x.width
    if kind == "layernorm":  # k = d - 1 for every token: scalar factors
        p, k = 2, d - 1.0
        ki = kj = k
    else:
        p, k = _scale_dof(x, kind)
        ki, kj = k[:, None], k[None, :]
    base, root = 1.0 + 0.75 / ki + 0.75 / kj, np.sqrt(ki * kj)
    r2 = cosine(y.k).a
    r2 *= r2
    # fac = (d - p + kept)/d * (base + r2/(2 root)), kept = r2 - 1 (tr(P_i P_j) = d - p + kept),
    # step by step in place
    fac = np.subtract(r2, 1.0) if radial else np.full(r2.shape, 1.0)
    np.add(d - p, fac, out=fac)
    fac /= d
    jensen = np.multiply(0.5, r2, out=r2)
    jensen /= root
    np.add(base, jensen, out=jensen)
    fac *= jensen
    fac[0].reshape(-1)[::fac.shape[-1] + 1] = (d - p + (0.0 if radial else 1.0)) / d * k / (k - 2)
    out = g.a * fac
    out *= 1.0 / (scale[:, None] * scale[None, :])
    return Blocks.of(out)


def gain_grad_sq(y: Point, g: Blocks, batch_size: int, collision: float = 0.0) -> float:
    return y.width * pair_sum(y.k, g, batch_size, collision)


def norm_cross_forward(x: Point, cross_k: Blocks, cross_m: Blocks, kind: str,
                       eps: float) -> tuple[Blocks, Blocks]:
    """Cross-kernels of a norm's output y with a fixed reference r (a block's input), from
    those of its input x: ``X(i,j) = E[x_i . r_j]/d`` (`cross_k`) and ``MX(i,j) = E[xbar_i rbar_j]``
    (`cross_m`).  Returns ``(X_y, MX_y)``:

        LayerNorm: X_y = (X - MX) f_i,  MX_y = 0;   RMSNorm: X_y = X f_i,  MX_y = MX f_i,
        f_i = E[s_i] / C(i,i) = (1 - 1/(4 k_i)) / sqrt(C(i,i) + eps),

    with C and k_i as in `norm_backward`.  Why ``E[s]`` and not the Jensen factor ``E[1/s]`` of
    `norm_backward`: with u = P x_i (P the centring for LayerNorm) the numerator correlates
    with s_i = |u|/sqrt(d).  Regress the coordinates of r_j on those of u (iid Gaussian pairs),
    r_j = beta u + w with beta = (X - MX)(i,j) / C(i,i) and w independent of u; then
    ``E[u . r_j / (d s_i)] = beta E[|u|^2 / (d s_i)] = beta E[s_i]``, and for a chi-square s^2
    with k degrees of freedom ``E[s] = sqrt(C) (1 - 1/(4k) + O(k^-2))``; ``E[1/s]`` would give
    1 + 3/(4k), wrong in sign.  Exact to O(1/d) for LayerNorm and for RMSNorm without a
    coordinate mean (checked against Monte Carlo in the tests); with a coordinate mean the
    RMSNorm factor is an O(1/d) approximation.  The factor is kept, although the forward
    kernel map works to leading order, because the cross-kernel's diagonal enters the scale
    of the next norm, whose backward map multiplies every gradient below it: an O(1/d) error
    there compounds over depth like the ones `norm_backward` keeps."""
    _, k = _scale_dof(x, kind)
    f = ((1.0 - 0.25 / k) / _norm_scale(x, kind, eps))[:, None]
    if kind == "layernorm":
        return (cross_k + cross_m * -1.0) * f, cross_k.zeros()
    return cross_k * f, cross_m * f


def norm_cross_backward(x: Point, kind: str, eps: float) -> np.ndarray:
    """Per-token factor f_i of a norm's backward map on a gradient cross-kernel
    ``Y(i,j) = E[g_i . g_ref,j]/d`` with a reference gradient g_ref independent of the norm's
    scales (gradient independence): ``Y_x(i,j) = f_i Y_y(i,j)``, since g_x,i = P_i g_y,i / s_i
    gives ``E[P_i g_y,i . g_ref,j] = tr(P_i) Y_y(i,j)`` for isotropic gradients;
    ``f_i = (d - p)/d E[1/s_i]`` with ``E[1/s_i] = (1 + 3/(4 k_i)) / sqrt(C(i,i) + eps)`` --
    the per-token factors of `norm_backward` (projection trace and Jensen factor) for one
    token instead of a pair."""
    p, k = _scale_dof(x, kind)
    return (x.width - p) / x.width * (1.0 + 0.75 / k) / _norm_scale(x, kind, eps)
