"""Presets: `Arch` descriptions of real Transformer implementations at initialization.

Each preset is a function ``name(depth=..., d_model=..., n_heads=..., seq_len=...,
batch_size=..., vocab_size=..., **overrides) -> Arch`` whose defaults are the real model's
sizes; any other `Arch` field can be overridden by keyword (``placement="pre"``, ``init=...``,
``bias=False``...).  An override naming no `Arch` field, or giving an invalid value, raises
the `Arch`'s ``ValueError``.

The presets reproduce what the reference code does at initialization: where each norm sits,
activation, positional encoding, tied embeddings, biases and the std of every parameter group
(see each docstring for the exact values, and ``/work/shared/REFERENCES.md``).  Parts of a real
model that normfield does not model (BERT's token-type embedding and MLM transform, dropout,
...) are named in the docstrings.

``seq_len`` defaults to 128 for every preset (not the models' context lengths, 512-2048), and
``batch_size`` to 4: the real values are accepted but make probing heavy.  Weight groups not
named in a docstring follow its scheme; all LayerNorm/RMSNorm gains are 1 and their biases 0.

    >>> from normfield import presets
    >>> arch = presets.gpt2(depth=4, d_model=128, n_heads=4)
    >>> presets.get("llama", depth=2, d_model=64, n_heads=2).d_ff
    256
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Callable

from normfield.arch import Arch, Init

SEQ_LEN = 128
BATCH_SIZE = 4


def _build(defaults: dict, overrides: dict) -> Arch:
    known = {f.name for f in fields(Arch)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown Arch fields {unknown}; valid: {sorted(known)}")
    return Arch(**{**defaults, **overrides})


def llama_ffn_width(d_model: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU hidden width: ``int(2 * 4d / 3)`` rounded up to a multiple of 256
    (Meta's ``llama/model.py`` FeedForward; 11008 for d 4096)."""
    hidden = int(2 * (4 * d_model) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def vaswani2017(depth: int = 6, d_model: int = 512, n_heads: int = 8, seq_len: int = SEQ_LEN,
                batch_size: int = BATCH_SIZE, vocab_size: int = 37000, d_ff: int | None = None,
                decoder_depth: int | None = None, **overrides) -> Arch:
    """The original Transformer (Vaswani et al. 2017, arXiv 1706.03762), base model: an
    encoder-decoder with `depth` encoder and `decoder_depth` (default: `depth`) decoder layers.

    Post-LN (``LN(x + Sublayer(x))``, no final norm), d 512, 8 heads, d_ff 2048 (``4 d`` when
    d_model is changed), ReLU, sinusoidal positions, 6 + 6 layers, shared 37000-token BPE
    vocabulary, biases.  The decoder's input embedding is tied to the pre-softmax projection
    and the embeddings are multiplied by ``sqrt(d_model)``.

    The paper gives no initialization; this follows tensor2tensor / Xiong et al. 2020:

    * token embeddings ``N(0, d^-1/2)`` (times ``embed_scale = sqrt(d)``: unit variance);
    * every weight matrix Xavier-normal, ``std = sqrt(2 / (fan_in + fan_out))``
      (q, k, v, o: ``1/sqrt(d)``; w1, w2: ``sqrt(2 / (d + d_ff))``);
    * all biases 0.

    Not modelled: the paper also shares the *encoder's* embedding with the decoder's (one
    matrix for source and target); here the encoder has its own ``enc.embed.tok``.
    """
    return _build(dict(
        depth=depth, decoder_depth=depth if decoder_depth is None else decoder_depth,
        placement="post", d_model=d_model, n_heads=n_heads,
        d_ff=4 * d_model if d_ff is None else d_ff, seq_len=seq_len, batch_size=batch_size,
        vocab_size=vocab_size, activation="relu", mask="bidirectional", positions="sinusoidal",
        embed_scale=math.sqrt(d_model), tied_head=True, bias=True,
        init=Init(scheme="xavier_normal", embed_std=d_model ** -0.5)), overrides)


def fairseq_iwslt(depth: int = 6, d_model: int = 512, n_heads: int = 4, seq_len: int = SEQ_LEN,
                  batch_size: int = BATCH_SIZE, vocab_size: int = 6632, d_ff: int | None = None,
                  placement: str = "post", decoder_depth: int | None = None,
                  **overrides) -> Arch:
    """fairseq ``transformer_iwslt_de_en``: the IWSLT14 De-En model of Xiong et al. 2020
    (arXiv 2002.04745, "On Layer Normalization in the Transformer Architecture"), an
    encoder-decoder with `depth` encoder and `decoder_depth` (default: `depth`) decoder layers.

    d 512, 4 heads, d_ff 1024 (``2 d`` when d_model is changed) in both stacks, ReLU, 6 + 6
    layers, sinusoidal positions, biases, the decoder's input embedding shared with its output
    projection (``--share-decoder-input-output-embed``).  ``vocab_size`` is the English target
    dictionary of fairseq's ``prepare-iwslt14.sh`` (6632 types; the German source dictionary has
    8848, and normfield uses one vocabulary size for both: the source side's only enters through
    the token-collision probability 1/V).  ``placement="post"`` by default; ``placement="pre"``
    is ``--encoder-normalize-before --decoder-normalize-before``, which also adds each stack's
    final LayerNorm (LN eps 1e-5).

    Initialization (fairseq ``TransformerEncoder``/``TransformerDecoder``,
    ``MultiheadAttention`` and ``transformer_layer.Linear`` of the 2019-2020 releases Xiong et
    al. used):

    * token embeddings ``N(0, d^-1/2)`` times ``embed_scale = sqrt(d)`` (unit variance);
    * q, k, v of self- and encoder-decoder attention (same dimensions, ``qkv_same_dim``):
      ``xavier_uniform_(gain=1/sqrt(2))``, variance ``1/(2d)`` (std ``1/sqrt(2d)``);
    * out projections, fc1, fc2: ``xavier_uniform_``, variance ``2/(fan_in + fan_out)``
      (o: ``1/d``; fc1, fc2: ``2/(d + d_ff)``);
    * biases 0 (out projection, fc1, fc2 are zeroed by fairseq).

    Xavier-uniform and Xavier-normal have the same variance; the probe samples normals
    (scheme ``"xavier_normal"``, with gains ``1/sqrt(2)`` on q, k, v).  Not modelled: fairseq
    leaves the q/k/v biases at ``nn.Linear``'s default, uniform on ``+-1/sqrt(d)`` (here 0);
    newer fairseq (>= 0.10) builds fc1/fc2 as plain ``nn.Linear`` (PyTorch default init, see
    `torch_encoder_layer`).
    """
    qkv_gain = 2 ** -0.5
    return _build(dict(
        depth=depth, decoder_depth=depth if decoder_depth is None else decoder_depth,
        placement=placement, d_model=d_model, n_heads=n_heads,
        d_ff=2 * d_model if d_ff is None else d_ff, seq_len=seq_len, batch_size=batch_size,
        vocab_size=vocab_size, activation="relu", mask="bidirectional", positions="sinusoidal",
        embed_scale=math.sqrt(d_model), tied_head=True, bias=True,
        init=Init(scheme="xavier_normal", embed_std=d_model ** -0.5,
                  gains=(("attn.q", qkv_gain), ("attn.k", qkv_gain), ("attn.v", qkv_gain)))),
        overrides)


def gpt2(depth: int = 12, d_model: int = 768, n_heads: int = 12, seq_len: int = SEQ_LEN,
         batch_size: int = BATCH_SIZE, vocab_size: int = 50257, d_ff: int | None = None,
         **overrides) -> Arch:
    """GPT-2 small as in Hugging Face ``GPT2LMHeadModel`` (Radford et al. 2019).

    Pre-LN with a final LayerNorm (``ln_f``), eps 1e-5; learned positions; GELU in its tanh
    form (``gelu_new``); causal mask; biases; head tied to the token embedding; d 768,
    12 heads, 12 layers, d_ff 3072 (``4 d``), vocabulary 50257 (heavy to probe: pass a smaller
    ``vocab_size``).  ``n_ctx`` is 1024; ``seq_len`` defaults to 128 here.

    Initialization (``GPT2PreTrainedModel._init_weights``, ``initializer_range=0.02``):

    * every weight and both embeddings (``wte``, ``wpe``) ``N(0, 0.02)``;
    * residual projections ``attn.c_proj`` and ``mlp.c_proj`` (attn.o, ffn.w2)
      ``N(0, 0.02/sqrt(2 L))``;
    * biases 0.

    (OpenAI's TensorFlow release used ``wpe ~ N(0, 0.01)`` and no residual scaling; this
    preset follows Hugging Face.)
    """
    return _build(dict(
        depth=depth, placement="pre", d_model=d_model, n_heads=n_heads,
        d_ff=4 * d_model if d_ff is None else d_ff, seq_len=seq_len, batch_size=batch_size,
        vocab_size=vocab_size, norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
        mask="causal", positions="learned", tied_head=True, final_norm=True, bias=True,
        init=Init(scheme="normal", std=0.02, residual_scaling=True)), overrides)


def gpt1(depth: int = 12, d_model: int = 768, n_heads: int = 12, seq_len: int = SEQ_LEN,
         batch_size: int = BATCH_SIZE, vocab_size: int = 40478, d_ff: int | None = None,
         **overrides) -> Arch:
    """GPT-1 as in Hugging Face ``OpenAIGPTLMHeadModel`` (Radford et al. 2018).

    Post-LN (``n = ln_1(x + attn(x)); h = ln_2(n + mlp(n))``), no final LayerNorm, eps 1e-5;
    learned positions (``n_positions`` 512; ``seq_len`` defaults to 128 here); GELU (tanh
    form); causal mask; biases; head tied to the token embedding; d 768, 12 heads, 12 layers,
    d_ff 3072 (``4 d``), vocabulary 40478.

    Initialization (``OpenAIGPTPreTrainedModel._init_weights``, ``initializer_range=0.02``):
    every weight and both embeddings ``N(0, 0.02)`` (no residual scaling), biases 0.
    """
    return _build(dict(
        depth=depth, placement="post", d_model=d_model, n_heads=n_heads,
        d_ff=4 * d_model if d_ff is None else d_ff, seq_len=seq_len, batch_size=batch_size,
        vocab_size=vocab_size, norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
        mask="causal", positions="learned", tied_head=True, final_norm=False, bias=True,
        init=Init(scheme="normal", std=0.02)), overrides)


def bert(depth: int = 12, d_model: int = 768, n_heads: int = 12, seq_len: int = SEQ_LEN,
         batch_size: int = BATCH_SIZE, vocab_size: int = 30522, d_ff: int | None = None,
         **overrides) -> Arch:
    """BERT-base as in Hugging Face ``BertForMaskedLM`` (Devlin et al. 2019).

    Post-LN, no final LayerNorm, LayerNorm eps 1e-12 (also on the embedding LayerNorm applied
    to the sum of token and position embeddings before the first layer); learned positions
    (``max_position_embeddings`` 512; ``seq_len`` defaults to 128 here); exact (erf) GELU;
    bidirectional; biases; MLM decoder tied to the word embedding; d 768, 12 heads, 12 layers,
    d_ff 3072 (``4 d``), WordPiece vocabulary 30522.

    Initialization (``BertPreTrainedModel._init_weights``, ``initializer_range=0.02``): every
    weight and embedding ``N(0, 0.02)`` (no residual scaling), biases 0.

    Not modelled: the token-type (segment) embedding (all-zero segment ids add one row of
    ``N(0, 0.02)`` to every token), and the MLM transform head (dense + GELU + LayerNorm before
    the tied decoder, and its output bias).
    """
    return _build(dict(
        depth=depth, placement="post", d_model=d_model, n_heads=n_heads,
        d_ff=4 * d_model if d_ff is None else d_ff, seq_len=seq_len, batch_size=batch_size,
        vocab_size=vocab_size, norm="layernorm", norm_eps=1e-12, activation="gelu",
        mask="bidirectional", positions="learned", embed_norm=True, tied_head=True,
        final_norm=False, bias=True,
        init=Init(scheme="normal", std=0.02)), overrides)


def llama(depth: int = 32, d_model: int = 4096, n_heads: int = 32, seq_len: int = SEQ_LEN,
          batch_size: int = BATCH_SIZE, vocab_size: int = 32000, d_ff: int | None = None,
          **overrides) -> Arch:
    """LLaMA (Touvron et al. 2023, arXiv 2302.13971) as in Hugging Face ``LlamaForCausalLM``;
    defaults are LLaMA-7B (32 layers, d 4096, 32 heads, vocabulary 32000).

    Pre-RMSNorm with a final RMSNorm, eps 1e-6; SwiGLU FFN ``(silu(x W1) * x W3) W2`` with
    d_ff ``int(8 d / 3)`` rounded up to a multiple of 256 (11008 for d 4096; see
    `llama_ffn_width`); rotary position embeddings (RoPE) on q and k, no absolute positions;
    causal mask; no biases anywhere; untied output head (``lm_head``).  ``seq_len`` defaults to
    128 here (LLaMA: 2048).

    Initialization (``LlamaPreTrainedModel._init_weights``, ``initializer_range=0.02``): every
    weight, the token embedding and the head ``N(0, 0.02)``, no residual scaling.
    """
    return _build(dict(
        depth=depth, placement="pre", d_model=d_model, n_heads=n_heads,
        d_ff=llama_ffn_width(d_model) if d_ff is None else d_ff, seq_len=seq_len,
        batch_size=batch_size, vocab_size=vocab_size, norm="rmsnorm", norm_eps=1e-6,
        activation="swiglu", mask="causal", positions="rope", tied_head=False, final_norm=True,
        bias=False, init=Init(scheme="normal", std=0.02)), overrides)


def torch_encoder_layer(depth: int = 6, d_model: int = 512, n_heads: int = 8,
                        seq_len: int = SEQ_LEN, batch_size: int = BATCH_SIZE,
                        vocab_size: int = 1024, d_ff: int | None = None, placement: str = "post",
                        **overrides) -> Arch:
    """The stack a PyTorch user writes, with PyTorch's default initialization::

        nn.Embedding(vocab_size, d_model)                                   # N(0, 1)
        depth x nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0,
                                           activation="relu", batch_first=True,
                                           norm_first=(placement == "pre"))
        nn.LayerNorm(d_model)                                               # pre only
        nn.Linear(d_model, vocab_size, bias=False)                          # untied head

    No positional encoding, bidirectional, ReLU, LayerNorm eps 1e-5, d_ff ``4 d``.
    ``placement="post"`` (``norm_first=False``, PyTorch's default; no final norm) or ``"pre"``
    (with the final ``nn.LayerNorm``).  Initialization (``scheme="torch"``):

    * token embedding ``N(0, 1)``;
    * q, k, v: rows of one Xavier-uniform ``(3d x d)`` ``in_proj_weight``, uniform with
      variance ``2/(d + 3d) = 1/(2d)``; their biases 0;
    * out projection (``out_proj``, Kaiming-uniform with ``a = sqrt(5)``): variance
      ``1/(3d)``, bias 0;
    * ``linear1`` (ffn.w1): variance ``1/(3d)``, bias uniform on ``+-1/sqrt(d)``;
      ``linear2`` (ffn.w2): variance ``1/(3 d_ff)``, bias uniform on ``+-1/sqrt(d_ff)``;
    * head (``nn.Linear`` without bias): variance ``1/(3d)``.

    The probe has one ``bias`` flag for every linear layer; the head has no bias parameter in
    any `Arch`, so ``bias=True`` matches this stack exactly.
    """
    return _build(dict(
        depth=depth, placement=placement, d_model=d_model, n_heads=n_heads,
        d_ff=4 * d_model if d_ff is None else d_ff, seq_len=seq_len, batch_size=batch_size,
        vocab_size=vocab_size, norm="layernorm", norm_eps=1e-5, activation="relu",
        mask="bidirectional", positions="none", tied_head=False, bias=True,
        init=Init(scheme="torch")), overrides)


PRESETS: dict[str, Callable[..., Arch]] = {
    "vaswani2017": vaswani2017,
    "fairseq_iwslt": fairseq_iwslt,
    "gpt2": gpt2,
    "gpt1": gpt1,
    "bert": bert,
    "llama": llama,
    "torch_encoder_layer": torch_encoder_layer,
}


def get(name: str, **kwargs) -> Arch:
    """The `Arch` of preset `name` (keyword arguments as for the preset function)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of "
                         + ", ".join(repr(p) for p in PRESETS))
    return PRESETS[name](**kwargs)


__all__ = ["PRESETS", "get", "llama_ffn_width", *PRESETS]
