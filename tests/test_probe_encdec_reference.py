"""The encoder-decoder probe against an independent plain-numpy (float64) Transformer.

The reference below is written from the architecture (Vaswani et al. 2017, section 3.1), not from
the recipe steps in `normfield.placements`: ``depth`` encoder blocks (bidirectional
self-attention, FFN) over the source tokens, then ``decoder_depth`` decoder blocks (causal
self-attention, cross-attention whose queries come from the decoder stream and whose keys and
values come from the encoder output -- after the encoder's final norm when the placement has
one --, FFN) over the decoder-input tokens; the loss is the mean cross-entropy of the decoder's
logits.  It shares with the probe only the parameter names (``enc.``/``dec.`` prefixes, norms
``norm1, norm2, norm3`` in sublayer order) and the ``y = x @ W`` orientation; the per-token
helpers (norm, linear, activation, sinusoid, stream statistics) come from
`test_probe_reference`.

Checked: the loss and the per-stack stream statistics of `loss_fn`; JAX's gradient of every
parameter of both stacks against float64 central finite differences of the reference along
random directions and along the gradient itself; and `measure_grad_norms`' per-seed squared norms
and activation statistics against the same quantities recomputed for each seed's parameters and
data.  Three archs only (XLA compiles each function once per arch).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_probe_reference import (perturb_norms_and_biases, ref_linear,
                                  ref_norm, ref_phi, ref_sinusoidal, ref_stats)

from normfield.arch import Arch
from normfield.probe.measure import measure_grad_norms, sample_batch
from normfield.probe.model import init_params, loss_fn

TINY = dict(d_model=16, n_heads=2, d_ff=32, seq_len=5, batch_size=2, vocab_size=13)
CONFIGS = {
    # Post-LN: no final norms, sinusoidal positions, head tied to the decoder's embedding;
    # different stack depths so that a swap of the two stacks shows
    "post_tied": dict(placement="post", depth=3, decoder_depth=2, tied_head=True),
    # Pre-LN: a final norm per stack, learned positions per stack, biases, untied head
    "pre_learned_bias": dict(placement="pre", depth=2, decoder_depth=3, positions="learned",
                             bias=True, activation="gelu"),
    # B2T: the block input skips to the input of each block's last norm (norm2 / norm3)
    "b2t": dict(placement="b2t", depth=2, decoder_depth=2),
}
MEASURED = "post_tied"  # measure_grad_norms is compiled for this arch only (~40 s here)
MEASURE_KEY, MEASURE_SEEDS = 3, 2


# ---- the reference ------------------------------------------------------------------------------
def ref_mha(arch, p, prefix, x, memory=None, causal=False):
    """Multi-head attention: queries from x, keys and values from `memory` (cross-attention)
    or from x (self-attention); heads are contiguous column blocks; output projection
    ``{prefix}.o``."""
    src = x if memory is None else memory
    q = ref_linear(p, prefix + ".q", x)
    k = ref_linear(p, prefix + ".k", src)
    v = ref_linear(p, prefix + ".v", src)
    b, n, d = x.shape
    dh = d // arch.n_heads
    heads = np.zeros_like(q)
    for h in range(arch.n_heads):
        cols = slice(h * dh, (h + 1) * dh)
        s = np.einsum("bqc,bkc->bqk", q[..., cols], k[..., cols]) / math.sqrt(dh)
        if causal:
            s = np.where(np.tri(n, src.shape[1], dtype=bool)[None], s, -np.inf)
        s = s - s.max(axis=-1, keepdims=True)
        w = np.exp(s)
        w = w / w.sum(axis=-1, keepdims=True)
        heads[..., cols] = w @ v[..., cols]
    return ref_linear(p, prefix + ".o", heads)


def ref_ffn(arch, p, x):
    h = ref_phi(arch.activation, ref_linear(p, "ffn.w1", x))
    if arch.activation in ("swiglu", "geglu"):
        h = h * ref_linear(p, "ffn.w3", x)
    return ref_linear(p, "ffn.w2", h)


def ref_block(arch, p, x, role, memory=None, decoder_causal=True):
    """One encoder (role "enc") or decoder ("dec") block; Post-LN ``x = LN_i(x + F_i(x))`` or
    Pre-LN ``x = x + F_i(LN_i(x))`` for its sublayers F_1, F_2(, F_3) in order; B2T is Post-LN
    with the block input added to the last norm's input (Takase et al. 2022)."""
    if role == "enc":
        sub = [lambda u: ref_mha(arch, p, "attn", u, causal=arch.mask == "causal"),
               lambda u: ref_ffn(arch, p, u)]
    else:
        sub = [lambda u: ref_mha(arch, p, "self_attn", u, causal=decoder_causal),
               lambda u: ref_mha(arch, p, "cross_attn", u, memory=memory),
               lambda u: ref_ffn(arch, p, u)]
    bottom = x
    for i, F in enumerate(sub, 1):
        gain = p[f"norm{i}.scale"]
        if arch.placement == "post" or (arch.placement == "b2t" and i < len(sub)):
            x = ref_norm(arch, x + F(x), gain)
        elif arch.placement == "b2t":
            x = ref_norm(arch, x + F(x) + bottom, gain)
        elif arch.placement == "pre":
            x = x + F(ref_norm(arch, x, gain))
        else:
            raise AssertionError(arch.placement)
    return x


def ref_stack(arch, P, role, tokens, memory=None, with_final=True, decoder_causal=True):
    """Embedding, blocks and (if any) final norm of one stack: (output, pre-final-norm stream,
    stream statistics after the embedding and after each block)."""
    depth = arch.depth if role == "enc" else arch.decoder_depth
    x = arch.embed_scale * P[f"{role}.embed.tok"][tokens]
    if arch.positions == "sinusoidal":
        x = x + ref_sinusoidal(arch.seq_len, arch.d_model)
    elif arch.positions == "learned":
        x = x + P[f"{role}.embed.pos"]
    stats = [ref_stats(x)]
    for layer in range(depth):
        p = {k: v[layer] for k, v in P[f"{role}.layers"].items()}
        x = ref_block(arch, p, x, role, memory, decoder_causal)
        stats.append(ref_stats(x))
    raw = x
    final = arch.final_norm if arch.final_norm is not None else arch.placement == "pre"
    if final and with_final:
        x = ref_norm(arch, x, P[f"{role}.final_norm.scale"])
    return x, raw, np.asarray(stats)


def ref_loss(arch, P, tokens, targets, with_stats=False, memory_before_final_norm=False,
             decoder_causal=True, head_from="dec"):
    """Mean cross-entropy over the decoder positions (float64).  The keyword switches build
    deliberately wrong variants (for `test_reference_is_sensitive`)."""
    source, dec_in = (np.asarray(t) for t in tokens)
    enc_out, enc_raw, enc_stats = ref_stack(arch, P, "enc", source)
    memory = enc_raw if memory_before_final_norm else enc_out
    y, _, dec_stats = ref_stack(arch, P, "dec", dec_in, memory, decoder_causal=decoder_causal)
    head = P[f"{head_from}.embed.tok"].T if arch.tied_head else P["head.out"]
    logits = y @ head
    m = logits.max(axis=-1, keepdims=True)
    logz = m[..., 0] + np.log(np.exp(logits - m).sum(axis=-1))
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]
    loss = float(np.mean(logz - picked))
    return (loss, {"enc.": enc_stats, "dec.": dec_stats}) if with_stats else loss


# ---- fixtures -----------------------------------------------------------------------------------
def _f64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32).astype(np.float64), tree)


@functools.lru_cache(maxsize=None)
def compiled(name):
    """(arch, seed draw, loss-and-grad), each compiled once per arch.

    The seed draw reproduces `measure.one_seed`: the seed's key is split into a parameter key
    and a data key."""
    arch = Arch(**{**TINY, **CONFIGS[name]})

    def draw(key):
        k_param, k_data = jax.random.split(key)
        return init_params(arch, k_param), sample_batch(arch, k_data)

    vg = jax.value_and_grad(lambda p, t, y: loss_fn(arch, p, t, y), has_aux=True)
    return arch, jax.jit(draw), jax.jit(vg)


def seed_keys(seeds=MEASURE_SEEDS, key=MEASURE_KEY):
    """The per-seed keys of ``measure_grad_norms(arch, seeds, key)``."""
    return jax.random.split(jax.random.PRNGKey(key), seeds)


def jax_loss_grad(name, params, tokens, targets):
    _, _, vg = compiled(name)
    with jax.default_matmul_precision("highest"):  # as measure_grad_norms in float32
        (loss, stats), grads = vg(params, tokens, targets)
    return (float(loss), jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), stats),
            jax.tree_util.tree_map(np.asarray, grads))


@functools.lru_cache(maxsize=None)
def perturbed_case(name):
    """Seed 0's parameters from `init_params` and batch from `sample_batch`, with the norm gains
    and biases moved off their init values (1 and 0) so that they matter; float32 for JAX and
    the same numbers in float64 for the reference."""
    arch, draw, _ = compiled(name)
    params, (tokens, targets) = draw(seed_keys()[0])
    perturbed = perturb_norms_and_biases(params, np.random.default_rng(11))
    P32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), perturbed)
    P64 = _f64(P32)
    loss, stats, grads = jax_loss_grad(name, P32, tokens, targets)
    return arch, P32, P64, tokens, targets, loss, stats, grads


@functools.lru_cache(maxsize=None)
def measured():
    arch, _, _ = compiled(MEASURED)
    return measure_grad_norms(arch, seeds=MEASURE_SEEDS, key=MEASURE_KEY)


def _entries(tree):
    """(path, array) of every parameter: ("enc.layers", name) for stacked ones, (name,) else."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += [((k, n), a) for n, a in v.items()]
        else:
            out.append(((k,), v))
    return out


def _get(tree, path):
    return tree[path[0]][path[1]] if len(path) == 2 else tree[path[0]]


def _fd_along(arch, P64, tokens, targets, path, direction, h=1e-5):
    """Central difference of the float64 reference loss along `direction` (unit norm) of the
    parameter at `path`."""
    def at(t):
        Q = jax.tree_util.tree_map(np.copy, P64)
        _get(Q, path)[...] += t * direction
        return ref_loss(arch, Q, tokens, targets)
    return (at(h) - at(-h)) / (2 * h)


def _close(jax_value, fd, gnorm):
    # JAX's gradient is float32: each entry carries a relative rounding error of ~1e-6 of the
    # largest terms summed into it, so its projection on a unit direction is off by at most
    # ~1e-6 ||g|| (a few ulps times the tensor's gradient norm).  The float64 central difference
    # with h = 1e-5 on a unit direction has truncation error ~h^2 |L'''| ~ 1e-10 and roundoff
    # ~1e-16 |L| / h ~ 1e-11.  Tolerance 1e-3 relative + 1e-4 ||g|| is ample for both and still
    # rejects a wrong factor, sign or missing path (those change the value by O(1) relative).
    return abs(jax_value - fd) <= 1e-3 * abs(fd) + 1e-4 * gnorm + 1e-9


# ---- tests --------------------------------------------------------------------------------------
def test_reference_block_shapes_match_init_params():
    """The reference reads every parameter that init_params creates (and nothing else)."""
    arch, draw, _ = compiled("pre_learned_bias")
    abstract = jax.eval_shape(lambda k: init_params(arch, k), jax.random.PRNGKey(0))
    names = {".".join(p) if len(p) == 1 else p[0][: -len("layers")] + p[1]
             for p, _ in _entries(abstract)}
    expected = {"enc.embed.tok", "dec.embed.tok", "enc.embed.pos", "dec.embed.pos",
                "enc.final_norm.scale", "dec.final_norm.scale", "head.out"}
    for prefix, subs in (("enc.", ("attn",)), ("dec.", ("self_attn", "cross_attn"))):
        for s in subs:
            for c in "qkvo":
                expected |= {f"{prefix}{s}.{c}", f"{prefix}{s}.{c}.bias"}
        expected |= {prefix + n for n in ("ffn.w1", "ffn.w1.bias", "ffn.w2", "ffn.w2.bias")}
        expected |= {f"{prefix}norm{i}.scale" for i in range(1, len(subs) + 2)}
    assert names == expected
    assert abstract["enc.layers"]["attn.q"].shape == (arch.depth, 16, 16)
    assert abstract["dec.layers"]["cross_attn.k"].shape == (arch.decoder_depth, 16, 16)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_stream_stats_match_numpy(name):
    arch, P32, P64, tokens, targets, loss, stats, _ = perturbed_case(name)
    assert isinstance(tokens, tuple) and len(tokens) == 2
    assert not np.array_equal(np.asarray(tokens[0]), np.asarray(tokens[1]))
    ref, ref_st = ref_loss(arch, P64, tokens, targets, with_stats=True)
    # float32 forward of a tiny net vs float64: agreement to a few float32 ulps of O(1) values
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert 1.0 < ref < 20  # a real cross-entropy, not a degenerate value
    assert set(stats) == {"enc.", "dec."}
    assert stats["enc."].shape == (arch.depth + 1, 3)
    assert stats["dec."].shape == (arch.decoder_depth + 1, 3)
    for prefix in ("enc.", "dec."):
        np.testing.assert_allclose(stats[prefix], ref_st[prefix], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_is_sensitive(name):
    """Sanity of the comparison itself: plausible wiring mistakes change the loss."""
    arch, P32, P64, tokens, targets, loss, _, _ = perturbed_case(name)
    wrong = [ref_loss(arch, P64, tokens, targets, decoder_causal=False),
             ref_loss(arch, P64, tokens[::-1], targets)]  # source and decoder input swapped
    if arch.has_final_norm:
        wrong.append(ref_loss(arch, P64, tokens, targets, memory_before_final_norm=True))
    if arch.tied_head:
        wrong.append(ref_loss(arch, P64, tokens, targets, head_from="enc"))
    for w in wrong:
        assert abs(w - loss) > 1e-4


REQUIRED = [("dec.layers", "cross_attn.k"), ("enc.layers", "attn.v"), ("enc.embed.tok",),
            ("dec.embed.tok",)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grad_matches_numpy_finite_differences(name):
    """Every parameter of both stacks: the directional derivative of JAX's gradient along a
    random unit direction of the whole tensor, and along the normalized gradient of layer 0
    (for stacked parameters) or of the tensor (globals), whose derivative is the gradient norm
    itself -- the quantity normfield measures."""
    arch, P32, P64, tokens, targets, _, _, grads = perturbed_case(name)
    rng = np.random.default_rng(5)
    entries = _entries(grads)
    paths = [p for p, _ in entries]
    for req in REQUIRED:
        assert req in paths
    assert ("head.out",) in paths if not arch.tied_head else ("head.out",) not in paths
    failures = []
    for path, g in entries:
        g = np.asarray(g, np.float64)
        gnorm = np.linalg.norm(g)
        if path[-1].endswith(".k.bias"):
            # a key bias adds q.b to every logit of a query: softmax is invariant, so the exact
            # gradient is 0 and JAX's is float32 cancellation noise (~1e-8 here, vs O(1e-2)
            # gradients of the other parameters)
            u = rng.standard_normal(g.shape)
            assert abs(_fd_along(arch, P64, tokens, targets, path, u / np.linalg.norm(u))) < 1e-9
            assert gnorm < 1e-6, path
            continue
        assert gnorm > 1e-6, path  # every other parameter reaches the loss
        u = rng.standard_normal(g.shape)
        directions = [("random", u / np.linalg.norm(u))]
        if len(path) == 2:  # layer 0 of a stacked parameter, along its gradient
            e = np.zeros_like(g)
            e[0] = g[0] / np.linalg.norm(g[0])
            directions.append(("grad[0]", e))
            if path == ("dec.layers", "cross_attn.k"):  # also a random direction in layer 0
                r = np.zeros_like(g)
                r[0] = rng.standard_normal(g.shape[1:])
                directions.append(("random[0]", r / np.linalg.norm(r)))
        else:
            directions.append(("grad", g / gnorm))
        for label, d in directions:
            fd = _fd_along(arch, P64, tokens, targets, path, d)
            value = float(np.sum(g * d))
            if not _close(value, fd, gnorm):
                failures.append(f"{path} {label}: jax {value:.6e} vs finite diff {fd:.6e}")
    assert not failures, f"{name}: " + "; ".join(failures)


def test_measure_grad_norms_per_seed_matches_recomputed_grads():
    """measure_grad_norms' per-seed squared norms equal ||dL/dW||_F^2 of each seed's parameters
    and batch (reproduced from the measurement key as `one_seed` does), and its per-layer values
    equal the float64 reference's derivative along the layer's normalized gradient."""
    arch, draw, _ = compiled(MEASURED)
    prof = measured()
    names = ["enc.attn.v", "enc.ffn.w2", "enc.norm1.scale", "dec.self_attn.q", "dec.cross_attn.k",
             "dec.cross_attn.v", "dec.norm3.scale", "dec.embed.tok", "enc.embed.tok"]
    ref_acts = {f"{p}{k}": [] for p in ("enc.", "dec.")
                for k in ("sq_norm", "cos_within", "cos_across")}
    for seed, key in enumerate(seed_keys()):
        params, (tokens, targets) = draw(key)
        _, _, grads = jax_loss_grad(MEASURED, params, tokens, targets)
        P64 = _f64(params)
        _, ref_st = ref_loss(arch, P64, tokens, targets, with_stats=True)
        for prefix, st in ref_st.items():
            for i, k in enumerate(("sq_norm", "cos_within", "cos_across")):
                ref_acts[prefix + k].append(st[:, i])
        for name in names:
            stack, rest = name.split(".", 1)
            path = (stack + ".layers", rest) if rest in grads[stack + ".layers"] else (name,)
            g = np.asarray(_get(grads, path), np.float64)
            sq = (np.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) if len(path) == 2
                  else np.array([np.sum(g * g)]))
            got = prof.per_seed_sq[name][seed]
            assert got.shape == sq.shape, name
            # two float32 programs (vmapped and optimized vs not): rounding-level differences
            np.testing.assert_allclose(got, sq, rtol=1e-4, err_msg=f"{name} seed {seed}")
            assert np.all(sq > 0)
            # and against the independent reference: d/dt L(W + t g/||g||) = ||g||
            blocks = [(i, g[i]) for i in range(g.shape[0])] if len(path) == 2 else [(..., g)]
            for i, (where, gl) in enumerate(blocks):
                e = np.zeros_like(g)
                e[where] = gl / np.linalg.norm(gl)
                fd = _fd_along(arch, P64, tokens, targets, path, e)
                assert _close(math.sqrt(got[i]), fd, np.linalg.norm(g)), (name, seed, i, fd)
    # activations: one entry per residual-stream position of each stack, seed means
    assert len(prof.activations["enc.sq_norm"]) == arch.depth + 1
    assert len(prof.activations["dec.sq_norm"]) == arch.decoder_depth + 1
    assert arch.depth != arch.decoder_depth  # the lengths tell the stacks apart
    assert {k for k in prof.activations} == set(ref_acts)
    for k, values in ref_acts.items():
        np.testing.assert_allclose(prof.activations[k], np.mean(values, axis=0), rtol=1e-4,
                                   atol=1e-5, err_msg=k)
    assert set(prof.per_seed_sq) >= set(names)
    assert "head.out" not in prof.per_seed_sq  # tied head: its gradient is in dec.embed.tok
