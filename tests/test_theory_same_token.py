"""The same-token companion of a kernel (`kernels`: the kernel of a pair of positions given that
they hold the same token) and the token-embedding gradient it gives.

The companion is propagated by the maps evaluated at the conditioned entry, with the sums over
all pairs taken from the unconditioned kernel.  That is what the maps give when one pair alone
is conditioned, up to that pair's share of the sums (O(1/n^2)); the attention maps, the only
ones with such sums, are checked against exactly that.  End to end, the embedding gradient of a
network whose tokens collide often (vocabulary 8: a pair collides with probability 1/8) is
checked against the probe, and so are the weight gradients that take the covariance of their
input and gradient kernels through a pair's token event (`pair_sum`)."""

import numpy as np
import pytest

from normfield import Arch
from normfield.probe.measure import measure_grad_norms
from normfield.theory import attention
from normfield.theory.kernels import Blocks, pair_sum
from normfield.theory.predict import predict, token_grad_sq

N = 24


def _kernel(rng, shift=0.0):
    """A positive semi-definite (within, across) kernel pair of N tokens; `shift` adds a shared
    component to every pair (the companion's larger off-diagonal entries)."""
    feats = rng.normal(size=(N, 64)) / 8.0
    w = feats @ feats.T + 0.2
    c = 0.5 * (w - np.diag(np.diag(w))) + 0.05
    k = Blocks(w, c)
    same = Blocks(w + shift, c + shift)
    np.fill_diagonal(same.w, np.diag(w))
    return k, same


def _one_pair(k: Blocks, same: Blocks, block: int, p: int, q: int) -> Blocks:
    """`k` with the pair (p, q) of `block` (0 within, 1 across) set to its companion value."""
    out = Blocks.of(k.a.copy())
    out.a[block, p, q], out.a[block, q, p] = same.a[block, p, q], same.a[block, q, p]
    return out


SPECS = {"plain": attention.HeadSpec(d_head=64),
         "rope": attention.HeadSpec(d_head=64, rope=True),
         "qk_norm": attention.HeadSpec(d_head=64, qk_norm=True)}


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_attention_companion_is_the_map_with_one_pair_conditioned(kind, spec):
    # The companion keeps the pair's own entries in the sandwiches Abar K Abar^T (forward) and
    # Abar^T G Abar (values) and in the key gradient's centring (`_key_term_own_share`); it
    # drops their share of the logit moments and the output gradient's own entries in the key
    # gradient's sum over query pairs (weight 1/((p+1)(q+1)) in a sum over the later rows:
    # a few percent here, where the companion multiplies the pair's output gradient several
    # times).  Tolerance: the shift of pairs the conditioning does not touch (the sums'
    # share) plus 4/N of the pair's own change.
    rng = np.random.default_rng(5)
    kx, kx_same = _kernel(rng, shift=0.3)
    go, go_same = _kernel(rng, shift=0.2)
    mask = attention.Mask.build(kind, N)
    args = (mask, 1.0 / 256, 1.5 / 256, 1.0 / 256, 256)
    ko, st = attention.forward(kx.with_same(kx_same), *args, spec=SPECS[spec])
    grads = attention.backward(go.with_same(go_same), mask, st, SPECS[spec])
    base_ko, base_st = attention.forward(kx, *args, spec=SPECS[spec])
    base_grads = attention.backward(go, mask, base_st, SPECS[spec])
    far = (slice(None), [23, 16, 23], [16, 23, 23])  # late pairs the conditioning misses
    for block, p, q in ((0, 8, 12), (0, 10, 14), (1, 9, 13), (1, 11, 11)):
        one_ko, one_st = attention.forward(_one_pair(kx, kx_same, block, p, q), *args,
                                           spec=SPECS[spec])
        one_grads = attention.backward(_one_pair(go, go_same, block, p, q), mask, one_st,
                                       SPECS[spec])
        for new, one, base in zip((ko, *grads), (one_ko, *one_grads), (base_ko, *base_grads)):
            share = np.abs(one.a[far] - base.a[far]).max()
            moved = abs(one.a[block, p, q] - base.a[block, p, q])
            error = abs(new.a[2 + block, p, q] - one.a[block, p, q])
            assert error <= 2 * share + 4.0 / N * moved + 1e-15
        assert abs(ko.a[2 + block, p, q] - base_ko.a[block, p, q]) > 1e-4  # it does move


def test_companion_equal_to_the_kernel_gives_the_mean_collision_formula():
    # G_s = G: sum_i G(i, i) + p_c sum_{i != j} G(i, j) = sum_ij E[onehot . onehot] G(i, j)
    arch = Arch(depth=1, placement="pre", d_model=64, n_heads=1, d_ff=64, seq_len=8,
                batch_size=3, vocab_size=5)
    g, _ = _kernel(np.random.default_rng(2))
    g = Blocks.of(g.a[:, :8, :8].copy())
    pc = 1.0 / 5
    tokens = Blocks(np.full((8, 8), pc) + (1 - pc) * np.eye(8), np.full((8, 8), pc))
    want = arch.embed_scale ** 2 * 64 * pair_sum(tokens, g, 3)
    assert token_grad_sq(arch, g.with_same()) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_gradients_with_frequent_collisions_match_the_probe(placement):
    # Vocabulary 8: a pair of positions collides with probability 1/8.  The embedding: the
    # colliding pairs carry most of ||dL/dE||^2; with the companion these 192 seeds read -4.1%
    # (se 2.0%, Post-LN) and -2.6% (se 1.2%, Pre-LN), with the mean gradient kernel for the
    # colliding pairs (no companion) -14% and -12% (7 and 10 se).  The first FFN weight: the
    # covariance of its input and gradient kernels through the pair's token event (`pair_sum`)
    # takes it from -7.6% / -8.5% to -3.7% / -2.0% (se 1.9% / 1.2%); the head: -5.4 / -2.5% to
    # -4.2 / +1.2% (se 2.1 / 1.5%).  Bound: 3 standard errors plus 3% for this tiny
    # configuration's other O(1/d) terms (without the covariance Pre-LN's FFN fails it: -8.5%
    # against 6.6%).
    arch = Arch(depth=2, placement=placement, d_model=128, n_heads=2, d_ff=512, seq_len=16,
                batch_size=2, vocab_size=8)
    measured = measure_grad_norms(arch, seeds=192, chunk=96)
    theory = predict(arch)
    for name in ("embed.tok", "ffn.w1", "head.out"):
        value, se = measured.grads[name][0], measured.stderr[name][0]
        assert abs(theory.grads[name][0] / value - 1) <= 3 * se / value + 0.03, name


def test_pair_sum_adds_the_covariance_through_the_token_event():
    """With collision probability p the sum is ``sum_pairs [p K_s G_s + (1 - p) K_d G_d]`` over
    distinct positions (within and across sequences) plus the diagonal ``K G``: each kernel
    deterministic given whether the pair holds the same token."""
    rng = np.random.default_rng(3)
    p, b = 0.2, 3
    k_d, k_s = _kernel(rng, 0.0)[0], _kernel(rng, 0.4)[1]
    g_d, g_s = _kernel(rng, 0.0)[0], _kernel(rng, 0.3)[1]
    for x_d, x_s in ((k_d, k_s), (g_d, g_s)):  # the diagonal is the same whatever the event
        np.fill_diagonal(x_s.w, np.diag(x_d.w))
    k = Blocks.of(p * k_s.a + (1 - p) * k_d.a).with_same(k_s)
    g = Blocks.of(p * g_s.a + (1 - p) * g_d.a).with_same(g_s)
    mixed = p * k_s.a * g_s.a + (1 - p) * k_d.a * g_d.a
    want = b * mixed[0].sum() + b * (b - 1) * mixed[1].sum()
    assert pair_sum(k, g, b, collision=p) == pytest.approx(want, rel=1e-12)
    # without the probability (or without companions) the product of the mean kernels
    plain = b * (k.a[0] * g.a[0]).sum() + b * (b - 1) * (k.a[1] * g.a[1]).sum()
    assert pair_sum(k, g, b) == pytest.approx(plain, rel=1e-12)
    assert pair_sum(k.main, g.main, b, collision=p) == pytest.approx(plain, rel=1e-12)
    assert abs(want / plain - 1) > 0.01  # the covariance is not negligible here


def test_cross_attention_companions_do_not_mix_the_two_streams():
    # the decoder's same-token pairs condition the queries, the encoder's the keys and values:
    # the output's companion must not read the memory's, nor the value gradient's the output
    # gradient's (they concern different tokens at the same positions)
    rng = np.random.default_rng(7)
    kx, kx_same = _kernel(rng, shift=0.3)
    mem, mem_same = _kernel(rng, shift=0.4)
    go, go_same = _kernel(rng, shift=0.2)
    mask = attention.Mask.build("bidirectional", N)
    args = (mask, 1.0 / 256, 1.5 / 256, 1.0 / 256, 256)
    outs, values = [], []
    for memory in (mem.with_same(mem_same), mem.with_same()):
        ko, st = attention.forward(kx.with_same(kx_same), *args, kx_memory=memory)
        outs.append(ko.same.a)
    for out_grad in (go.with_same(go_same), go.with_same()):
        ko, st = attention.forward(kx.with_same(kx_same), *args,
                                   kx_memory=mem.with_same(mem_same))
        values.append(attention.backward(out_grad, mask, st)[2].same.a)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(values[0], values[1])
