"""`Arch` validation, hashing, serialization, and initialization variances (formulas written out
here, and the probe's samples)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from normfield.arch import Arch, Init
from normfield.profile import GradProfile

SMALL = dict(d_model=16, n_heads=2, d_ff=32, seq_len=6, batch_size=2, vocab_size=11)


def arch(**kw):
    return Arch(**{"depth": 2, "placement": "pre", **SMALL, **kw})


# ---- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,words", [
    (dict(depth=0), ["depth", ">= 1"]),
    (dict(depth=-3), ["depth", ">= 1"]),
    (dict(depth=2.0), ["depth", "integer"]),
    (dict(depth=True), ["depth", "integer"]),
    (dict(d_model=-16), ["d_model", ">= 1"]),
    (dict(d_ff=-1), ["d_ff", ">= 1"]),
    (dict(n_heads=0), ["n_heads", ">= 1"]),
    (dict(seq_len=0), ["seq_len", ">= 1"]),
    (dict(batch_size=0), ["batch_size", ">= 1"]),
    (dict(vocab_size=1), ["vocab_size", ">= 2"]),
    (dict(d_model=10, n_heads=4), ["n_heads", "divisor", "d_model=10"]),
    (dict(placement="postln"), ["placement", "'postln'", "'post'", "'pre'", "'deepnorm'"]),
    (dict(activation="tanh"), ["activation", "'tanh'", "'relu'", "'swiglu'"]),
    (dict(norm="batchnorm"), ["norm", "'layernorm'", "'rmsnorm'"]),
    (dict(mask="sliding"), ["mask", "'causal'", "'bidirectional'"]),
    (dict(positions="alibi"), ["positions", "'sinusoidal'", "'learned'", "'rope'", "'none'"]),
    (dict(tokens="gauss"), ["tokens", "'uniform'", "'zipf'"]),
    (dict(norm_eps=-1e-5), ["norm_eps", ">= 0"]),
    (dict(embed_scale=0.0), ["embed_scale", "> 0"]),
    (dict(embed_scale=float("nan")), ["embed_scale", "finite"]),
    (dict(tied_head=1), ["tied_head", "True or False"]),
    (dict(final_norm="yes"), ["final_norm"]),
    (dict(init=Init(scheme="kaiming")), ["init.scheme", "'kaiming'", "'xavier_normal'", "'torch'"]),
    (dict(init=Init(std=-0.02)), ["init.std", "> 0"]),
    (dict(init=Init(gains=(("attn.x", 1.0),))), ["init.gains group", "'attn.x'", "'attn.q'"]),
    (dict(init=Init(stds=(("ffn.w1", -1.0),))), ["init.stds", "ffn.w1", ">= 0"]),
    (dict(placement_options=(("alpha", 1.0),)), ["'alpha'", "'pre'", "none"]),
    (dict(placement="deepnorm", placement_options=(("gamma", 1.0),)), ["'gamma'", "alpha", "beta"]),
    (dict(placement="deepnorm", placement_options=(("alpha", -1.0),)), ["alpha", ">= 0"]),
    (dict(placement="deepnorm", placement_options=(("beta", float("inf")),)), ["beta", "finite"]),
    (dict(d_model=3, n_heads=1), ["d_model=3", ">= 4", "layernorm"]),
    (dict(d_model=2, n_heads=1, norm="rmsnorm"), ["d_model=2", ">= 3", "rmsnorm"]),
    (dict(placement="normformer", d_ff=3), ["d_ff=3", ">= 4", "layernorm"]),
    (dict(qk_norm=True, n_heads=8), ["n_heads=8", "d_head >= 3", "d_head=2", "RMSNorm"]),
])
def test_bad_arch_raises_value_error_naming_field_and_valid_values(kw, words):
    with pytest.raises(ValueError) as info:
        arch(**kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("kw", [
    dict(placement="post", d_model=4, n_heads=1, d_ff=4),
    dict(placement="pre", d_model=3, n_heads=1, d_ff=4, norm="rmsnorm"),
    dict(placement="normformer", d_model=4, n_heads=1, d_ff=4),
    dict(placement="post", d_model=6, n_heads=2, d_ff=8, qk_norm=True),
])
def test_the_smallest_norm_widths_give_finite_positive_predictions(kw):
    """At `MIN_NORM_WIDTH` (one feature less is rejected above) every predicted norm is finite
    and positive: the norms' 1/s^2 means k/(k-2) have k = 3 there."""
    from normfield.theory.predict import predict
    grads = predict(arch(**kw)).grads
    for name, g in grads.items():
        assert np.all(np.isfinite(g)) and np.all(g > 0), (name, g)


def test_init_validates_on_its_own():
    with pytest.raises(ValueError, match="init.embed_std"):
        Init(embed_std=0.0).validate()


def test_param_init_rejects_unknown_group():
    with pytest.raises(ValueError, match="parameter group.*'attn.qq'.*'attn.q'"):
        arch().param_init("attn.qq")


@pytest.mark.parametrize("kw,words", [
    (dict(seeds=0), ["seeds", ">= 1"]),
    (dict(seeds=-2), ["seeds", ">= 1"]),
    (dict(seeds=2.5), ["seeds", "integer"]),
    (dict(precision="float16"), ["precision", "'float16'", "'float32'", "'bfloat16'", "'tf32'"]),
    (dict(key=-1), ["key", ">= 0"]),
    (dict(chunk=0), ["chunk", ">= 1"]),
])
def test_measure_rejects_bad_arguments_before_compiling(kw, words):
    from normfield.probe.measure import measure_grad_norms, measure_sweep

    for call in (lambda: measure_grad_norms(arch(), **kw), lambda: measure_sweep([arch()], **kw)):
        with pytest.raises(ValueError) as info:
            call()  # measure_sweep raises at the call, before any result is asked for
        for w in words:
            assert w in str(info.value), str(info.value)


# ---- identity and serialization ---------------------------------------------------------------
RICH = dict(placement="deepnorm", depth=3, placement_options=(("alpha", 1.5), ("beta", 0.3)),
            init=Init(scheme="normal", std=0.05, residual_scaling=True,
                      gains=(("attn.q", 2.0),), stds=(("head.out", 0.1),)),
            final_norm=None, tied_head=True, activation="swiglu", tokens="zipf",
            zipf_exponent=1.2)


def test_arch_is_hashable_and_equal_by_value():
    a, b = arch(**RICH), arch(**RICH)
    assert a == b and hash(a) == hash(b)
    assert len({a, b, arch()}) == 2
    assert {a: 1}[b] == 1
    assert a != a.replace(depth=4)
    with pytest.raises(Exception):
        a.depth = 5  # frozen


@pytest.mark.parametrize("kw", [{}, RICH, dict(final_norm=False, bias=True,
                                              init=Init(scheme="torch"))])
def test_arch_round_trips_through_dict_and_json(kw):
    a = arch(**kw)
    assert Arch.from_dict(a.to_dict()) == a
    b = Arch.from_dict(json.loads(json.dumps(a.to_dict())))
    assert b == a and hash(b) == hash(a)


def test_from_dict_rejects_unknown_field():
    d = arch().to_dict()
    d["dmodel"] = 3
    with pytest.raises(ValueError, match="dmodel"):
        Arch.from_dict(d)


def test_grad_profile_save_load_round_trip(tmp_path):
    a = arch(**RICH)
    rng = np.random.default_rng(0)
    sq = {"attn.q": rng.random((4, 3)), "embed.tok": rng.random((4, 1))}
    prof = GradProfile(arch=a, source="probe",
                       grads={k: np.sqrt(v.mean(0)) for k, v in sq.items()},
                       stderr={"attn.q": np.array([0.1, np.nan, 0.3]), "embed.tok": np.array([0.2])},
                       per_seed_sq=sq,
                       activations={"sq_norm": np.arange(4.0), "cos_within": np.full(4, 0.25),
                                    "cos_across": np.full(4, np.nan)},
                       meta={"seeds": 4, "key": 0, "device": "cpu"})
    path = tmp_path / "sub" / "profile.json"
    prof.save(str(path))
    assert json.loads(path.read_text())["arch"]["placement"] == "deepnorm"
    back = GradProfile.load(str(path))
    assert back.arch == a and back.source == "probe" and back.meta == prof.meta
    for field in ("grads", "stderr", "per_seed_sq", "activations"):
        got, want = getattr(back, field), getattr(prof, field)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])  # NaN == NaN here
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["profile.json"]  # no temp left


# ---- initialization formulas ---------------------------------------------------------------------
D, F, V, N_SEQ = 16, 48, 11, 6
SHAPES = {"embed.tok": (V, D), "embed.pos": (N_SEQ, D), "attn.q": (D, D), "attn.k": (D, D),
          "attn.v": (D, D), "attn.o": (D, D), "ffn.w1": (D, F), "ffn.w3": (D, F),
          "ffn.w2": (F, D), "head.out": (D, V)}
MATRICES = [g for g in SHAPES if not g.startswith("embed")]


def shaped(**kw):
    return Arch(**{"depth": 3, "placement": "pre", "d_model": D, "n_heads": 2, "d_ff": F,
                   "seq_len": N_SEQ, "vocab_size": V, **kw})


def test_shapes():
    a = shaped()
    for g, s in SHAPES.items():
        assert a.shape(g) == s


def test_xavier_normal_std():
    a = shaped(init=Init(embed_std=0.7))
    for g in MATRICES:
        fi, fo = SHAPES[g]
        p = a.param_init(g)
        assert p.dist == "normal"
        assert p.std == pytest.approx(math.sqrt(2.0 / (fi + fo)), rel=1e-12), g
    assert a.param_init("embed.tok").std == pytest.approx(0.7)
    assert a.param_init("embed.pos").std == pytest.approx(0.7)
    # explicit numbers for two groups: sqrt(2/32) and sqrt(2/64)
    assert a.param_init("attn.q").std == pytest.approx(0.25)
    assert a.param_init("ffn.w1").std == pytest.approx(math.sqrt(2 / 64))


@pytest.mark.parametrize("depth", [1, 3, 12])
def test_normal_with_residual_scaling(depth):
    a = shaped(depth=depth, init=Init(scheme="normal", std=0.02, residual_scaling=True))
    for g in SHAPES:
        want = 0.02 / math.sqrt(2 * depth) if g in ("attn.o", "ffn.w2") else 0.02
        assert a.param_init(g).std == pytest.approx(want, rel=1e-12), g
    plain = shaped(depth=depth, init=Init(scheme="normal", std=0.02))
    assert plain.param_init("attn.o").std == pytest.approx(0.02)


def test_torch_defaults():
    a = shaped(init=Init(scheme="torch"))
    for g in ("attn.q", "attn.k", "attn.v"):
        p = a.param_init(g)
        # rows of one Xavier-uniform (3d x d) matrix: bound sqrt(6/(4d)), variance 1/(2d)
        assert p.dist == "uniform" and p.std ** 2 == pytest.approx(1.0 / (2 * D), rel=1e-12), g
    for g in ("attn.o", "ffn.w1", "ffn.w3", "ffn.w2", "head.out"):
        p = a.param_init(g)
        # Kaiming-uniform a=sqrt(5): bound 1/sqrt(fan_in), variance 1/(3 fan_in)
        assert p.dist == "uniform" and p.std ** 2 == pytest.approx(1.0 / (3 * SHAPES[g][0])), g
    for g in ("embed.tok", "embed.pos"):
        assert a.param_init(g).std == 1.0 and a.param_init(g).dist == "normal"
    for g in ("ffn.w1", "ffn.w3", "ffn.w2"):
        b = a.bias_init(g)
        assert b.dist == "uniform" and b.std ** 2 == pytest.approx(1.0 / (3 * SHAPES[g][0]))
    for g in ("attn.q", "attn.k", "attn.v", "attn.o"):
        assert a.bias_init(g).std == 0.0
    assert shaped().bias_init("ffn.w1").std == 0.0


@pytest.mark.parametrize("depth", [2, 6])
def test_deepnorm_gains(depth):
    a = shaped(depth=depth, placement="deepnorm")
    beta = (8.0 * depth) ** -0.25
    for g in MATRICES:
        fi, fo = SHAPES[g]
        gain = beta if g in ("ffn.w1", "ffn.w2", "ffn.w3", "attn.v", "attn.o") else 1.0
        assert a.param_init(g).std == pytest.approx(gain * math.sqrt(2.0 / (fi + fo)),
                                                    rel=1e-12), g
    b = shaped(depth=depth, placement="deepnorm", placement_options=(("beta", 0.5),))
    assert b.param_init("attn.v").std == pytest.approx(0.5 * 0.25)
    assert b.param_init("attn.q").std == pytest.approx(0.25)


def test_user_gains_multiply_and_stds_replace():
    a = shaped(placement="deepnorm", depth=2,
               init=Init(gains=(("attn.o", 3.0), ("attn.q", 2.0)), stds=(("ffn.w2", 0.01),)))
    beta = 16 ** -0.25
    assert a.param_init("attn.o").std == pytest.approx(3.0 * beta * 0.25)
    assert a.param_init("attn.q").std == pytest.approx(2.0 * 0.25)
    assert a.param_init("ffn.w2").std == pytest.approx(0.01)


# ---- the probe's samples have these variances ----------------------------------------------------
def _check_samples(a, params):
    """Zero mean, the group's variance within 5 standard errors of the sample variance
    (sd of mean(w^2)/var is sqrt((kurtosis - 1)/n): kurtosis 3 normal, 9/5 uniform), the right
    distribution family, and independent layers."""
    for name, w in list(params["layers"].items()) + [(k, v) for k, v in params.items()
                                                      if k != "layers"]:
        w = np.asarray(w, np.float64)
        if name.endswith(".scale"):
            assert np.all(w == 1.0), name
            continue
        group = name[:-5] if name.endswith(".bias") else name
        init = a.bias_init(group) if name.endswith(".bias") else a.param_init(group)
        if init.std == 0.0:
            assert np.all(w == 0.0), name
            continue
        n = w.size
        kurt = 1.8 if init.dist == "uniform" else 3.0
        var = np.mean(w ** 2)
        assert abs(var / init.std ** 2 - 1) < 5 * math.sqrt((kurt - 1) / n), \
            f"{name}: sample variance {var:.4g}, expected {init.std ** 2:.4g} (n={n})"
        assert abs(w.mean()) < 5 * init.std / math.sqrt(n), name
        peak = np.max(np.abs(w)) / init.std
        if init.dist == "uniform":
            assert math.sqrt(3) * 0.97 < peak <= math.sqrt(3) * (1 + 1e-6), name
        else:
            assert peak > 2.5, name  # a normal sample of this size exceeds the uniform bound
        if name in params["layers"] and w.ndim >= 2:
            flat = w.reshape(w.shape[0], -1)
            assert abs(np.corrcoef(flat[0], flat[1])[0, 1]) < 5 / math.sqrt(flat.shape[1]), name


def test_sampled_parameters_have_the_stated_variances():
    """DeepNorm gains on the torch scheme (uniform weights and FFN biases, N(0,1) embeddings)."""
    from normfield.probe.model import init_params

    a = Arch(depth=2, placement="deepnorm", d_model=128, n_heads=2, d_ff=256, seq_len=64,
             vocab_size=512, bias=True, activation="swiglu", positions="learned",
             init=Init(scheme="torch"))
    params = jax.jit(init_params, static_argnums=0)(a, jax.random.PRNGKey(0))
    assert set(params["layers"]) >= {"attn.q", "attn.v", "ffn.w3", "ffn.w1.bias", "norm1.scale"}
    assert {"embed.tok", "embed.pos", "head.out"} <= set(params)
    _check_samples(a, params)
    q, k = np.asarray(params["layers"]["attn.q"]), np.asarray(params["layers"]["attn.k"])
    assert abs(np.corrcoef(q.ravel(), k.ravel())[0, 1]) < 0.02  # distinct keys per group


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(placement="pre", init=Init(scheme="normal", std=0.02,
                                                                 residual_scaling=True)),
                                dict(placement="post", init=Init(embed_std=0.5))])
def test_sampled_parameters_other_schemes(kw):
    from normfield.probe.model import init_params

    a = Arch(depth=4, d_model=128, n_heads=2, d_ff=256, seq_len=64, vocab_size=512, **kw)
    _check_samples(a, jax.jit(init_params, static_argnums=0)(a, jax.random.PRNGKey(1)))


# ---- encoder-decoder ---------------------------------------------------------------------------
ENC_DEC = dict(depth=2, decoder_depth=3, d_model=16, n_heads=2, d_ff=32, seq_len=4, batch_size=2,
               vocab_size=11)


@pytest.mark.parametrize("changes, words", [
    (dict(decoder_depth=-1), ["decoder_depth", "-1", "integer >= 0"]),
    (dict(placement="normformer"), ["placement", "'normformer'", "encoder-decoder", "'post'",
                                    "'pre'", "'deepnorm'"]),
    (dict(mask="causal"), ["mask", "'causal'", "'bidirectional'", "decoder"]),
    (dict(positions="rope"), ["positions", "'rope'", "cross-attention"]),
])
def test_encoder_decoder_bad_combinations_are_named(changes, words):
    with pytest.raises(ValueError) as err:
        Arch(**{**ENC_DEC, "placement": "post", **changes})
    for word in words:
        assert word in str(err.value)


def test_encoder_decoder_parameter_names_and_groups():
    from normfield.arch import group_of
    from normfield.placements import layer_params
    from normfield.probe.model import global_params

    arch = Arch(**ENC_DEC, placement="pre", tied_head=True)
    names = layer_params(arch)
    assert names[:8] == ("enc.norm1.scale", "enc.attn.q", "enc.attn.k", "enc.attn.v",
                         "enc.attn.o", "enc.norm2.scale", "enc.ffn.w1", "enc.ffn.w2")
    assert {"dec.self_attn.q", "dec.cross_attn.v", "dec.norm3.scale", "dec.ffn.w2"} <= set(names)
    assert global_params(arch) == ("enc.embed.tok", "enc.final_norm.scale", "dec.embed.tok",
                                   "dec.final_norm.scale")
    assert [group_of(n) for n in ("dec.cross_attn.k", "dec.self_attn.o", "enc.ffn.w1",
                                  "dec.embed.tok", "attn.q")] == [
        "attn.k", "attn.o", "ffn.w1", "embed.tok", "attn.q"]


def test_deepnorm_encoder_decoder_constants_follow_deepnet_table_1():
    # Wang et al. 2022 (DeepNet), Table 1, encoder-decoder with N = M = 6, computed by hand:
    # encoder alpha = 0.81 (N^4 M)^(1/16) = 0.81 * 7776^(1/16), beta = 0.87 * 7776^(-1/16);
    # decoder alpha = (3M)^(1/4) = 18^(1/4), beta = (12M)^(-1/4) = 72^(-1/4)
    from normfield.placements import deepnorm_constants, stacks

    arch = Arch(**{**ENC_DEC, "depth": 6, "decoder_depth": 6}, placement="deepnorm")
    enc, dec = stacks(arch)
    assert deepnorm_constants(arch, enc) == pytest.approx((1.41794, 0.49699), rel=1e-4)
    assert deepnorm_constants(arch, dec) == pytest.approx((2.05977, 0.34329), rel=1e-4)
    assert arch.param_init("dec.cross_attn.v", dec).std == pytest.approx(
        0.34329 * (2 / 32) ** 0.5, rel=1e-4)  # Xavier std sqrt(2/(d+d)) times beta
    assert arch.param_init("enc.attn.q", enc).std == pytest.approx((2 / 32) ** 0.5)  # no beta
    single = Arch(**{**ENC_DEC, "decoder_depth": 0, "depth": 6}, placement="deepnorm")
    assert deepnorm_constants(single, stacks(single)[0]) == pytest.approx((12 ** 0.25,
                                                                           48 ** -0.25))
