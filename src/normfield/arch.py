"""The one architecture description that both interpreters (theory and probe) read.

`Arch` is a frozen, hashable dataclass.  Every field but `depth` and `placement` has a default:
a paper-sized encoder (d_model 512, 8 heads, d_ff 2048) with Xavier-normal weights as in
Xiong et al. 2020 (arXiv 2002.04745), unit-variance token embeddings (fairseq's
``N(0, d^-1/2)`` embeddings times ``sqrt(d)``; PyTorch's ``nn.Embedding``), sinusoidal positions,
ReLU, no biases, iid uniform tokens and targets, and mean cross-entropy over all
``batch_size * seq_len`` positions.

Initialization is resolved per parameter *group* (never by matching arbitrary names):

============  =============================================  ==========================
group         parameters                                     shape (fan_in, fan_out)
============  =============================================  ==========================
embed.tok     token embedding                                (vocab, d)
embed.pos     learned position embedding                     (seq_len, d)
attn.q/k/v/o  attention projections                          (d, d)
ffn.w1, w3    first FFN layer (w3: gated FFN's linear path)  (d, d_ff)
ffn.w2        second FFN layer                               (d_ff, d)
head.out      untied output head                             (d, vocab)
============  =============================================  ==========================
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
MASKS = ("bidirectional", "causal")
POSITIONS = ("sinusoidal", "learned", "rope", "none")
TOKEN_DISTRIBUTIONS = ("uniform", "zipf")
INIT_SCHEMES = ("xavier_normal", "normal", "torch")
WEIGHT_GROUPS = ("embed.tok", "embed.pos", "attn.q", "attn.k", "attn.v", "attn.o",
                 "ffn.w1", "ffn.w2", "ffn.w3", "head.out")
RESIDUAL_GROUPS = ("attn.o", "ffn.w2")
ATTENTION_KINDS = ("self_attn.", "cross_attn.")


STACK_PREFIXES = ("enc.", "dec.")
# The fewest features a norm may act on.  The theory's norm maps (`theory.maps.norm_backward`)
# take the mean of 1/s^2 for a token's mean square s^2, a chi-square with k degrees of freedom
# (k = width - 1 after LayerNorm's centring, k >= width for RMSNorm): k/(k - 2) in units of its
# mean, finite only for k > 2.
MIN_NORM_WIDTH = {"layernorm": 4, "rmsnorm": 3}


def group_of(name: str) -> str:
    """The init group of a weight name: stack prefixes (``enc.``, ``dec.``) dropped, and an
    encoder-decoder's ``self_attn.*`` and ``cross_attn.*`` projections in the ``attn.*``
    groups."""
    for prefix in STACK_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    for kind in ATTENTION_KINDS:
        if name.startswith(kind):
            return "attn." + name[len(kind):]
    return name


def _fail(field_name: str, value: Any, valid: str) -> None:
    raise ValueError(f"invalid {field_name}={value!r}: expected {valid}")


def check_int(field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field_name, value, f"an integer >= {minimum}")


def check_choice(field_name: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(field_name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_positive(field_name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        _fail(field_name, value, "a finite number " + (">= 0" if allow_zero else "> 0"))


@dataclass(frozen=True)
class ParamInit:
    """Distribution of one parameter group: zero-mean with standard deviation `std`."""

    std: float
    dist: str = "normal"  # "normal" or "uniform" (uniform on +-sqrt(3)*std)


@dataclass(frozen=True)
class Init:
    """Initialization per parameter group.

    scheme:
      * ``"xavier_normal"`` (default; Xiong et al. 2020, Glorot & Bengio 2010):
        ``std = gain * sqrt(2 / (fan_in + fan_out))`` for every weight matrix; token embeddings
        ``N(0, embed_std)`` (1 by default), learned positions ``N(0, embed_std)``.
      * ``"normal"``: ``N(0, std)`` for every weight and embedding (GPT-2, BERT: 0.02); with
        ``residual_scaling`` the residual projections (attn.o, ffn.w2) get ``std/sqrt(2*depth)``
        (GPT-2, Radford et al. 2019).
      * ``"torch"``: PyTorch's defaults for ``nn.TransformerEncoderLayer``: q, k, v are the rows
        of one Xavier-uniform (3d x d) in-projection (variance 1/(2d) each); every other
        ``nn.Linear`` Kaiming-uniform with a = sqrt(5) (variance 1/(3 fan_in)) and uniform
        biases on +-1/sqrt(fan_in) (attention biases zero); ``nn.Embedding`` N(0, 1).
    gains: ``(group, gain)`` pairs multiplying the scheme's std (DeepNet's beta).
    stds: ``(group, std)`` pairs replacing the scheme's std outright.
    """

    scheme: str = "xavier_normal"
    std: float = 0.02
    embed_std: float = 1.0
    residual_scaling: bool = False
    gains: tuple[tuple[str, float], ...] = ()
    stds: tuple[tuple[str, float], ...] = ()

    def validate(self) -> None:
        check_choice("init.scheme", self.scheme, INIT_SCHEMES)
        check_positive("init.std", self.std)
        check_positive("init.embed_std", self.embed_std)
        for kind, pairs in (("gains", self.gains), ("stds", self.stds)):
            for group, value in pairs:
                check_choice(f"init.{kind} group", group, WEIGHT_GROUPS)
                check_positive(f"init.{kind}[{group!r}]", value, allow_zero=True)


@dataclass(frozen=True)
class Arch:
    """A Transformer stack at initialization, and the data it is probed with.

    Only `depth` and `placement` are required.  `final_norm=None` takes the placement's own
    default (a final norm for pre-norm-style placements, none for Post-LN).

    ``decoder_depth > 0`` makes an encoder-decoder model (Vaswani et al. 2017): `depth` encoder
    blocks (self-attention with `mask`, which must be bidirectional) over the source tokens,
    then `decoder_depth` decoder blocks (causal self-attention, cross-attention to the encoder
    output, FFN) over the target-side input tokens, the loss on the decoder's outputs.  Source,
    decoder-input and target tokens are iid draws of `seq_len` tokens each; the two stacks
    have their own token (and learned position) embeddings, the head is tied to the decoder's
    with ``tied_head`` (fairseq's ``--share-decoder-input-output-embed``), and each stack ends
    with its own final norm when the placement has one.
    """

    depth: int
    placement: str
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    seq_len: int = 64
    batch_size: int = 4
    vocab_size: int = 1024
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "relu"
    mask: str = "bidirectional"
    positions: str = "sinusoidal"
    embed_scale: float = 1.0
    embed_norm: bool = False
    tied_head: bool = False
    final_norm: bool | None = None
    bias: bool = False
    qk_norm: bool = False
    qk_temperature: float | None = None
    tokens: str = "uniform"
    zipf_exponent: float = 1.0
    init: Init = field(default_factory=Init)
    placement_options: tuple[tuple[str, float], ...] = ()
    decoder_depth: int = 0

    def __post_init__(self) -> None:
        from normfield.placements import check_placement

        check_int("depth", self.depth, 1)
        check_placement(self.placement, self.placement_options)
        for name in ("d_model", "n_heads", "d_ff", "seq_len", "batch_size"):
            check_int(name, getattr(self, name), 1)
        check_int("vocab_size", self.vocab_size, 2)
        if self.d_model % self.n_heads:
            _fail("n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        check_choice("norm", self.norm, NORMS)
        check_positive("norm_eps", self.norm_eps, allow_zero=True)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("mask", self.mask, MASKS)
        check_choice("positions", self.positions, POSITIONS)
        check_positive("embed_scale", self.embed_scale)
        check_choice("tokens", self.tokens, TOKEN_DISTRIBUTIONS)
        check_positive("zipf_exponent", self.zipf_exponent, allow_zero=True)
        if self.positions == "rope" and self.d_head % 2:
            _fail("n_heads", self.n_heads, f"a divisor of d_model={self.d_model} giving an even "
                  f"head dimension (RoPE rotates pairs; d_head={self.d_head})")
        if self.qk_temperature is not None:
            check_positive("qk_temperature", self.qk_temperature)
            if not self.qk_norm:
                _fail("qk_temperature", self.qk_temperature,
                      "None unless qk_norm=True (the temperature multiplies the query-key cosine)")
        for flag in ("tied_head", "bias", "qk_norm", "embed_norm"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "True or False")
        if self.final_norm not in (None, True, False):
            _fail("final_norm", self.final_norm, "None, True or False")
        check_int("decoder_depth", self.decoder_depth, 0)
        if self.decoder_depth:
            self._check_encoder_decoder()
        if not isinstance(self.init, Init):
            _fail("init", self.init, "a normfield.Init")
        self.init.validate()
        self._check_norm_widths()

    def _check_encoder_decoder(self) -> None:
        from normfield.placements import PLACEMENTS

        valid = [n for n, spec in PLACEMENTS.items() if spec.encoder_decoder]
        if self.placement not in valid:
            _fail("placement", self.placement, "a placement that defines encoder-decoder blocks "
                  f"when decoder_depth={self.decoder_depth}: one of "
                  + ", ".join(repr(v) for v in valid))
        if self.mask != "bidirectional":
            _fail("mask", self.mask, "'bidirectional' for an encoder-decoder (decoder_depth="
                  f"{self.decoder_depth}): it is the encoder's mask; the decoder's "
                  "self-attention is always causal")
        if self.positions == "rope":
            _fail("positions", self.positions, "'sinusoidal', 'learned' or 'none' for an "
                  "encoder-decoder (RoPE is not defined for cross-attention)")

    def _check_norm_widths(self) -> None:
        """Every norm acts on at least `MIN_NORM_WIDTH` features: the model width (the blocks',
        embedding and final norms), the FFN width (NormFormer's FFN norm) and, with QK-Norm
        (an RMSNorm), the head width."""
        from normfield.placements import Norm, block, stacks

        normed = {"d_model"} if self.embed_norm or self.has_final_norm else set()
        for stack in stacks(self):
            # blocks differ by layer only in where their norms sit (Mix-LN: Post-LN blocks
            # first, Pre-LN blocks after), so the first and last blocks hold every norm width
            for layer in {0, stack.depth - 1}:
                normed |= {"d_ff" if step.width == "ff" else "d_model"
                           for step in block(self, layer, stack) if isinstance(step, Norm)}
        minimum = MIN_NORM_WIDTH[self.norm]
        for name in sorted(normed):
            if getattr(self, name) < minimum:
                _fail(name, getattr(self, name), f"an integer >= {minimum} (the theory's "
                      f"{self.norm} maps need at least {minimum} features; "
                      "normfield.arch.MIN_NORM_WIDTH)")
        minimum = MIN_NORM_WIDTH["rmsnorm"]
        if self.qk_norm and self.d_head < minimum:
            _fail("n_heads", self.n_heads, f"a divisor of d_model={self.d_model} giving "
                  f"d_head >= {minimum} (QK-Norm is an RMSNorm over d_head={self.d_head} "
                  f"features; the theory's rmsnorm maps need at least {minimum}; "
                  "normfield.arch.MIN_NORM_WIDTH)")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def has_final_norm(self) -> bool:
        from normfield.placements import placement_spec

        if self.final_norm is None:
            return placement_spec(self.placement).final_norm
        return self.final_norm

    def width(self, key: str) -> int:
        """Width of a named activation space: ``"d"`` (model) or ``"ff"`` (FFN hidden)."""
        return {"d": self.d_model, "ff": self.d_ff}[key]

    def shape(self, name: str) -> tuple[int, int]:
        """(fan_in, fan_out) of a weight (group or name, see `group_of`), in the orientation
        ``y = x @ W``."""
        group = group_of(name)
        d, f, v = self.d_model, self.d_ff, self.vocab_size
        return {"embed.tok": (v, d), "embed.pos": (self.seq_len, d), "attn.q": (d, d),
                "attn.k": (d, d), "attn.v": (d, d), "attn.o": (d, d), "ffn.w1": (d, f),
                "ffn.w3": (d, f), "ffn.w2": (f, d), "head.out": (d, v)}[group]

    def param_init(self, name: str, stack=None) -> ParamInit:
        """The zero-mean distribution of a weight (group or name, see `group_of`) in `stack`
        (a `placements.Stack`; default the first), see `Init`.  The stack's depth enters GPT-2's
        residual scaling and the placement's init rule (DeepNet's beta)."""
        from normfield.placements import placement_spec, stacks

        group = group_of(name)
        check_choice("parameter group", group, WEIGHT_GROUPS)
        stack = stack or stacks(self)[0]
        ini = self.init
        fan_in, fan_out = self.shape(group)
        embedding = group in ("embed.tok", "embed.pos")
        dist = "normal"
        if ini.scheme == "xavier_normal":
            std = ini.embed_std if embedding else math.sqrt(2.0 / (fan_in + fan_out))
        elif ini.scheme == "normal":
            std = ini.std
            if ini.residual_scaling and group in RESIDUAL_GROUPS:
                std /= math.sqrt(2.0 * stack.depth)
        else:  # torch defaults
            if embedding:
                std = 1.0
            elif group in ("attn.q", "attn.k", "attn.v"):
                std, dist = math.sqrt(2.0 / (self.d_model + 3 * self.d_model)), "uniform"
            else:
                std, dist = math.sqrt(1.0 / (3.0 * fan_in)), "uniform"
        rule = placement_spec(self.placement).init_gains
        std *= (rule(self, stack) if rule else {}).get(group, 1.0)
        std *= dict(ini.gains).get(group, 1.0)
        std = dict(ini.stds).get(group, std)
        return ParamInit(std=float(std), dist=dist)

    def bias_init(self, name: str) -> ParamInit:
        """Bias of a linear weight (group or name): zero except for the torch scheme's FFN
        biases (uniform on +-1/sqrt(fan_in), i.e. std 1/sqrt(3 fan_in))."""
        group = group_of(name)
        if self.init.scheme == "torch" and group in ("ffn.w1", "ffn.w2", "ffn.w3"):
            return ParamInit(std=math.sqrt(1.0 / (3.0 * self.shape(group)[0])), dist="uniform")
        return ParamInit(std=0.0)

    def option(self, name: str, default: float) -> float:
        return dict(self.placement_options).get(name, default)

    # ---- (de)serialization ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Arch":
        data = dict(data)
        ini = dict(data.pop("init", {}))
        for key in ("gains", "stds"):
            ini[key] = tuple(tuple(p) for p in ini.get(key, ()))
        data["placement_options"] = tuple(tuple(p) for p in data.get("placement_options", ()))
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Arch fields {sorted(unknown)}; valid: {sorted(known)}")
        return cls(init=Init(**ini), **data)

    def replace(self, **changes) -> "Arch":
        return replace(self, **changes)
