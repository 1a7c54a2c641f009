"""The JAX probe against an independent plain-numpy (float64) Transformer.

The reference below is written from the papers' block equations, not from the recipe steps in
`normfield.placements`: it only shares the parameter names and the ``y = x @ W`` orientation
(heads are contiguous column blocks of W_q, W_k, W_v, as in PyTorch's MultiheadAttention).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from normfield.arch import Arch, Init
from normfield.probe.measure import _x64_mode
from normfield.probe.model import init_params, loss_fn

TINY = dict(d_model=8, n_heads=2, d_ff=16, seq_len=5, batch_size=2, vocab_size=11)


# ---- the reference ------------------------------------------------------------------------------
def ref_sinusoidal(n: int, d: int) -> np.ndarray:
    pe = np.zeros((n, d))
    for t in range(n):
        for j in range(d):
            i2 = j - (j % 2)  # the even index 2i of the pair
            angle = t / (10000.0 ** (i2 / d))
            pe[t, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


def ref_norm(arch, x, gain):
    if arch.norm == "layernorm":
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + arch.norm_eps) * gain
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + arch.norm_eps) * gain


def ref_linear(p, name, x):
    y = x @ p[name]
    if name + ".bias" in p:
        y = y + p[name + ".bias"]
    return y


def ref_phi(name, u):
    if name == "relu":
        return np.maximum(u, 0.0)
    if name in ("gelu", "geglu"):
        return 0.5 * u * (1.0 + erf(u / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))
    if name in ("silu", "swiglu"):
        return u / (1.0 + np.exp(-u))
    raise AssertionError(name)


def ref_attention(arch, p, x):
    b, n, d = x.shape
    dh = d // arch.n_heads
    q, k, v = (ref_linear(p, f"attn.{c}", x) for c in "qkv")
    heads = np.zeros_like(x)
    for h in range(arch.n_heads):
        cols = slice(h * dh, (h + 1) * dh)
        s = q[..., cols] @ np.swapaxes(k[..., cols], 1, 2) / math.sqrt(dh)  # (b, n, n)
        if arch.mask == "causal":
            s = np.where(np.tri(n, dtype=bool)[None], s, -np.inf)
        s = s - s.max(axis=-1, keepdims=True)
        w = np.exp(s)
        w = w / w.sum(axis=-1, keepdims=True)
        heads[..., cols] = w @ v[..., cols]
    return ref_linear(p, "attn.o", heads)


def ref_ffn(arch, p, x, inner_norm=None):
    h = ref_phi(arch.activation, ref_linear(p, "ffn.w1", x))
    if arch.activation in ("swiglu", "geglu"):
        h = h * ref_linear(p, "ffn.w3", x)
    if inner_norm:
        h = ref_norm(arch, h, p[inner_norm + ".scale"])
    return ref_linear(p, "ffn.w2", h)


def ref_block(arch, p, x, layer):
    A = lambda u: ref_attention(arch, p, u)
    F = lambda u, inner=None: ref_ffn(arch, p, u, inner)
    N = lambda name, u: ref_norm(arch, u, p[name + ".scale"])
    L = arch.depth
    opts = dict(arch.placement_options)
    kind = arch.placement

    def pre(x, branch=1.0, nscale=1.0):
        x = x + branch * A(nscale * N("norm1", x))
        return x + branch * F(nscale * N("norm2", x))

    def post(x):
        x = N("norm1", x + A(x))
        return N("norm2", x + F(x))

    if kind == "post":
        return post(x)
    if kind == "b2t":  # Takase et al. 2022: the block input skips to the last norm's input
        h = N("norm1", x + A(x))
        return N("norm2", h + F(h) + x)
    if kind == "pre":
        return pre(x)
    if kind == "peri":
        x = x + N("norm1_out", A(N("norm1", x)))
        return x + N("norm2_out", F(N("norm2", x)))
    if kind == "normformer":
        x = x + N("attn_norm", A(N("norm1", x)))
        return x + F(N("norm2", x), "ffn_norm")
    if kind == "deepnorm":
        alpha = opts.get("alpha", (2.0 * L) ** 0.25)
        x = N("norm1", alpha * x + A(x))
        return N("norm2", alpha * x + F(x))
    if kind == "mixln":
        return post(x) if layer < int(opts.get("post_fraction", 0.25) * L) else pre(x)
    if kind == "lns":
        return pre(x, nscale=1.0 / math.sqrt(layer + 1))
    if kind == "scaled_pre":
        return pre(x, branch=opts.get("branch_scale", 1.0 / math.sqrt(2.0 * L)))
    raise AssertionError(kind)


def ref_stats(x):
    """E||x||^2/d, mean cosine of distinct tokens within a sequence, across sequences."""
    b, n, d = x.shape
    u = x / np.linalg.norm(x, axis=-1, keepdims=True)
    within, across = [], []
    for i in range(b):
        for j in range(b):
            c = u[i] @ u[j].T
            if i == j:
                within.extend(c[~np.eye(n, dtype=bool)])
            else:
                across.extend(c.ravel())
    return (np.mean(np.sum(x * x, -1)) / d, np.mean(within) if within else 0.0,
            np.mean(across) if across else 0.0)


def ref_loss(arch, P, tokens, targets, with_stats=False):
    x = arch.embed_scale * P["embed.tok"][tokens]
    if arch.positions == "sinusoidal":
        x = x + ref_sinusoidal(arch.seq_len, arch.d_model)
    elif arch.positions == "learned":
        x = x + P["embed.pos"]
    if arch.embed_norm:
        x = ref_norm(arch, x, P["embed_norm.scale"])
    stats = [ref_stats(x)] if with_stats else []
    for layer in range(arch.depth):
        p = {k: v[layer] for k, v in P["layers"].items()}
        x = ref_block(arch, p, x, layer)
        if with_stats:
            stats.append(ref_stats(x))
    final = (arch.final_norm if arch.final_norm is not None
             else arch.placement not in ("post", "deepnorm", "b2t"))
    if final:
        x = ref_norm(arch, x, P["final_norm.scale"])
    head = P["embed.tok"].T if arch.tied_head else P["head.out"]
    logits = x @ head
    m = logits.max(axis=-1, keepdims=True)
    logz = m[..., 0] + np.log(np.exp(logits - m).sum(axis=-1))
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = float(np.mean(logz - picked))
    return (loss, np.asarray(stats)) if with_stats else loss


# ---- fixtures -----------------------------------------------------------------------------------
CONFIGS = {
    "post": dict(placement="post", depth=2),
    "pre": dict(placement="pre", depth=3, norm="rmsnorm", activation="gelu", mask="causal",
                positions="learned", tied_head=True, norm_eps=0.1),
    "peri_swiglu": dict(placement="peri", depth=2, activation="swiglu", mask="causal", bias=True,
                        norm_eps=0.2),
    "deepnorm": dict(placement="deepnorm", depth=3, activation="gelu_tanh", positions="learned",
                     bias=True, final_norm=True, embed_norm=True),
    "normformer_geglu": dict(placement="normformer", depth=2, norm="rmsnorm", activation="geglu",
                             positions="none"),
    "mixln": dict(placement="mixln", depth=3, placement_options=(("post_fraction", 0.5),),
                  activation="silu", init=Init(scheme="normal", std=0.5, residual_scaling=True)),
    "lns": dict(placement="lns", depth=3, embed_scale=2.0, mask="causal"),
    "scaled_pre_torch": dict(placement="scaled_pre", depth=2, final_norm=False, bias=True,
                             init=Init(scheme="torch")),
    "b2t_rms": dict(placement="b2t", depth=3, norm="rmsnorm", mask="causal", bias=True),
}


def perturb_norms_and_biases(params, rng):
    """`params` in float64 with the norm gains and biases moved off their init values (1 and 0)
    so that they matter."""
    def perturb(path, a):
        key = jax.tree_util.keystr(path)
        a = np.asarray(a, np.float64)
        if key.endswith(".scale']"):
            return a + 0.3 * rng.standard_normal(a.shape)
        if key.endswith(".bias']"):
            return a + 0.2 * rng.standard_normal(a.shape)
        return a
    return jax.tree_util.tree_map_with_path(perturb, params)


FROM_INIT_PARAMS = ("post", "pre")  # the others draw numpy weights (saves XLA compile time)


def numpy_params(arch, rng):
    """Weights with the probe's layout (checked against `init_params`' abstract shapes) and
    each group's init std, drawn by numpy."""
    abstract = jax.eval_shape(lambda k: init_params(arch, k), jax.random.PRNGKey(0))

    def draw(path, leaf):
        key = jax.tree_util.keystr(path)
        name = key.split("'")[-2]
        if name.endswith(".scale") or name.endswith(".bias"):
            return np.ones(leaf.shape) if name.endswith(".scale") else np.zeros(leaf.shape)
        return arch.param_init(name).std * rng.standard_normal(leaf.shape)
    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.lru_cache(maxsize=None)
def make_case(name, seed=0):
    """(arch, float32 params, the same params in float64, tokens, targets, JAX loss, JAX stream
    statistics, JAX grads)."""
    arch = Arch(**{**TINY, **CONFIGS[name]})
    rng = np.random.default_rng(seed)
    if name in FROM_INIT_PARAMS:
        params = jax.jit(init_params, static_argnums=0)(arch, jax.random.PRNGKey(seed))
    else:
        params = numpy_params(arch, rng)

    P64 = perturb_norms_and_biases(params, rng)
    P32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), P64)
    P64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32).astype(np.float64), P32)
    shape = (arch.batch_size, arch.seq_len)
    tokens = rng.integers(0, arch.vocab_size, shape)
    targets = rng.integers(0, arch.vocab_size, shape)
    f = jax.jit(jax.value_and_grad(lambda p, t, y: loss_fn(arch, p, t, y), has_aux=True))
    with jax.default_matmul_precision("highest"):
        (loss, stats), grads = f(P32, jnp.asarray(tokens), jnp.asarray(targets))
    grads = jax.tree_util.tree_map(np.asarray, grads)
    return arch, P32, P64, tokens, targets, float(loss), np.asarray(stats[""], np.float64), grads


# ---- tests --------------------------------------------------------------------------------------
def test_reference_sinusoid_matches_paper_formula_spotcheck():
    pe = ref_sinusoidal(5, 8)
    assert pe[3, 2] == pytest.approx(math.sin(3 / 10000 ** (2 / 8)))
    assert pe[3, 3] == pytest.approx(math.cos(3 / 10000 ** (2 / 8)))
    assert pe[0, 1] == 1.0 and pe[0, 0] == 0.0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_stream_stats_match_numpy(name):
    arch, P32, P64, tokens, targets, loss, stats, _ = make_case(name)
    ref, ref_st = ref_loss(arch, P64, tokens, targets, with_stats=True)
    # float32 forward of a tiny net vs float64: agreement to a few float32 ulps of O(1) values
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert 0.5 < ref < 20  # a real cross-entropy, not a degenerate value
    np.testing.assert_allclose(stats, ref_st, rtol=1e-4, atol=1e-5)


def test_reference_is_sensitive():
    """Sanity of the comparison itself: a wrong placement gives a different loss."""
    arch, P32, P64, tokens, targets, loss, _, _ = make_case("pre")
    assert abs(ref_loss(arch.replace(mask="bidirectional"), P64, tokens, targets) - loss) > 1e-4


def _fd_coords(g, rng, k=2):
    flat = np.abs(g).ravel()
    picks = list(rng.choice(flat.size, size=min(k, flat.size), replace=False))
    picks.append(int(np.argmax(flat)))
    return [np.unravel_index(i, g.shape) for i in picks]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grad_matches_numpy_finite_differences(name):
    arch, P32, P64, tokens, targets, _, _, grads = make_case(name)
    rng = np.random.default_rng(7)
    h = 1e-5  # float64 central differences: truncation ~h^2, roundoff ~1e-16/h, both << 1e-8
    checked = 0
    entries = [(("layers", n), grads["layers"][n]) for n in grads["layers"]]
    entries += [((n,), grads[n]) for n in grads if n != "layers"]
    for path, g in entries:
        scale = np.max(np.abs(g))
        for idx in _fd_coords(g, rng):
            def at(delta):
                Q = jax.tree_util.tree_map(np.copy, P64)
                target = Q[path[0]][path[1]] if len(path) == 2 else Q[path[0]]
                target[idx] += delta
                return ref_loss(arch, Q, tokens, targets)
            fd = (at(h) - at(-h)) / (2 * h)
            # JAX grads are float32: relative error ~1e-6 of the largest terms; 1e-3 relative
            # plus 1e-4 of the parameter's largest entry leaves ample room and still rejects
            # any wrong factor, sign or missing term.
            assert abs(g[idx] - fd) <= 1e-3 * abs(fd) + 1e-4 * scale + 1e-7, \
                f"{name}: d loss / d {path}{idx}: jax {g[idx]:.6e} vs finite diff {fd:.6e}"
            checked += 1
    assert checked >= 3 * len(entries)
    assert np.max(np.abs(grads["layers"]["attn.q"][0])) > 0


@pytest.mark.parametrize("name", list(FROM_INIT_PARAMS))
def test_float64_mode_matches_numpy_to_float64_rounding(name):
    """``precision="float64"`` computes every operation in float64: loss and stream statistics
    agree with the float64 reference to 1e-11 (one float32 cast anywhere in the path would
    leave errors ~1e-7, the float32 mode's above), and so does the loss's derivative along a
    random direction in every parameter (Richardson-extrapolated float64 central differences
    of the reference: truncation O(h^4), roundoff ~1e-16/h ~1e-12 at h = 1e-4)."""
    arch, _, P64, tokens, targets, loss32, _, _ = make_case(name)
    ref, ref_st = ref_loss(arch, P64, tokens, targets, with_stats=True)
    with _x64_mode(), jax.default_matmul_precision("highest"):
        f = jax.jit(jax.value_and_grad(
            lambda p, t, y: loss_fn(arch, p, t, y, precision="float64"), has_aux=True))
        (loss, stats), grads = f(jax.tree_util.tree_map(jnp.asarray, P64),
                                 jnp.asarray(tokens), jnp.asarray(targets))
    assert loss.dtype == jnp.float64
    assert loss == pytest.approx(ref, rel=1e-11)
    assert abs(loss32 - ref) > 1e-9  # the float32 mode is measurably less exact
    np.testing.assert_allclose(np.asarray(stats[""]), ref_st, rtol=1e-10, atol=1e-11)
    rng = np.random.default_rng(3)
    direction = jax.tree_util.tree_map(lambda a: rng.standard_normal(np.shape(a)), P64)

    def central(h):
        moved = [jax.tree_util.tree_map(lambda a, u, s=s: a + s * h * u, P64, direction)
                 for s in (1.0, -1.0)]
        return (ref_loss(arch, moved[0], tokens, targets)
                - ref_loss(arch, moved[1], tokens, targets)) / (2 * h)

    fd = (4.0 * central(5e-5) - central(1e-4)) / 3.0
    dot = sum(float(np.sum(np.asarray(g) * u)) for g, u in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)))
    assert dot == pytest.approx(fd, rel=1e-8, abs=1e-10)
