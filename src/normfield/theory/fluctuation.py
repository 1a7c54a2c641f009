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

* Embedding: derived from the data and the init (`embedding`): the token embeddings'
  Wishart part, the token-position cross terms, learned positions' own part (sinusoidal ones
  are deterministic), and token collisions, whose fluctuation is O(1) rather than O(1/d)
  (c d = 1.34 at d 256, 1.70 at d 512 for 512 uniform tokens in sequences of 32).
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
  An add of the block input x and a register o that contains it (B2T's skip) first regresses
  o on x, ``o = lam x + xi`` (`regress_on_input`), and adds the uncorrelated x and xi.  (MC of
  a 6-block B2T encoder at d 256, 64 seeds: c d grows by 0.05-0.11 per block, the rule gives
  0.09-0.10; taking x and o uncorrelated gave 0.5.)

The coherent mode.  Besides the pairing covariance, a norm divides every token by its
realized scale; near collapse the tokens' scales fluctuate together, so the whole spread is
rescaled by one random factor per norm: v, the relative variance of the spread's common scale
across draws, grows by ``2 c_diag rho^2`` at each norm (`coherent`), with c_diag the pairing
amplitude of the tokens' squared norms, tracked by the same kind of rules (`diag_activation`,
`diag_add`; a norm's output has c_diag = 0); an add takes the spread-weighted mean of its
operands' v (`coherent_add`).  Terms quadratic in the spread then carry a factor 1 + v
(`attention.forward`).  Measured in a 24-layer Post-LN encoder (32 seeds): the relative
standard deviation of 1 - cosine across seeds grows to 0.45 (d 256) and 0.36 (d 512); this
rule gives 0.45 and 0.32.

Not counted (named approximations): the gate of a gated FFN (its operands' larger amplitudes
are kept); beyond the embedding, a matched pairing amplitude stands for fluctuations of other
shapes (token collisions, deterministic positions); the c_diag and v rules of B2T's
correlated add take its operands as uncorrelated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from normfield.theory import gaussian
from normfield.theory.kernels import Blocks, cosine


@dataclass(frozen=True)
class Fluct:
    """The fluctuation state of a register: c (token spread, pairing amplitude), c_diag (the
    tokens' squared norms, pairing amplitude) and v (relative variance of the spread's common
    scale)."""

    c: float
    c_diag: float
    v: float


def spread(k: Blocks) -> float:
    """``sum_i K(i, i) - sum_ij K(i, j) / n`` of the within-sequence block: n times the mean
    squared distance of a token from the sequence's mean token, per coordinate."""
    w = k.w
    return float(w.trace() - w.sum() / w.shape[0])


def _cosine_moment(k: Blocks, power: int) -> float:
    """Mean of the cosine (power 1) or squared cosine (power 2) of two different tokens of a
    sequence."""
    n = k.w.shape[0]
    if n < 2:
        return 0.0
    cos = cosine(k.main).w ** power
    return float((cos.sum() - cos.trace()) / (n * (n - 1)))


def mean_cosine(k: Blocks) -> float:
    """Mean cosine of two different tokens of a sequence."""
    return _cosine_moment(k, 1)


def mean_squared_cosine(k: Blocks) -> float:
    """Mean squared cosine of two different tokens of a sequence."""
    return _cosine_moment(k, 2)


def embedding(probs: np.ndarray, token_var: float, kpos: np.ndarray, pos_random: bool,
              width: int) -> tuple[float, float]:
    """(c, c_diag) of the embedding ``x_a = e_{t_a} + p_a`` of one sequence of n iid tokens
    t_a ~ `probs`: token embeddings e of iid N(0, token_var) coordinates, positions p with
    kernel `kpos` (n x n), random (learned: iid coordinates) or deterministic (sinusoidal).

    c is matched on what the attention maps sum (`attention.gram_fluctuation`): with P the
    centring matrix and G = P E[K] P, ``c = sum_ab Var((P K^ P)_ab) / (tr(G)^2 + ||G||^2)``,
    exact for a pairing covariance.  With U the realized token-identity matrix
    (``U_ab = 1[t_a = t_b]``) the realized kernel is ``s^2 U + W + C + C^T + K_p`` (s^2 =
    token_var; W the tokens' Wishart part, C the token-position cross term), so the sum is

    * tokens, given U: ``s^4 / d E[tr(PUP)^2 + ||PUP||^2]`` (Wishart);
    * token-position cross terms: ``2 s^2 / d (E[tr(PUP)] tr(K_p') + tr(E[PUP] K_p'))``,
      ``K_p' = P K_p P``;
    * learned positions only: ``(tr(K_p')^2 + ||K_p'||^2) / d`` (sinusoidal ones do not
      fluctuate);
    * the data: ``s^4 (E||PUP||^2 - ||P E[U] P||^2)``, which token collisions (probability
      sum_v p_v^2) make O(1), not O(1/d): at V 512, n 32 it raises c d from 0.98 to 1.34
      (d 256) and 1.70 (d 512), as MC of the embedding gives (1.34, 1.68).

    The expectations over U are multinomial moments of the token counts N_v of a sequence:
    ``tr(PUP) = n - S2/n``, ``||PUP||^2 = S2 - 2 S3 / n + S2^2 / n^2`` with ``S_k = sum_v
    N_v^k`` (exact).  c_diag, the squared norms' amplitude ``Var(K^_aa) / (2 K_aa^2)``
    averaged over positions: ``(s^4 + 2 s^2 K_p(a, a)) / (d K_aa^2)`` for deterministic
    positions, 1/d for random ones."""
    n, d = kpos.shape[0], float(width)
    s2, s3, s4 = (float(np.sum(probs ** k)) for k in (2, 3, 4))
    f2, f3, f4 = n * (n - 1.0), n * (n - 1.0) * (n - 2.0), n * (n - 1.0) * (n - 2.0) * (n - 3.0)
    e_s2 = n + f2 * s2
    e_s3 = n + 3.0 * f2 * s2 + f3 * s3
    e_s2_sq = (n + 7.0 * f2 * s2 + 6.0 * f3 * s3 + f4 * s4                # sum_v N_v^4
               + f2 * (1.0 - s2) + 2.0 * f3 * (s2 - s3) + f4 * (s2 * s2 - s4))  # v != w
    tr_u = n - e_s2 / n
    tr_u_sq = n * n - 2.0 * e_s2 + e_s2_sq / (n * n)
    norm_u_sq = e_s2 - 2.0 * e_s3 / n + e_s2_sq / (n * n)
    centre = np.eye(n) - 1.0 / n
    kp = centre @ kpos @ centre
    tr_p = float(np.trace(kp))
    g = token_var * (1.0 - s2) * centre + kp  # P E[U] P = (1 - s2) P
    var = (token_var ** 2 * (tr_u_sq + norm_u_sq) / d
           + 2.0 * token_var * (tr_u * tr_p + (1.0 - s2) * tr_p) / d
           + token_var ** 2 * (norm_u_sq - (1.0 - s2) ** 2 * (n - 1.0)))
    if pos_random:
        var += (tr_p * tr_p + float(np.sum(kp * kp))) / d
    spread_sq = float(np.trace(g)) ** 2 + float(np.sum(g * g))
    c = var / spread_sq if spread_sq else 0.0  # one token per sequence: no spread to fluctuate
    if pos_random:
        return c, 1.0 / d
    k_aa = token_var + np.diag(kpos)
    return c, float(np.mean((token_var ** 2 + 2.0 * token_var * np.diag(kpos)) / (d * k_aa ** 2)))


def after_norm(c: float, c_diag: float, v: float, k: Blocks) -> Fluct:
    """The fluctuation state of a norm's output, given its input's (c, c_diag, v) and kernel
    k: c unchanged, c_diag 0 (every token has the same norm), v + 2 c_diag rho2 (`coherent`)."""
    return Fluct(c, 0.0, coherent(v, c_diag, mean_squared_cosine(k)))


def linear(c: float, fan_out: int) -> float:
    """After a Linear with fresh weights and fan-out `fan_out` (a Wishart given its input)."""
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


def regress_on_input(spread_x: float, spread_o: float, spread_ox: float, c_in: float,
                     c_o: float, t_o: float, width: int) -> tuple[float, float, float, float]:
    """Split a register o correlated with the block input x (B2T's ``r``, which contains x
    through the block's earlier norms) into its regression on x and a remainder uncorrelated
    with it: ``o = lam x + xi``, ``lam = S_ox / S_x`` (S_ox: the spread of the cross-kernel
    E[o_i . x_j]/d), ``S_xi = S_o - lam^2 S_x``.  Of o's inherited fluctuation (share t_o) the
    part lam^2 S_x is x's own, the rest the remainder's: ``t_xi S_xi = t_o S_o - lam^2 S_x``;
    o's fresh part ``(c_o - t_o^2 c_in) S_o^2`` is the remainder's, less the realized cross term
    ``lam (x . xi + xi . x)/d`` it contains, ``2 lam^2 S_x S_xi / d`` (`add` counts that cross
    term again with the sum's coefficients).  Returns (lam, S_xi, c_xi, t_xi).  Then
    ``alpha x + beta o = (alpha + beta lam) x + beta xi`` is an `add` of uncorrelated operands;
    treating x and o themselves as uncorrelated would count ``2 lam x . x`` as a fresh cross
    term (about 0.4/d per B2T block, five times the growth of c measured there)."""
    lam = spread_ox / spread_x if spread_x > 0.0 else 0.0
    s_xi = max(spread_o - lam * lam * spread_x, 0.0)
    if not s_xi > 0.0:
        return lam, 0.0, c_in, 1.0
    t_xi = max(t_o * spread_o - lam * lam * spread_x, 0.0) / s_xi
    fresh = max((c_o - t_o * t_o * c_in) * spread_o ** 2
                - 2.0 * lam * lam * spread_x * s_xi / width, 0.0) / s_xi ** 2
    return lam, s_xi, t_xi * t_xi * c_in + fresh, t_xi


@lru_cache(maxsize=256)
def _norm_moments(name: str, q: float) -> tuple[float, float]:
    """``(T, kappa)`` of an activation at pre-activation variance q: ``T = d log E[phi^2] /
    d log q`` (the transfer of a relative fluctuation of q to E[phi^2]; 1 for ReLU) and
    ``kappa = E[phi^4]/E[phi^2]^2`` (6 for ReLU, 3 for a linear map)."""
    z, w = gaussian.gauss_hermite()
    if name == "relu":
        return 1.0, 6.0
    f, df = gaussian.SMOOTH[name](np.sqrt(q) * z)
    m2, m4 = float(w @ (f * f)), float(w @ f ** 4)
    t = float(w @ (f * df * np.sqrt(q) * z)) / m2   # q d/dq E[phi^2] / E[phi^2]
    return t, m4 / (m2 * m2)


def diag_activation(c_z: float, name: str, q: float, fan: int) -> float:
    """c_diag after an activation over `fan` units of pre-activation variance q, whose
    pre-activations have c_diag = c_z (the Linear before it added 1/fan for the same units):
    the realized mean of phi^2 over the units has relative variance ``(kappa - 1)/fan`` given
    its input, whose own fluctuation transfers by T."""
    t, kappa = _norm_moments(name, float(f"{q:.4g}"))
    return t * t * (c_z - 1.0 / fan) + 0.5 * (kappa - 1.0) / fan


def diag_add(c_a: float, c_b: float, k_a: float, k_b: float, alpha: float, beta: float,
             width: int) -> float:
    """c_diag of ``alpha a + beta b`` (mean squared norms k_a, k_b): the squared norms add
    with the realized cross term ``2 alpha beta a . b``, of variance ``4 alpha^2 beta^2 k_a k_b
    / d``; the operands' own fluctuations are taken independent (in every recipe one operand
    is a norm output or a branch that starts with a norm, which carries none of the other's)."""
    a2, b2 = alpha * alpha * k_a, beta * beta * k_b
    total = a2 + b2
    if not total > 0.0:
        return c_a
    return (a2 * a2 * c_a + b2 * b2 * c_b + 2.0 * a2 * b2 / width) / (total * total)


def coherent(v: float, c_diag: float, rho2: float) -> float:
    """v after a norm: the norm divides every token by its realized scale s_i; the part of the
    scales' fluctuation common to the tokens (covariance ``2 c_diag rho_ij^2``, mean squared
    cosine rho2) rescales the whole spread: ``v + 2 c_diag rho2``."""
    return v + 2.0 * c_diag * rho2


def coherent_add(v_a: float, v_b: float, spread_a: float, spread_b: float, alpha: float,
                 beta: float) -> float:
    """v of ``alpha a + beta b``: the spread's relative scale fluctuation is the spread-weighted
    mean of the operands'; the operand with the smaller v is taken as nested in the other
    (a branch carries its input's fluctuation plus what its own norms add), so
    ``v = v_lo + w_hi^2 (v_hi - v_lo)`` with w_hi the other operand's share of the spread
    (Post-LN: no norm inside the branch, v unchanged; Pre-LN: the branch's share, ~1/depth)."""
    wa, wb = alpha * alpha * spread_a, beta * beta * spread_b
    if v_b < v_a:
        v_a, v_b, wa, wb = v_b, v_a, wb, wa
    total = wa + wb
    share = wb / total if total > 0.0 else 0.0
    return v_a + share * share * (v_b - v_a)
