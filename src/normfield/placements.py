"""Normalization placements as block recipes of primitive steps.

A block is a tuple of primitive steps in single-assignment form: the block input is the register
``"x"`` and the block output is the last step's ``dst``.  Both interpreters (the mean-field theory
and the JAX probe) interpret these primitives; neither knows about placements.  Adding a placement
is one constructor plus its registry entry.

Primitives: `Norm` (LayerNorm or RMSNorm with a gain, per `Arch.norm`), `Linear`, `Activation`,
`Product` (gated FFNs), `SelfAttention` (q, k, v projections and softmax mixing, per head,
concatenated; the output projection is a separate `Linear` named ``attn.o``), `CrossAttention`
(queries from the decoder stream, keys and values from the encoder output, the register
``"mem"``), `Scale` and `Add` (scaled residual sum ``alpha*a + beta*b``).

A placement wraps each *sublayer* of a block (``attn`` and ``ffn`` in an encoder or decoder-only
block; ``self_attn``, ``cross_attn`` and ``ffn`` in an encoder-decoder's decoder block) with its
norms and residual adds; its norms are named ``norm1, norm2, ...`` in sublayer order.  A `Stack`
says which sublayers a block has: one stack for encoder-only and decoder-only models, an
encoder and a decoder stack (parameter prefixes ``enc.`` and ``dec.``) for encoder-decoder
models (``Arch.decoder_depth > 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from normfield.arch import GATED_ACTIVATIONS


@dataclass(frozen=True)
class Norm:
    """``dst = norm(src) * gain``; parameters ``{name}.scale`` (and ``{name}.bias`` for
    LayerNorm; both at their init values 1 and 0)."""

    name: str
    src: str
    dst: str
    width: str = "d"


@dataclass(frozen=True)
class Linear:
    """``dst = src @ W (+ b)``; ``W`` has shape (width[fan_in], width[fan_out])."""

    name: str
    src: str
    dst: str
    fan_in: str = "d"
    fan_out: str = "d"


@dataclass(frozen=True)
class Activation:
    """``dst = phi(src)`` elementwise; ``phi`` is the Arch's (base) activation."""

    src: str
    dst: str


@dataclass(frozen=True)
class Product:
    """``dst = a * b`` elementwise (the gate of SwiGLU / GeGLU, Shazeer 2020)."""

    a: str
    b: str
    dst: str


@dataclass(frozen=True)
class SelfAttention:
    """Multi-head softmax attention without its output projection:
    ``dst = concat_h softmax(q_h k_h^T / sqrt(d_head) + mask) v_h`` with ``q = src @ W_q`` etc.
    (Vaswani et al. 2017, eq. 1); parameters ``{prefix}.q {prefix}.k {prefix}.v``; `mask`
    ``None`` takes ``Arch.mask``."""

    src: str
    dst: str
    prefix: str = "attn"
    mask: str | None = None


@dataclass(frozen=True)
class CrossAttention:
    """Encoder-decoder attention (Vaswani et al. 2017, section 3.2.3): queries ``src @ W_q``
    from the decoder stream, keys and values ``mem @ W_k``, ``mem @ W_v`` from the encoder
    output (every decoder position sees every source position); parameters
    ``{prefix}.q {prefix}.k {prefix}.v``."""

    src: str
    dst: str
    prefix: str = "cross_attn"
    memory: str = "mem"


@dataclass(frozen=True)
class Scale:
    """``dst = factor * src`` with a constant factor (e.g. LayerNorm Scaling's 1/sqrt(l))."""

    src: str
    dst: str
    factor: float = 1.0


@dataclass(frozen=True)
class Add:
    """``dst = alpha * a + beta * b`` (residual connection; DeepNorm's alpha, branch scales)."""

    a: str
    b: str
    dst: str
    alpha: float = 1.0
    beta: float = 1.0


Step = Norm | Linear | Activation | Product | SelfAttention | CrossAttention | Scale | Add
CONSTANT_FIELDS = {Scale: ("factor",), Add: ("alpha", "beta")}


def split_constants(steps: tuple) -> tuple[tuple, tuple[float, ...]]:
    """Separate a block's numeric constants from its structure.

    Returns ``(template, constants)``: the template has every constant set to 0.0, so blocks
    that differ only by constants (layer-dependent scales) share one template and can be run by
    one `lax.scan` with the constants as per-layer inputs.
    """
    template, constants = [], []
    for step in steps:
        names = CONSTANT_FIELDS.get(type(step), ())
        constants.extend(float(getattr(step, n)) for n in names)
        template.append(replace(step, **{n: 0.0 for n in names}))
    return tuple(template), tuple(constants)


def fill_constants(template: tuple, constants) -> list:
    """Inverse of `split_constants`: yields steps whose constants come from `constants`
    (floats or traced scalars), in order."""
    out, k = [], 0
    for step in template:
        names = CONSTANT_FIELDS.get(type(step), ())
        if names:
            step = replace(step, **{n: constants[k + i] for i, n in enumerate(names)})
            k += len(names)
        out.append(step)
    return out


def step_params(step) -> tuple[str, ...]:
    """Names of the weight parameters a step owns (biases and norm gains included)."""
    if isinstance(step, Norm):
        return (f"{step.name}.scale",)
    if isinstance(step, Linear):
        return (step.name,)
    if isinstance(step, (SelfAttention, CrossAttention)):
        return tuple(f"{step.prefix}.{p}" for p in "qkv")
    return ()


# ---- stacks and sublayers (shared by every placement) -------------------------------------------
@dataclass(frozen=True)
class Stack:
    """One stack of blocks: parameter-name `prefix` (``""``, ``"enc."`` or ``"dec."``), its
    `depth`, its `role` (``"single"``: the only stack; ``"encoder"`` / ``"decoder"`` of an
    encoder-decoder model) and the kinds of its blocks' sublayers."""

    prefix: str
    depth: int
    role: str

    @property
    def sublayers(self) -> tuple[str, ...]:
        return ("self_attn", "cross_attn", "ffn") if self.role == "decoder" else ("attn", "ffn")


def stacks(arch) -> tuple[Stack, ...]:
    """The stacks of `arch`, input side first."""
    if arch.decoder_depth:
        return (Stack("enc.", arch.depth, "encoder"), Stack("dec.", arch.decoder_depth, "decoder"))
    return (Stack("", arch.depth, "single"),)


def sublayer(arch, kind: str, src: str, dst: str, inner_norm: str | None = None) -> tuple:
    """The steps of one sublayer: ``attn`` (self-attention with the Arch's mask), ``self_attn``
    (a decoder's causal self-attention), ``cross_attn`` or ``ffn``; each attention ends with its
    output projection ``{kind}.o``."""
    if kind == "ffn":
        return ffn(arch, src, dst, inner_norm)
    if kind == "cross_attn":
        heads = CrossAttention(src, f"{dst}.heads", kind)
    else:
        heads = SelfAttention(src, f"{dst}.heads", kind, "causal" if kind == "self_attn" else None)
    return (heads, Linear(f"{kind}.o", f"{dst}.heads", dst))


def ffn(arch, src: str, dst: str, inner_norm: str | None = None) -> tuple:
    """Position-wise FFN ``phi(x W1) W2``; gated activations use ``(phi(x W1) * x W3) W2``;
    `inner_norm` inserts a norm on the hidden activations (NormFormer's FFN LayerNorm)."""
    steps = [Linear("ffn.w1", src, f"{dst}.pre", "d", "ff"), Activation(f"{dst}.pre", f"{dst}.act")]
    hidden = f"{dst}.act"
    if arch.activation in GATED_ACTIVATIONS:
        steps += [Linear("ffn.w3", src, f"{dst}.lin", "d", "ff"),
                  Product(f"{dst}.act", f"{dst}.lin", f"{dst}.gated")]
        hidden = f"{dst}.gated"
    if inner_norm:
        steps.append(Norm(inner_norm, hidden, f"{dst}.normed", "ff"))
        hidden = f"{dst}.normed"
    steps.append(Linear("ffn.w2", hidden, dst, "ff", "d"))
    return tuple(steps)


# ---- placements --------------------------------------------------------------------------------
def post_ln(arch, layer: int, stack: Stack, alpha: float = 1.0) -> tuple:
    """Post-LN (Vaswani et al. 2017): ``x = LN(alpha x + F(x))`` for each sublayer F in turn
    (alpha = 1; DeepNorm's alpha otherwise)."""
    steps, x = [], "x"
    for i, kind in enumerate(stack.sublayers, 1):
        steps += [*sublayer(arch, kind, x, f"b{i}"), Add(x, f"b{i}", f"r{i}", alpha, 1.0),
                  Norm(f"norm{i}", f"r{i}", f"h{i}")]
        x = f"h{i}"
    return tuple(steps)


def pre_ln(arch, layer: int, stack: Stack, branch_scale: float = 1.0,
           norm_scale: float = 1.0) -> tuple:
    """Pre-LN (Xiong et al. 2020, arXiv 2002.04745): ``x = x + F(LN(x))`` for each sublayer.

    `branch_scale` multiplies each branch (residual scaling); `norm_scale` multiplies each
    norm's output (LayerNorm Scaling)."""
    steps, x = [], "x"
    for i, kind in enumerate(stack.sublayers, 1):
        steps += [Norm(f"norm{i}", x, f"n{i}"), Scale(f"n{i}", f"s{i}", norm_scale),
                  *sublayer(arch, kind, f"s{i}", f"b{i}"),
                  Add(x, f"b{i}", f"r{i}", 1.0, branch_scale)]
        x = f"r{i}"
    return tuple(steps)


def peri_ln(arch, layer: int, stack: Stack) -> tuple:
    """Peri-LN (Kim et al. 2025, arXiv 2502.02732) = Sandwich-LN (Ding et al. 2021, CogView):
    ``x = x + Norm(F(Norm(x)))`` for each sublayer (output norms ``norm{i}_out``)."""
    steps, x = [], "x"
    for i, kind in enumerate(stack.sublayers, 1):
        steps += [Norm(f"norm{i}", x, f"n{i}"), *sublayer(arch, kind, f"n{i}", f"b{i}"),
                  Norm(f"norm{i}_out", f"b{i}", f"o{i}"), Add(x, f"o{i}", f"r{i}")]
        x = f"r{i}"
    return tuple(steps)


def normformer(arch, layer: int, stack: Stack) -> tuple:
    """NormFormer (Shleifer et al. 2021, arXiv 2110.09456): Pre-LN plus a norm after attention
    (``attn_norm``) and a norm after the FFN activation (``ffn_norm``).  The head-wise scales
    are 1 at initialization and are not modelled as parameters."""
    return (Norm("norm1", "x", "h1"), *sublayer(arch, "attn", "h1", "a"),
            Norm("attn_norm", "a", "an"), Add("x", "an", "r1"), Norm("norm2", "r1", "h2"),
            *sublayer(arch, "ffn", "h2", "f", inner_norm="ffn_norm"), Add("r1", "f", "out"))


def b2t(arch, layer: int, stack: Stack) -> tuple:
    """B2T connection (Takase et al. 2022, "B2T Connection: Serving Stability and Performance
    in Deep Transformers", arXiv 2206.00330): Post-LN plus a bottom-to-top skip from the block
    input to the input of the block's last norm,
    ``h = LN(x + Attn(x)); y = LN(h + FFN(h) + x)`` (encoder-decoder decoder blocks:
    ``h1 = LN(x + SelfAttn(x)); h2 = LN(h1 + CrossAttn(h1)); y = LN(h2 + FFN(h2) + x)``), as
    in the authors' fairseq code (takase/b2t_connection, ``residual_bottom_to_top``).  The
    skip's add ``z = r + x`` sums two correlated operands (r contains x through the earlier
    norms); the theory's `Add` map handles that from the recipe alone.  That code also scales
    every block weight by depth^(-1/2) at init (``rescaling_init``); it is not part of the
    placement here (``Init(gains=...)`` reproduces it)."""
    steps, x, last = [], "x", len(stack.sublayers)
    for i, kind in enumerate(stack.sublayers, 1):
        steps += [*sublayer(arch, kind, x, f"b{i}"), Add(x, f"b{i}", f"r{i}")]
        src = f"r{i}"
        if i == last:
            steps.append(Add(src, "x", "z"))
            src = "z"
        steps.append(Norm(f"norm{i}", src, f"h{i}"))
        x = f"h{i}"
    return tuple(steps)


def deepnorm_constants(arch, stack: Stack) -> tuple[float, float]:
    """DeepNet's (alpha, beta) (Wang et al. 2022, arXiv 2203.00555, Table 1): N encoder and M
    decoder layers; encoder-only (2N)^(1/4), (8N)^(-1/4); decoder-only (2M)^(1/4), (8M)^(-1/4);
    encoder-decoder: encoder 0.81 (N^4 M)^(1/16), 0.87 (N^4 M)^(-1/16), decoder (3M)^(1/4),
    (12M)^(-1/4).  Options ``alpha`` and ``beta`` replace them in every stack."""
    n, m = arch.depth, arch.decoder_depth
    if stack.role == "encoder":
        alpha, beta = 0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)
    elif stack.role == "decoder":
        alpha, beta = (3.0 * m) ** 0.25, (12.0 * m) ** -0.25
    else:
        alpha, beta = (2.0 * n) ** 0.25, (8.0 * n) ** -0.25
    return arch.option("alpha", alpha), arch.option("beta", beta)


def deepnorm(arch, layer: int, stack: Stack) -> tuple:
    """DeepNorm (Wang et al. 2022, arXiv 2203.00555): ``x = LN(alpha x + F(x))`` with the
    alpha of `deepnorm_constants`; beta-scaled init in `deepnorm_gains`."""
    return post_ln(arch, layer, stack, alpha=deepnorm_constants(arch, stack)[0])


def deepnorm_gains(arch, stack: Stack) -> dict[str, float]:
    """DeepNet's Xavier gain beta on the FFN, value and output projections (Algorithm 1; the
    query and key projections keep gain 1)."""
    beta = deepnorm_constants(arch, stack)[1]
    return {g: beta for g in ("ffn.w1", "ffn.w2", "ffn.w3", "attn.v", "attn.o")}


def mix_ln(arch, layer: int, stack: Stack) -> tuple:
    """Mix-LN (Li et al. 2024, arXiv 2412.13795): the first floor(fraction * depth) layers
    Post-LN, the rest Pre-LN (fraction 0.25 by default)."""
    n_post = math.floor(arch.option("post_fraction", 0.25) * stack.depth)
    return (post_ln if layer < n_post else pre_ln)(arch, layer, stack)


def layernorm_scaling(arch, layer: int, stack: Stack) -> tuple:
    """LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth", arXiv 2502.05795):
    ``x = x + F(LN(x) / sqrt(l))`` with l = layer index + 1."""
    return pre_ln(arch, layer, stack, norm_scale=1.0 / math.sqrt(layer + 1))


def scaled_pre_ln(arch, layer: int, stack: Stack) -> tuple:
    """Pre-LN with each residual branch multiplied by a constant (default 1/sqrt(2 * depth),
    the scaling of GPT-2's residual projections applied to the branch; ReZero-style alpha
    (Bachlechner et al. 2021) with option ``branch_scale``)."""
    scale = arch.option("branch_scale", 1.0 / math.sqrt(2.0 * stack.depth))
    return pre_ln(arch, layer, stack, branch_scale=scale)


@dataclass(frozen=True)
class PlacementSpec:
    """A placement: ``block(arch, layer, stack) -> steps``; whether it has a final norm by
    default; the names of its ``Arch.placement_options``; an optional init rule
    ``init_gains(arch, stack) -> {group: gain}``; and whether it defines the blocks of an
    encoder-decoder's two stacks."""

    name: str
    block: Callable
    final_norm: bool
    options: tuple[str, ...] = ()
    init_gains: Callable | None = None
    encoder_decoder: bool = True


PLACEMENTS = {
    "post": PlacementSpec("post", post_ln, final_norm=False),
    "pre": PlacementSpec("pre", pre_ln, final_norm=True),
    "peri": PlacementSpec("peri", peri_ln, final_norm=True),
    "normformer": PlacementSpec("normformer", normformer, final_norm=True,
                                encoder_decoder=False),
    "deepnorm": PlacementSpec("deepnorm", deepnorm, final_norm=False, options=("alpha", "beta"),
                              init_gains=deepnorm_gains),
    "mixln": PlacementSpec("mixln", mix_ln, final_norm=True, options=("post_fraction",)),
    "lns": PlacementSpec("lns", layernorm_scaling, final_norm=True),
    "scaled_pre": PlacementSpec("scaled_pre", scaled_pre_ln, final_norm=True,
                                options=("branch_scale",)),
    "b2t": PlacementSpec("b2t", b2t, final_norm=False),
}


def placement_spec(name: str) -> PlacementSpec:
    if name not in PLACEMENTS:
        raise ValueError(f"invalid placement={name!r}: expected one of "
                         + ", ".join(repr(p) for p in PLACEMENTS))
    return PLACEMENTS[name]


def check_placement(name: str, options) -> None:
    spec = placement_spec(name)
    for key, value in options:
        if key not in spec.options:
            valid = ", ".join(spec.options) or "none"
            raise ValueError(f"invalid placement option {key!r} for placement {name!r}: "
                             f"valid options: {valid}")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid placement option {key}={value!r}: expected a finite number >= 0")


def block(arch, layer: int, stack: Stack | None = None) -> tuple:
    """The primitive steps of block `layer` (0 = nearest the input) of `stack` (default: the
    first stack of `arch`)."""
    return placement_spec(arch.placement).block(arch, layer, stack or stacks(arch)[0])


def layer_param_shapes(arch, stack: Stack | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter names of one block of `stack` (default: the first) in recipe order, without
    the stack prefix, with their shapes (every block of a stack has the same set; biases only
    when ``arch.bias``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for step in block(arch, 0, stack):
        if isinstance(step, Norm):
            shapes[f"{step.name}.scale"] = (arch.width(step.width),)
        for name in step_params(step):
            if not name.endswith(".scale"):
                shapes[name] = arch.shape(name)
    if arch.bias:
        for name in [n for n in shapes if not n.endswith(".scale")]:
            shapes[f"{name}.bias"] = (arch.shape(name)[1],)
    return shapes


def layer_params(arch) -> tuple[str, ...]:
    """Per-layer parameter names of every stack, with their stack prefixes, in recipe order."""
    return tuple(st.prefix + n for st in stacks(arch) for n in layer_param_shapes(arch, st))
