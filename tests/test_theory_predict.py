"""Properties of the mean-field interpreter `normfield.predict` / `predict_grad_norms`."""

from __future__ import annotations

import numpy as np
import pytest

from normfield import Arch, Init, predict, predict_grad_norms
from normfield.placements import layer_params
from normfield.probe.model import global_params

SMALL = dict(seq_len=4, d_model=64, n_heads=4, d_ff=128, batch_size=2, vocab_size=64)


@pytest.mark.parametrize("placement", ["pre", "post", "peri", "deepnorm", "b2t"])
def test_all_probe_parameters_present(placement):
    arch = Arch(depth=2, placement=placement, **SMALL)
    prof = predict(arch)
    assert set(prof.names) == set(layer_params(arch)) | set(global_params(arch))
    for name in layer_params(arch):
        assert prof[name].shape == (2,) and np.all(np.isfinite(prof[name]))


def test_bad_method_raises():
    with pytest.raises(ValueError, match="method"):
        predict(Arch(depth=1, placement="pre", **SMALL), method="exact")


def test_post_ln_token_collapse():
    cos = predict_grad_norms(12, "post", **SMALL).activations["cos_within"]
    assert np.all(np.diff(cos[1:]) > 0) and cos[-1] > 0.95


@pytest.mark.slow
def test_pre_ln_last_ffn_w2_scales_as_inverse_sqrt_depth():
    vals = [predict_grad_norms(L, "pre", **SMALL)["ffn.w2"][-1] * np.sqrt(L) for L in (50, 100, 200)]
    assert max(vals) / min(vals) < 1.04, vals


def test_analytic_softmax_moments_agree_with_monte_carlo_reference():
    """The whole prediction with closed-form softmax moments against the fixed-sample
    Monte-Carlo reference mode.  The softmax fluctuations move these gradients by 2-8%
    (against uniform attention); 4096 MC samples pin them to ~2% of themselves, so the two
    modes must agree to well within 1% (observed: 0.08%)."""
    arch = Arch(depth=2, placement="pre", d_model=64, n_heads=2, d_ff=128, seq_len=6,
                batch_size=2, vocab_size=32, mask="causal")
    closed, mc = predict(arch), predict(arch, method="mc")
    for name in closed.grads:
        np.testing.assert_allclose(closed.grads[name], mc.grads[name], rtol=1e-2, atol=1e-12,
                                   err_msg=name)


def test_qk_temperature_scales_the_logits_of_normalized_queries():
    """Henry et al.'s logits g cos(q, k) equal the usual q^.k^/sqrt(d_head) of RMS-normalized
    queries when g = sqrt(d_head); any other g changes the query/key gradients."""
    kw = dict(depth=2, placement="pre", d_model=64, n_heads=2, d_ff=128, seq_len=6,
              batch_size=2, vocab_size=32, qk_norm=True)
    plain = predict(Arch(**kw))
    same = predict(Arch(qk_temperature=32 ** 0.5, **kw))
    hot = predict(Arch(qk_temperature=20.0, **kw))
    for name in plain.grads:
        np.testing.assert_allclose(same.grads[name], plain.grads[name], rtol=1e-9, atol=1e-15)
    assert np.all(hot["attn.q"] > 1.2 * plain["attn.q"])
    with pytest.raises(ValueError, match="qk_temperature"):
        Arch(**{**kw, "qk_norm": False}, qk_temperature=3.0)


@pytest.mark.parametrize("placement", ["pre", "post", "b2t"])
def test_encoder_decoder_parameters_present(placement):
    # a tied head with Vaswani et al.'s embedding scale (logit variance 1; unit-variance
    # embeddings would put it at ~d_model, beyond the analytic softmax moments' range)
    arch = Arch(depth=2, decoder_depth=3, placement=placement, tied_head=True,
                embed_scale=8.0, init=Init(embed_std=1 / 8), **SMALL)
    prof = predict(arch)
    assert set(prof.names) == set(layer_params(arch)) | set(global_params(arch))
    for name in layer_params(arch):
        assert prof[name].shape == ((2,) if name.startswith("enc.") else (3,))
        assert np.all(np.isfinite(prof[name])) and np.all(prof[name] > 0)
    assert prof.activations["enc.sq_norm"].shape == (3,)
    assert prof.activations["dec.cos_within"].shape == (4,)


def test_encoder_gradient_flows_only_through_cross_attention_keys_and_values():
    # with W_k = W_v = 0 (every attention) the decoder's cross-attention output does not depend
    # on the encoder output, so no gradient reaches the encoder; the decoder still gets one
    from normfield.arch import Init

    arch = Arch(depth=2, decoder_depth=2, placement="pre", **SMALL,
                init=Init(stds=(("attn.k", 0.0), ("attn.v", 0.0))))
    prof = predict(arch)
    for name in ("enc.ffn.w2", "enc.attn.o", "enc.embed.tok"):
        assert np.all(prof[name] == 0.0), name
    assert np.all(prof["dec.ffn.w2"] > 0)
    full = predict(arch.replace(init=Init()))
    assert np.all(full["enc.ffn.w2"] > 0)


def test_embedding_norm_makes_the_network_invariant_to_the_embedding_scale():
    # LN(c x) = LN(x) for eps = 0, so with only token embeddings (no positions) every gradient
    # but the token embedding's is independent of c, and dL/dE = c J_LN(cx)^T g = J_LN(x)^T g
    # is too: the theory's norm maps must reproduce this exactly
    base = Arch(depth=2, placement="post", embed_norm=True, positions="none", norm_eps=0.0,
                **SMALL)
    one, three = predict(base), predict(base.replace(embed_scale=3.0))
    assert one.activations["sq_norm"][0] == pytest.approx(1.0, rel=1e-9)  # LayerNorm output
    assert one["embed_norm.scale"].shape == (1,) and one["embed_norm.scale"][0] > 0
    for name in one.names:
        np.testing.assert_allclose(three[name], one[name], rtol=1e-9, err_msg=name)
    # without it c matters (at c = 2: the first attention's logit variance grows as c^4, and
    # at c = 3 it would pass the analytic softmax moments' range)
    plain = predict(base.replace(embed_norm=False, embed_scale=2.0))
    assert abs(plain["embed.tok"][0] / three["embed.tok"][0] - 1) > 0.1


def test_deep_causal_post_ln_stays_finite():
    # collapsed tokens: the key/value spreads are ~1e-16 and must not turn into negative logit
    # variances (this raised "invalid v1=nan" before they were clamped at 0)
    prof = predict_grad_norms(200, "post", seq_len=16, mask="causal")
    assert all(np.all(np.isfinite(v)) for v in prof.grads.values())


def test_one_token_sequences_predict_finite_norms_and_no_query_key_gradient():
    """seq_len 1: every query sees its own key only, so the softmax is constant (attn.q and
    attn.k get exactly no gradient), a causal mask is the bidirectional one, and the
    embedding has no token spread whose fluctuation could be matched (c = 0, not 0 / 0)."""
    kw = dict(seq_len=1, d_model=64, n_heads=2, d_ff=128, batch_size=4, vocab_size=64)
    for placement in ("post", "pre"):
        bi = predict_grad_norms(2, placement, **kw)
        causal = predict_grad_norms(2, placement, mask="causal", **kw)
        for name, value in bi.grads.items():
            assert np.all(np.isfinite(value)), name
            np.testing.assert_array_equal(causal.grads[name], value)
        assert np.all(bi.grads["attn.q"] == 0) and np.all(bi.grads["attn.k"] == 0)
        assert np.all(bi.grads["attn.v"] > 0)


def test_a_diverging_prediction_raises_naming_the_block_or_the_parameter(monkeypatch):
    """A non-finite kernel or gradient norm is an error that says where, never a NaN returned
    (injected here: the theory's own maps stay finite on valid configurations)."""
    import normfield.theory.predict as theory

    kw = dict(d_model=32, n_heads=2, d_ff=64, seq_len=4, batch_size=2, vocab_size=16)
    forward, calls = theory.attention.forward, []

    def second_block_overflows(*args, **kwargs):
        ko, state = forward(*args, **kwargs)
        calls.append(1)
        return (ko * np.inf if len(calls) == 2 else ko), state

    monkeypatch.setattr(theory.attention, "forward", second_block_overflows)
    with pytest.raises(FloatingPointError, match="output of block 1 is not finite"):
        predict_grad_norms(3, "pre", **kw)
    monkeypatch.setattr(theory.attention, "forward", forward)
    monkeypatch.setattr(theory, "token_grad_sq", lambda arch, g: np.nan)
    with pytest.raises(FloatingPointError, match="'embed.tok' \\(layer 0\\) is nan"):
        predict_grad_norms(3, "pre", **kw)


def test_logit_variances_beyond_the_analytic_range_raise_naming_where():
    """A head tied to unit-variance embeddings has logit variance ~d_model, and Post-LN's
    first attention sees the raw embedding (variance embed_scale^2): past softmax.V_MAX the
    analytic moments would be wrong (and their grid would take GiB), so predict names the
    place; the Monte-Carlo moments take any variance."""
    kw = dict(d_model=64, n_heads=2, d_ff=128, seq_len=8, batch_size=2, vocab_size=32)
    with pytest.raises(ValueError, match=r"^the output head: invalid v=\d+.*V_MAX"):
        predict_grad_norms(1, "pre", tied_head=True, **kw)
    with pytest.raises(ValueError, match=r"^block 0: invalid v=.*method='mc'"):
        predict_grad_norms(1, "post", embed_scale=4.0, **kw)
    mc = predict_grad_norms(1, "pre", tied_head=True, method="mc", **kw)
    assert all(np.all(np.isfinite(v)) and np.all(v > 0) for v in mc.grads.values())
