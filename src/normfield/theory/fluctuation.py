"""How much the realized (per-seed) token kernel fluctuates, register by register: the amplitude
c of ``Cov(K^_ab, K^_ce) = c (K_ac K_be + K_ae K_bc)``, with K^ the realized kernel
``x_a . x_b / d`` and K its expectation.

Tokens with iid Gaussian coordinates have c = 1/d (a Wishart matrix).  The attention maps need
c at their key/value input (`attention.gram_fluctuation`): the keys' and values' realized
kernels covary through it, an O(n c) term.  In a deep network c grows with depth, because each
block transforms the realized kernel of its input by fresh random weights: the quantity
``d c`` is an effective number of layers of fluctuation, the depth-to-width ratio of the
finite-width literature (the four-point vertex of Roberts, Yaida and Hanin 2022, "The
Principles of Deep Learning Theory", ch. 4-5, which grows linearly with depth).  It matters
where the attention maps sum the key-pair fluctuations of a realized kernel: the query and key
gradients of deep Post-LN.

Rules (leading order in 1/width; c is tracked as one number per register, for the
token-spread part of the kernel, the part the attention maps see):

* Linear with fresh weights and fan-out f: given its input the output is Gaussian with the
  realized kernel, so ``c_out = c_in + 1/f`` (exact for a Wishart).
* Elementwise activation phi after a Linear of fan-out f: the realized kernel is the kernel
  map of the realized input plus the sampling of the f units, ``c_out = T^2 c_in + (V - T^2)/f``
  with T the relative slope of the spread's kernel map (Price's theorem) and V the relative
  sampling variance of a spread entry, for exchangeable tokens of the mean correlation
  (`_spread_moments`).  Near collapse T = 1 and V = E[phi'^4]/E[phi'^2]^2 (the Jacobian
  ``diag(phi'(z))`` weights the units unequally; ReLU: as if only the active half were
  there); away from it T < 1 (a ReLU halves correlation fluctuations at rho = 0).
* Norm, Scale: c unchanged (a norm rescales a token's spread by a common factor).
* Attention: the values carry the input's realized kernel through W_v (fan-out d):
  ``c_out = c_in + 1/d``; the fluctuations of the realized attention pattern are not counted.
* Add ``alpha a + beta b`` of two registers computed from the block input, with spread ratio
  ``tau = S(b)/S(a)`` (S: the spread, the trace of the double-centred within-sequence kernel):
  each operand carries the share t of the block input's fluctuation (t: the product of the
  activations' T along its path) plus its own fresh part; the realized kernel of the sum is
  ``alpha^2 K^_a + beta^2 K^_b`` plus the realized cross term ``alpha beta (a . b + b . a)/d``,
  which has mean 0 and, through the branch's last fresh weight, covariance
  ``alpha^2 beta^2 tau (2 pairings)/d`` (`add`).  For a skip and ``b = J a`` with a random J of
  gain tau this adds ``1 - 1/(1 + tau)^2`` per unit of 1/d, the fluctuation of ``|(I + J) a|^2``.

Not counted (named approximations): the gate of a gated FFN (its operands' larger c is
kept), the coherent seed-to-seed scale of the spread (a rank-one mode, O(1/d) per block but
without the factor n), and the deterministic part of positional encodings (counted random).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from normfield.theory import gaussian
from normfield.theory.kernels import Blocks


def spread(k: Blocks) -> float:
    """``sum_i K(i, i) - sum_ij K(i, j) / n`` of the within-sequence block: n times the mean
    squared distance of a token from the sequence's mean token, per coordinate."""
    w = k.w
    return float(np.trace(w) - w.sum() / w.shape[0])


def mean_cosine(k: Blocks) -> float:
    """Mean cosine of two different tokens of a sequence."""
    w, d = k.w, k.diag
    n = len(d)
    if n < 2:
        return 0.0
    cos = w / np.sqrt(np.outer(d, d))
    return float((cos.sum() - np.trace(cos)) / (n * (n - 1)))


def linear(c: float, fan_out: int) -> float:
    return c + 1.0 / fan_out


@lru_cache(maxsize=256)
def _spread_moments(name: str, q: float, rho: float) -> tuple[float, float]:
    """(T, V) of an activation for exchangeable tokens ``z = sqrt(q)(sqrt(rho) u +
    sqrt(1 - rho) w)`` (u shared, w own): the spread of a token is ``s = phi(z) - m(u)``,
    ``m(u) = E_w phi(z)``.  ``T = E[phi'_a phi'_b] (1 - rho) q / E[s^2]`` (Price's theorem: the
    transfer of a realized spread-kernel fluctuation, relative), ``V = E_u[E_w[s^2|u]^2] /
    E[s^2]^2`` (the relative sampling variance of an off-diagonal spread entry over the
    units).  At rho -> 1, T = 1 and V = E[phi'^4]/E[phi'^2]^2 (ReLU: 2); at rho = 0, V = 1."""
    z, w = gaussian.gauss_hermite()
    rho = min(max(rho, 0.0), 1.0 - 1e-9)
    arg = np.sqrt(q) * (np.sqrt(rho) * z[:, None] + np.sqrt(1.0 - rho) * z[None, :])  # (u, w)
    if name == "relu":
        f, df = np.maximum(arg, 0.0), (arg > 0).astype(float)
    else:
        f, df = gaussian.SMOOTH[name](arg)
    m = f @ w
    cond = (f * f) @ w - m * m                 # E_w[s^2 | u]
    spread_var = float(cond @ w)
    if not spread_var > 0.0:
        return 1.0, 1.0
    t = float(((df @ w) ** 2) @ w) * (1.0 - rho) * q / spread_var
    return t, float((cond * cond) @ w) / spread_var ** 2


def activation(c: float, name: str, q: float, rho: float, fan: int) -> tuple[float, float]:
    """After an activation over `fan` units of pre-activation variance q and mean token
    correlation rho whose input has amplitude c: ``(T^2 c + (V - T^2)/fan, T)`` with T, V of
    `_spread_moments` (the Linear before it added 1/fan for the same sampling of units)."""
    t, v = _spread_moments(name, float(f"{q:.4g}"), float(f"{rho:.4g}"))
    return t * t * c + (v - t * t) / fan, t


def add(c_a: float, c_b: float, t_a: float, t_b: float, c_in: float, spread_a: float,
        spread_b: float, alpha: float, beta: float, width: int) -> tuple[float, float]:
    """The sum ``alpha a + beta b`` of two registers computed from the block input (amplitude
    c_in), each carrying a share t of the input's fluctuation (its transfer: 1 through linear
    maps and norms, T through an activation) and its own fresh part ``c - t^2 c_in``; returns
    (c, t) of the sum.  With ``tau = S(b)/S(a)``, the inherited parts add coherently, the fresh
    ones independently, and the realized cross term adds ``2 alpha^2 beta^2 tau / d``:
    ``c = (c_in (alpha^2 t_a + beta^2 tau t_b)^2 + alpha^4 f_a + beta^4 tau^2 f_b
    + 2 alpha^2 beta^2 tau / d) / (alpha^2 + beta^2 tau)^2``."""
    if not spread_a > 0.0 or not spread_b > 0.0:
        return (c_a, t_a) if spread_a > 0.0 or not spread_b > 0.0 else (c_b, t_b)
    a2, b2, tau = alpha * alpha, beta * beta, spread_b / spread_a
    f_a, f_b = max(c_a - t_a * t_a * c_in, 0.0), max(c_b - t_b * t_b * c_in, 0.0)
    norm = a2 + b2 * tau
    t = (a2 * t_a + b2 * tau * t_b) / norm
    c = (c_in * (a2 * t_a + b2 * tau * t_b) ** 2 + a2 * a2 * f_a + b2 * b2 * tau * tau * f_b
         + 2.0 * a2 * b2 * tau / width) / (norm * norm)
    return c, t
