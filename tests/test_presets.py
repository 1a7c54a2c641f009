"""Presets against the values of the papers / reference implementations, written out here
(never recomputed with `Arch.param_init`'s own formulas)."""

import math

import jax
import numpy as np
import pytest

import normfield
from normfield import presets
from normfield.probe.model import init_params

SMALL = dict(depth=3, d_model=64, n_heads=4, seq_len=8, batch_size=2, vocab_size=50)
L, D, N, V = 3, 64, 8, 50


def shapes(arch):
    """Parameter shapes by profile name (stacked layer parameters under their stack prefix)."""
    params = init_params(arch, jax.random.PRNGKey(0))
    out = {}
    for key, value in params.items():
        if key.endswith("layers"):
            out.update({key[: -len("layers")] + k: tuple(v.shape) for k, v in value.items()})
        else:
            out[key] = tuple(value.shape)
    return out


def check_encoder_decoder_shapes(s, d_ff, final_norm):
    """fairseq / tensor2tensor encoder-decoder: per layer self-attention (+ encoder-decoder
    attention in the decoder) and FFN with biases, separate token embeddings, tied decoder
    output projection."""
    for prefix, attns, norms in (("enc.", ("attn",), 2), ("dec.", ("self_attn", "cross_attn"), 3)):
        for attn in attns:
            for p in "qkvo":
                assert s[f"{prefix}{attn}.{p}"] == (L, D, D)
                assert s[f"{prefix}{attn}.{p}.bias"] == (L, D)
        assert s[prefix + "ffn.w1"] == (L, D, d_ff) and s[prefix + "ffn.w2"] == (L, d_ff, D)
        for i in range(1, norms + 1):
            assert s[f"{prefix}norm{i}.scale"] == (L, D)
        assert f"{prefix}norm{norms + 1}.scale" not in s
        assert s[prefix + "embed.tok"] == (V, D)
        assert (prefix + "final_norm.scale" in s) == final_norm
    assert "head.out" not in s and "embed.tok" not in s


def std(arch, group):
    return arch.param_init(group).std


def check_common_shapes(s, d_ff, gated=False, learned=False, tied=True, bias=True):
    for g in ("attn.q", "attn.k", "attn.v", "attn.o"):
        assert s[g] == (L, D, D)
        assert (g + ".bias" in s) == bias
    assert s["ffn.w1"] == (L, D, d_ff)
    assert s["ffn.w2"] == (L, d_ff, D)
    assert ("ffn.w3" in s) == gated
    if gated:
        assert s["ffn.w3"] == (L, D, d_ff)
    if bias:
        assert s["ffn.w1.bias"] == (L, d_ff) and s["ffn.w2.bias"] == (L, D)
    assert s["embed.tok"] == (V, D)
    assert ("embed.pos" in s) == learned
    if learned:
        assert s["embed.pos"] == (N, D)
    assert ("head.out" in s) == (not tied)
    if not tied:
        assert s["head.out"] == (D, V)


def test_registry_and_unknown_name():
    assert set(presets.PRESETS) == {"vaswani2017", "fairseq_iwslt", "gpt2", "gpt1", "bert",
                                    "llama", "torch_encoder_layer"}
    assert presets.get("gpt2", **SMALL) == presets.gpt2(**SMALL)
    with pytest.raises(ValueError, match="gpt2"):
        presets.get("gpt3")
    assert normfield.presets is presets


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_bad_override_raises(name):
    with pytest.raises(ValueError, match="n_heads"):
        presets.get(name, d_model=512, n_heads=7)
    with pytest.raises(ValueError, match="unknown Arch fields"):
        presets.get(name, **SMALL, not_a_field=1)
    with pytest.raises(ValueError, match="activation"):
        presets.get(name, **SMALL, activation="tanh")
    assert presets.get(name, **SMALL, bias=False).bias is False


def test_real_sizes():
    a = presets.vaswani2017(depth=1)
    assert (a.d_model, a.n_heads, a.d_ff, a.vocab_size) == (512, 8, 2048, 37000)
    a = presets.fairseq_iwslt(depth=1)
    assert (a.d_model, a.n_heads, a.d_ff) == (512, 4, 1024)
    for fn, vocab in ((presets.gpt2, 50257), (presets.gpt1, 40478), (presets.bert, 30522)):
        a = fn(depth=1)
        assert (a.d_model, a.n_heads, a.d_ff, a.vocab_size) == (768, 12, 3072, vocab)
    a = presets.llama(depth=1)
    assert (a.d_model, a.n_heads, a.d_ff, a.vocab_size) == (4096, 32, 11008, 32000)
    assert presets.llama(depth=1, d_model=5120, n_heads=40).d_ff == 13824  # LLaMA-13B
    assert presets.llama(depth=1, d_model=8192, n_heads=64).d_ff == 22016  # LLaMA-65B
    assert presets.torch_encoder_layer(depth=1).d_ff == 2048


def test_vaswani2017():
    a = presets.vaswani2017(**SMALL)
    assert (a.placement, a.has_final_norm, a.activation, a.positions, a.mask) == (
        "post", False, "relu", "sinusoidal", "bidirectional")
    assert (a.depth, a.decoder_depth) == (L, L)
    assert a.tied_head and a.bias and a.d_ff == 4 * D
    assert a.embed_scale == pytest.approx(8.0)  # sqrt(64)
    assert std(a, "embed.tok") == pytest.approx(1 / 8)  # d^-1/2
    for g in ("attn.q", "attn.k", "attn.v", "attn.o", "cross_attn.k", "self_attn.o"):
        assert std(a, g) == pytest.approx(math.sqrt(2 / 128))
    for g in ("ffn.w1", "ffn.w2"):
        assert std(a, g) == pytest.approx(math.sqrt(2 / (64 + 256)))
        assert a.bias_init(g).std == 0.0
    check_encoder_decoder_shapes(shapes(a), 4 * D, final_norm=False)
    assert presets.vaswani2017(**SMALL, decoder_depth=2).decoder_depth == 2


def test_fairseq_iwslt():
    a = presets.fairseq_iwslt(**SMALL)
    assert (a.placement, a.has_final_norm, a.activation, a.positions, a.mask) == (
        "post", False, "relu", "sinusoidal", "bidirectional")
    assert (a.depth, a.decoder_depth) == (L, L)
    assert a.d_ff == 2 * D and a.bias and a.tied_head
    assert presets.fairseq_iwslt(depth=6).vocab_size == 6632  # prepare-iwslt14.sh, English
    assert a.embed_scale == pytest.approx(8.0)
    assert std(a, "embed.tok") == pytest.approx(1 / 8)
    for g in ("attn.q", "attn.k", "attn.v", "self_attn.q", "cross_attn.k", "cross_attn.v"):
        assert std(a, g) ** 2 == pytest.approx(1 / 128)  # xavier_uniform_(gain=1/sqrt(2))
    for g in ("attn.o", "self_attn.o", "cross_attn.o"):
        assert std(a, g) ** 2 == pytest.approx(1 / 64)
    for g in ("ffn.w1", "ffn.w2"):
        assert std(a, g) ** 2 == pytest.approx(2 / (64 + 128))
        assert a.bias_init(g).std == 0.0
    check_encoder_decoder_shapes(shapes(a), 2 * D, final_norm=False)
    pre = presets.fairseq_iwslt(**SMALL, placement="pre")
    assert pre.placement == "pre" and pre.has_final_norm
    check_encoder_decoder_shapes(shapes(pre), 2 * D, final_norm=True)
    assert shapes(pre)["enc.final_norm.scale"] == shapes(pre)["dec.final_norm.scale"] == (D,)


def test_encoder_decoder_preset_rejects_a_placement_without_decoder_blocks():
    with pytest.raises(ValueError, match="'normformer'.*encoder-decoder.*'post'"):
        presets.fairseq_iwslt(**SMALL, placement="normformer")


def test_gpt2():
    a = presets.gpt2(**SMALL)
    assert (a.placement, a.has_final_norm, a.activation, a.positions, a.mask, a.norm) == (
        "pre", True, "gelu_tanh", "learned", "causal", "layernorm")
    assert a.tied_head and a.bias and a.d_ff == 4 * D and a.embed_scale == 1.0
    for g in ("embed.tok", "embed.pos", "attn.q", "attn.k", "attn.v", "ffn.w1"):
        assert std(a, g) == pytest.approx(0.02)
    for g in ("attn.o", "ffn.w2"):
        assert std(a, g) == pytest.approx(0.02 / math.sqrt(6))  # 0.02/sqrt(2L), L = 3
        assert a.bias_init(g).std == 0.0
    assert std(presets.gpt2(**{**SMALL, "depth": 12}), "attn.o") == pytest.approx(
        0.02 / math.sqrt(24))
    s = shapes(a)
    check_common_shapes(s, 4 * D, learned=True)
    assert s["final_norm.scale"] == (D,)


def test_gpt1():
    a = presets.gpt1(**SMALL)
    assert (a.placement, a.has_final_norm, a.activation, a.positions, a.mask) == (
        "post", False, "gelu_tanh", "learned", "causal")
    assert a.tied_head and a.bias
    for g in ("embed.tok", "embed.pos", "attn.q", "attn.o", "ffn.w1", "ffn.w2"):
        assert std(a, g) == pytest.approx(0.02)
    s = shapes(a)
    check_common_shapes(s, 4 * D, learned=True)
    assert "final_norm.scale" not in s


def test_bert():
    a = presets.bert(**SMALL)
    assert (a.placement, a.has_final_norm, a.activation, a.positions, a.mask) == (
        "post", False, "gelu", "learned", "bidirectional")
    assert a.tied_head and a.bias and a.norm_eps == 1e-12 and a.embed_norm
    assert shapes(a)["embed_norm.scale"] == (D,)  # BertEmbeddings.LayerNorm
    for g in ("embed.tok", "embed.pos", "attn.v", "attn.o", "ffn.w1", "ffn.w2"):
        assert std(a, g) == pytest.approx(0.02)
        assert a.bias_init(g).std == 0.0
    check_common_shapes(shapes(a), 4 * D, learned=True)


def test_llama():
    a = presets.llama(**SMALL)
    assert (a.placement, a.has_final_norm, a.activation, a.positions, a.mask, a.norm) == (
        "pre", True, "swiglu", "rope", "causal", "rmsnorm")
    assert not a.bias and not a.tied_head and not a.qk_norm and a.norm_eps == 1e-6
    assert a.d_ff == 256  # int(8*64/3) = 170 -> next multiple of 256
    for g in ("embed.tok", "attn.q", "attn.o", "ffn.w1", "ffn.w2", "ffn.w3", "head.out"):
        assert std(a, g) == pytest.approx(0.02)
    s = shapes(a)
    check_common_shapes(s, 256, gated=True, tied=False, bias=False)
    assert s["final_norm.scale"] == (D,)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_torch_encoder_layer(placement):
    a = presets.torch_encoder_layer(**SMALL, placement=placement)
    assert (a.placement, a.activation, a.positions, a.mask, a.norm) == (
        placement, "relu", "none", "bidirectional", "layernorm")
    assert a.has_final_norm == (placement == "pre")
    assert a.bias and not a.tied_head and a.d_ff == 4 * D and a.embed_scale == 1.0
    assert std(a, "embed.tok") == 1.0
    for g in ("attn.q", "attn.k", "attn.v"):  # rows of a Xavier-uniform (3d x d) matrix
        assert std(a, g) ** 2 == pytest.approx(1 / 128)
        assert a.param_init(g).dist == "uniform"
        assert a.bias_init(g).std == 0.0
    assert std(a, "attn.o") ** 2 == pytest.approx(1 / 192)  # Kaiming-uniform a=sqrt(5)
    assert a.bias_init("attn.o").std == 0.0
    assert std(a, "ffn.w1") ** 2 == pytest.approx(1 / 192)
    assert std(a, "ffn.w2") ** 2 == pytest.approx(1 / 768)
    assert std(a, "head.out") ** 2 == pytest.approx(1 / 192)
    # linear1 / linear2 biases uniform on +-1/sqrt(fan_in)
    for g, fan_in in (("ffn.w1", 64), ("ffn.w2", 256)):
        b = a.bias_init(g)
        assert b.dist == "uniform"
        assert math.sqrt(3) * b.std == pytest.approx(1 / math.sqrt(fan_in))
    s = shapes(a)
    check_common_shapes(s, 4 * D, tied=False)
    assert ("final_norm.scale" in s) == (placement == "pre")
    assert "head.out.bias" not in s
    # sampled biases respect the half-width
    params = init_params(a, jax.random.PRNGKey(1))
    w1b = np.asarray(params["layers"]["ffn.w1.bias"])
    assert np.abs(w1b).max() <= 1 / 8 + 1e-6 and np.abs(w1b).max() > 0.1


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_predict_smoke(name):
    arch = presets.get(name, depth=2, d_model=64, n_heads=2, seq_len=8, batch_size=2,
                       vocab_size=64)
    try:
        profile = normfield.predict(arch)
    except NotImplementedError as exc:  # RoPE / qk_norm theory still being added
        pytest.skip(f"predict does not support {name} yet: {exc}")
    assert profile.grads
    for key, value in profile.grads.items():
        assert np.all(np.isfinite(value)), key
