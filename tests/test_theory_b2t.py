"""The B2T connection's correlated add in the mean-field theory (`predict._Block` with
`maps.norm_cross_forward` / `norm_cross_backward`) against Monte-Carlo simulation in numpy.

B2T (Takase et al. 2022) adds the block input x to the input of the block's last norm,
``y = LN(h + FFN(h) + x)`` with h = LN(x + Attn(x)): the two operands are correlated, so the
kernels of the add (forward) and of the block input's gradient (backward) gain cross terms.
Tolerances: ``Z`` standard errors of the Monte-Carlo mean (estimated from the samples) plus the
documented O(1/d) approximations of the maps; each test also shows that the check can fail
(a theory without the cross terms, or with the wrong O(1/d) factor, is rejected).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from normfield.arch import MASKS, Arch, Init
from normfield.placements import PLACEMENTS, Add, Linear, Norm, block, stacks
from normfield.theory import attention
from normfield.theory.kernels import Blocks
from normfield.theory.maps import Point, norm_cross_backward, norm_cross_forward
from normfield.theory.predict import _Block, _correlated_adds

Z = 5.0  # standard errors allowed


def _norm(kind, x, eps=0.0):
    """(output, centred input, scale) of LayerNorm / RMSNorm with gain 1 over the last axis."""
    c = x - x.mean(-1, keepdims=True) if kind == "layernorm" else x
    s = np.sqrt(np.mean(c * c, -1, keepdims=True) + eps)
    return c / s, c, s


def _norm_vjp(kind, c, s, g):
    """Exact vector-Jacobian product of `_norm` (the tests of `test_theory_maps` check this
    projection form against finite differences)."""
    gc = g / s - c * np.sum(g * c, -1, keepdims=True) / (c.shape[-1] * s ** 3)
    return gc - gc.mean(-1, keepdims=True) if kind == "layernorm" else gc


def _random_kernel(rng, n, cos):
    a = rng.normal(size=(n, n + 2))
    k = a @ a.T / (n + 2)
    return (1 - cos) * k + cos * np.sqrt(np.outer(np.diag(k), np.diag(k)))


def _batch_kernel(rng, n, b):
    """Full (b n) x (b n) covariance with the Blocks structure (a part shared by the b
    sequences and a part of their own) and its Blocks."""
    shared, own = _random_kernel(rng, n, 0.2) * 0.5, _random_kernel(rng, n, 0.4)
    full = np.kron(np.ones((b, b)), shared) + np.kron(np.eye(b), own)
    return full, Blocks(shared + own, shared.copy())


def _mc_mean(samples):
    """Mean and standard error over the leading (sample) axis."""
    return samples.mean(0), samples.std(0) / np.sqrt(len(samples))


# ---- the norm's cross-kernel maps -------------------------------------------------------------
@pytest.mark.parametrize("kind,with_means", [("layernorm", True), ("rmsnorm", False)])
def test_norm_cross_forward_vs_mc(kind, with_means):
    """``X_y(i,j) = E[y_i . r_j]/d`` of y = Norm(x) with a reference r whose coordinates are
    jointly Gaussian with those of x (and per-token coordinate means), at d = 64: the map's
    factor ``E[s_i]/C(i,i) = (1 - 1/(4k))/sqrt(C)`` agrees to MC error + O(1/d^2), while the
    leading-order factor 1/sqrt(C) and the Jensen factor E[1/s_i] = (1 + 3/(4k))/sqrt(C) of
    the backward map are off by 1/(4d) and 3/(4d) and fail."""
    rng = np.random.default_rng(60)
    n, d, reps = 3, 64, 120_000
    kz = _random_kernel(rng, 2 * n, 0.3)  # tokens x_0..x_{n-1}, then references r_0..r_{n-1}
    mu = np.array([1.0, -0.6, 0.4, 0.8, 0.0, -1.2]) * with_means
    chol = np.linalg.cholesky(kz)
    xs, ms = [], []
    for _ in range(reps // 20_000):
        u = mu[:, None] + chol @ rng.normal(size=(20_000, 2 * n, d))
        y, _, _ = _norm(kind, u[:, :n])
        r = u[:, n:]
        xs.append(y @ np.swapaxes(r, 1, 2) / d)
        ms.append(y.mean(-1)[:, :, None] * r.mean(-1)[:, None, :])
    mean, se = _mc_mean(np.concatenate(xs))
    mmean, mse = _mc_mean(np.concatenate(ms))

    mm = np.outer(mu, mu)
    k, m = mm + kz, mm + kz / d
    blk = lambda a: Blocks(a, a)
    x = Point(blk(k[:n, :n]), blk(m[:n, :n]), d)
    got, got_m = norm_cross_forward(x, blk(k[:n, n:]), blk(m[:n, n:]), kind, 0.0)
    np.testing.assert_array_less(np.abs(mean - got.w), Z * se + 2.0 / d ** 2)
    np.testing.assert_array_less(np.abs(mmean - got_m.w), Z * mse + 2.0 / d ** 2)
    if kind == "layernorm":
        assert np.all(got_m.w == 0.0)
    k_dof = d - 1.0 if kind == "layernorm" else float(d)
    for factor in (1.0, 1.0 + 0.75 / k_dof):  # leading order, then the Jensen factor E[1/s]
        wrong = got.w * factor / (1.0 - 0.25 / k_dof)
        assert np.max(np.abs(mean - wrong) - Z * se) > 0


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_cross_backward_vs_mc(kind):
    """``Y_x(i,j) = E[(J_i^T g_i) . g_j]/d`` for an isotropic gradient g through the exact norm
    Jacobian J_i of token i (x drawn afresh per sample, with coordinate means): the map's
    per-token factor (d - p)/d E[1/s_i] agrees to MC error + O(1/d^2); without its two O(1/d)
    parts (projection trace and Jensen factor) the check fails at d = 64."""
    rng = np.random.default_rng(61)
    n, d, reps = 4, 64, 60_000
    mu = np.array([1.0, -0.5, 0.3, 2.0])
    kz, gk = _random_kernel(rng, n, 0.5), _random_kernel(rng, n, 0.4)
    x = mu[:, None] + np.linalg.cholesky(kz) @ rng.normal(size=(reps, n, d))
    g = np.linalg.cholesky(gk) @ rng.normal(size=(reps, n, d))
    _, c, s = _norm(kind, x)
    est = _norm_vjp(kind, c, s, g) @ np.swapaxes(g, 1, 2) / d
    mean, se = _mc_mean(est)
    mm = np.outer(mu, mu)
    pt = Point(Blocks(mm + kz, mm + kz), Blocks(mm + kz / d, mm + kz / d), d)
    f = norm_cross_backward(pt, kind, 0.0)
    want = f[:, None] * gk
    scale = np.sqrt(np.outer(np.diag(want), np.diag(want)))
    np.testing.assert_array_less(np.abs(mean - want), Z * se + 4.0 / d ** 2 * scale)
    cc = np.diag(kz) * (1 - 1 / d) if kind == "layernorm" else np.diag(mm + kz)
    naive = gk / np.sqrt(cc)[:, None]
    if kind == "layernorm":  # for RMSNorm the two O(1/d) parts nearly cancel
        assert np.max(np.abs(mean - naive) - Z * se) > 0


# ---- one B2T block ----------------------------------------------------------------------------
D, D_FF, N_TOK, BATCH = 1024, 512, 3, 2
DRAWS, PER_DRAW = 12, 16  # weight draws, and input draws per weight draw
KEYS = ("K_z", "K_y", "G_x", "G_mem")


def _block_arch(role: str, kind: str) -> tuple[Arch, object]:
    """One B2T block at d 1024 whose attention is exactly uniform (W_q = W_k = 0, so the
    attention maps, validated elsewhere, add no approximation here): an encoder block with a
    causal mask, or an encoder-decoder's decoder block (causal self-attention,
    cross-attention to a memory, FFN)."""
    kw = dict(placement="b2t", d_model=D, n_heads=D // 64, d_ff=D_FF, seq_len=N_TOK,
              batch_size=BATCH, norm=kind, init=Init(stds=(("attn.q", 0.0), ("attn.k", 0.0))))
    if role == "decoder":
        arch = Arch(depth=1, decoder_depth=1, **kw)
        return arch, stacks(arch)[1]
    arch = Arch(depth=1, mask="causal", **kw)
    return arch, stacks(arch)[0]


def _theory(arch, stack, x: Point, mem: Point | None, g_out: Blocks, cross_terms=True) -> dict:
    masks = {kind: attention.Mask.build(kind, N_TOK) for kind in MASKS}
    blk = _Block(arch, block(arch, 0, stack), masks, "analytic", stack)
    if not cross_terms:  # the theory as if the skip's operands were uncorrelated
        blk.carries, blk.correlated = frozenset(), frozenset()
    env, saved = blk.forward(x, mem)
    g_x, g_mem, _ = blk.backward(env, saved, g_out)
    out = {"K_z": env["z"].k, "K_y": env[blk.steps[-1].dst].k, "G_x": g_x}
    if g_mem is not None:
        out["G_mem"] = g_mem
    return out


@functools.lru_cache(maxsize=None)
def _block_case(role: str, kind: str):
    """Theory (with and without the cross terms) and Monte Carlo of one block.

    Inputs x_t = mu_t 1 + z_t (z Gaussian with a Blocks kernel: coordinate means as from
    positions), a memory of the same form (decoder), and an output gradient g_y drawn
    independently of the block (gradient independence); weights Xavier-normal, drawn DRAWS
    times, each used for PER_DRAW inputs.  Returns ``{key: (mc mean, mc se, theory,
    theory without cross terms, scale)}`` for the within (w) and across (c) blocks, the scale
    being sqrt(K(i,i) K(j,j)) of the theory."""
    rng = np.random.default_rng(70)
    arch, stack = _block_arch(role, kind)
    n, b, d, eps = N_TOK, BATCH, D, arch.norm_eps
    mu, mu_mem = np.array([0.8, -0.5, 0.3]), np.array([0.2, 0.6, -0.4])
    (kz_full, kz), (km_full, km), (g_full, gk) = (_batch_kernel(rng, n, b) for _ in range(3))

    def point(k, mean):
        mm = np.outer(mean, mean)
        return Point(k + mm, k * (1.0 / d) + mm, d)

    x_pt, mem_pt = point(kz, mu), (point(km, mu_mem) if role == "decoder" else None)
    theory = _theory(arch, stack, x_pt, mem_pt, gk)
    dropped = _theory(arch, stack, x_pt, mem_pt, gk, cross_terms=False)

    mean_attn = {m: np.kron(np.eye(b), attention.Mask.build(m, n).mean) for m in MASKS}
    chol = {name: np.linalg.cholesky(full) for name, full in
            (("x", kz_full), ("mem", km_full), ("g", g_full))}
    std = {g: arch.param_init(g, stack).std for g in ("attn.v", "attn.o", "ffn.w1", "ffn.w2")}

    def mm(a, w):
        return (a.reshape(-1, a.shape[-1]) @ w).reshape(*a.shape[:-1], w.shape[1])

    est = {key: [] for key in theory}
    for _ in range(DRAWS):
        def weights(group, fan_in=d, fan_out=d):
            return std[group] * rng.standard_normal((fan_in, fan_out))

        x = np.tile(mu, b)[:, None] + chol["x"] @ rng.standard_normal((PER_DRAW, n * b, d))
        # attention sublayers: o = A (src W_v) W_o with the mean attention A (uniform)
        subs = [("causal", None)] + ([("bidirectional", "mem")] if role == "decoder" else [])
        mem = (np.tile(mu_mem, b)[:, None]
               + chol["mem"] @ rng.standard_normal((PER_DRAW, n * b, d))) if role == "decoder" else None
        h, caches = x, []
        for mask, kv in subs:
            wv, wo = weights("attn.v"), weights("attn.o")
            src = h if kv is None else mem
            r = h + mm(mean_attn[mask] @ mm(src, wv), wo)
            h, c, s = _norm(kind, r, eps)
            caches.append((mask, kv, wv, wo, c, s))
        w1, w2 = weights("ffn.w1", d, D_FF), weights("ffn.w2", D_FF, d)
        u = mm(h, w1)
        z = h + mm(np.maximum(u, 0.0), w2) + x
        y, cz, sz = _norm(kind, z, eps)
        # backward from g_y
        g_z = _norm_vjp(kind, cz, sz, chol["g"] @ rng.standard_normal((PER_DRAW, n * b, d)))
        g_h = g_z + mm(mm(g_z, w2.T) * (u > 0), w1.T)
        g_x, g_mem = g_z, 0.0  # the bottom-to-top skip
        for mask, kv, wv, wo, c, s in reversed(caches):
            g_r = _norm_vjp(kind, c, s, g_h)
            g_src = mm(mean_attn[mask].T @ mm(g_r, wo.T), wv.T)
            if kv is None:
                g_h = g_r + g_src
            else:
                g_h, g_mem = g_r, g_mem + g_src
        g_x = g_x + g_h
        for key, a in (("K_z", z), ("K_y", y), ("G_x", g_x), ("G_mem", g_mem)):
            if key in theory:
                est[key].append(np.mean(a @ np.swapaxes(a, 1, 2) / d, axis=0))

    out = {}
    for key, values in est.items():
        e = np.array(values)  # (DRAWS, n b, n b)
        seq = [e[:, i * n:(i + 1) * n] for i in range(b)]
        within = np.mean([s[..., i * n:(i + 1) * n] for i, s in enumerate(seq)], axis=0)
        across = np.mean([s[..., j * n:(j + 1) * n] for i, s in enumerate(seq)
                          for j in range(b) if j != i], axis=0)
        diag = np.diag(theory[key].w)
        scale = np.sqrt(np.outer(diag, diag))
        out[key] = {part: (*_mc_mean(mc), getattr(theory[key], part), getattr(dropped[key], part),
                           scale) for part, mc in (("w", within), ("c", across))}
    return out


def _tolerance(se, scale):
    """Z standard errors plus 2/d of the scale: the norms' ratio-of-expectations forward map
    and gradient independence are exact to O(1/d) only."""
    return Z * se + 2.0 / D * scale


CASES = [("encoder", "layernorm"), ("encoder", "rmsnorm"), ("decoder", "layernorm")]


@pytest.mark.parametrize("role,kind", CASES)
def test_b2t_block_vs_mc(role, kind):
    """Forward kernel before the last norm (K_z, where the cross term is 30-40% of the
    kernel) and at the block output (K_y), backward gradient kernel at the block input (G_x)
    and, for the decoder block, at the memory (G_mem), within and across sequences: theory
    and Monte Carlo agree within the tolerance (observed: within ~3 standard errors)."""
    for key, parts in _block_case(role, kind).items():
        for part, (mean, se, th, _, scale) in parts.items():
            np.testing.assert_array_less(np.abs(mean - th), _tolerance(se, scale),
                                         err_msg=f"{role} {kind} {key}.{part}")


@pytest.mark.parametrize("role,kind", CASES)
def test_b2t_block_check_rejects_the_theory_without_cross_terms(role, kind):
    """The same check fails for the theory with the add's cross terms dropped (K = K_r + K_x
    and G_x = G_ref + G_path): in K_z, K_y and G_x, within and across sequences."""
    case = _block_case(role, kind)
    for key in ("K_z", "K_y", "G_x"):
        for part, (mean, se, _, dropped, scale) in case[key].items():
            assert np.max(np.abs(mean - dropped) - _tolerance(se, scale)) > 0, (key, part)


# ---- the interpreter's rules ------------------------------------------------------------------
SMALL = dict(d_model=64, n_heads=2, d_ff=128, seq_len=4, batch_size=2, vocab_size=64)


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_only_b2t_has_a_correlated_add(placement):
    """Placements without a skip of the block input past a norm track nothing (their
    predictions are those of the plain kernel sums); B2T has exactly one correlated add, the
    last one, in every stack."""
    for kw in (dict(), dict(decoder_depth=2)):
        if kw and not PLACEMENTS[placement].encoder_decoder:
            continue
        arch = Arch(depth=4, placement=placement, **SMALL, **kw)
        for stack in stacks(arch):
            for layer in range(stack.depth):
                steps = block(arch, layer, stack)
                carries, correlated = _correlated_adds(steps)
                if placement != "b2t":
                    assert not carries and not correlated
                else:
                    (i,) = correlated
                    assert isinstance(steps[i], Add) and "x" in (steps[i].a, steps[i].b)
                    assert isinstance(steps[i + 1], Norm) and i + 1 == len(steps) - 1


@pytest.mark.parametrize("steps,match", [
    ((Norm("n1", "x", "h1"), Norm("n2", "x", "h2"), Add("h1", "h2", "out")), "neither"),
    ((Norm("n1", "x", "h"), Add("h", "x", "r"), Add("r", "x", "out")), "more than one"),
])
def test_unsupported_correlations_raise(steps, match):
    with pytest.raises(NotImplementedError, match=match):
        _correlated_adds(steps)


def test_uncorrelated_skip_needs_no_tracking():
    """An add of x and a branch that ends in a weight is an ordinary residual add."""
    steps = (Norm("n1", "x", "h"), Linear("ffn.w1", "h", "b"), Add("x", "b", "out"))
    assert _correlated_adds(steps) == (frozenset(), frozenset())
