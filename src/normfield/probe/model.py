"""The JAX interpreter of an `Arch`: parameters stacked over layers, one `lax.scan` per run of
structurally identical blocks, mean cross-entropy loss.

Layout: ``params = {"layers": {name: array (depth, ...)}, "embed.tok": (V, d), ...}``; an
encoder-decoder has ``"enc.layers"`` and ``"dec.layers"`` and prefixed global names
(``"enc.embed.tok"``, ...).  Weights in the ``y = x @ W`` orientation.  Activations are
``(batch, seq, width)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from normfield.arch import GATED_ACTIVATIONS
from normfield.data import rope_angles, sinusoidal_positions
from normfield.placements import (Activation, Add, CrossAttention, Linear, Norm, Product, Scale,
                                  SelfAttention, block, fill_constants, layer_param_shapes,
                                  split_constants, stacks)

PRECISIONS = ("float32", "tf32", "bfloat16", "float64")
# `remat` choices: what each block keeps for the backward pass (`jax.checkpoint` policies)
REMAT_POLICIES = {
    True: jax.checkpoint_policies.nothing_saveable,  # only the block inputs
    "weight_products": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_ACT = {
    "relu": jax.nn.relu,
    "gelu": lambda u: jax.nn.gelu(u, approximate=False),
    "gelu_tanh": lambda u: jax.nn.gelu(u, approximate=True),
    "silu": jax.nn.silu,
}


def activation_fn(arch):
    return _ACT[GATED_ACTIVATIONS.get(arch.activation, arch.activation)]


# ---- parameters --------------------------------------------------------------------------------
def _sample(key, shape, init):
    if init.std == 0.0:
        return jnp.zeros(shape, jnp.float32)
    if init.dist == "uniform":
        half = math.sqrt(3.0) * init.std
        return jax.random.uniform(key, shape, jnp.float32, -half, half)
    return init.std * jax.random.normal(key, shape, jnp.float32)


def _group(name: str) -> str:
    return name[: -len(".bias")] if name.endswith(".bias") else name


def _init_one(arch, name: str, shape, key, stack=None):
    if name.endswith(".scale"):
        return jnp.ones(shape, jnp.float32)
    init = (arch.bias_init(_group(name)) if name.endswith(".bias")
            else arch.param_init(name, stack))
    return _sample(key, shape, init)


def global_params(arch) -> tuple[str, ...]:
    """Names of the non-layer parameters of `arch` (per stack: token and learned position
    embeddings, embedding norm, final norm; then the untied head)."""
    names = []
    for st in stacks(arch):
        names.append(st.prefix + "embed.tok")
        if arch.positions == "learned":
            names.append(st.prefix + "embed.pos")
        if arch.embed_norm:
            names.append(st.prefix + "embed_norm.scale")
        if arch.has_final_norm:
            names.append(st.prefix + "final_norm.scale")
    if not arch.tied_head:
        names.append("head.out")
    return tuple(names)


def _stack_layers(arch, stack, key) -> dict:
    shapes = layer_param_shapes(arch, stack)
    keys = jax.random.split(key, stack.depth * len(shapes))
    keys = keys.reshape(stack.depth, len(shapes), *keys.shape[1:])  # raw or typed keys

    def one_layer(layer_keys):
        return {n: _init_one(arch, n, shape, layer_keys[i], stack)
                for i, (n, shape) in enumerate(shapes.items())}

    return jax.vmap(one_layer)(keys)


def init_params(arch, key, dtype=jnp.float32) -> dict:
    """Random parameters of `arch`, per-layer parameters stacked on a leading axis: drawn in
    float32 and cast to `dtype`, so that a float64 measurement computes the float32 one's
    weights (the same seeds, the same draws) in float64."""
    layer_key, global_key = jax.random.split(key)
    sts = stacks(arch)
    layer_keys = [layer_key] if len(sts) == 1 else jax.random.split(layer_key, len(sts))
    params = {st.prefix + "layers": _stack_layers(arch, st, k) for st, k in zip(sts, layer_keys)}
    names = global_params(arch)
    gkeys = jax.random.split(global_key, len(names))
    for i, name in enumerate(names):
        shape = (arch.d_model,) if name.endswith(".scale") else arch.shape(name)
        params[name] = _init_one(arch, name, shape, gkeys[i])
    return jax.tree.map(lambda p: p.astype(dtype), params)


# ---- primitives --------------------------------------------------------------------------------
@jax.custom_vjp
def _bf16_matmul(x, w):
    """``x @ w`` with bf16 operands and float32 accumulation, forward and backward: the
    backward products take the float32 cotangent rounded to bf16, as mixed-precision training
    does (JAX's own transpose would multiply the float32 cotangent by an upcast weight).  The
    backward keeps the float32 weight (a parameter, kept anyway) and rounds it again, rather
    than saving a bf16 copy of every weight matrix in the forward pass."""
    return _bf16_matmul_fwd(x, w)[0]


def _bf16_matmul_fwd(x, w):
    xb = x.astype(jnp.bfloat16)
    return jnp.matmul(xb, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32), (xb, w)


def _bf16_matmul_bwd(residuals, g):
    xb, w = residuals
    wb = w.astype(jnp.bfloat16)
    gb = g.astype(jnp.bfloat16)
    dx = jnp.matmul(gb, wb.T, preferred_element_type=jnp.float32)
    dw = jnp.einsum("...i,...j->ij", xb, gb, preferred_element_type=jnp.float32)
    return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


@jax.custom_vjp
def _softmax(logits):
    """``jax.nn.softmax`` over the last axis, differentiated from its output alone:
    ``dx = y (g - sum(y g))``.  JAX's own (with ``jax_softmax_custom_jvp`` off, the default)
    keeps the exponentials as well as the output for its backward pass: one more float32
    (heads, seq, seq) array per attention and seed saved in the forward pass."""
    return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits):
    y = jax.nn.softmax(logits, axis=-1)
    return y, y


def _softmax_bwd(y, g):
    return (y * (g - jnp.sum(y * g, axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _matmul(x, w, precision: str):
    return _bf16_matmul(x, w) if precision == "bfloat16" else jnp.matmul(x, w)


def _norm(arch, x, scale):
    return _scaled_norm(x, scale, arch.norm == "layernorm", arch.norm_eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _scaled_norm(x, scale, center: bool, eps: float):
    """LayerNorm (`center`) or RMSNorm of the last axis times the gain: ``xhat * scale`` with
    ``xhat = c * inv``, c = x minus its mean (or x), ``inv = rsqrt(mean(c^2) + eps)``.  Its
    backward keeps only xhat and inv: ``dx = inv (h - mean(h) - xhat mean(h xhat))`` with
    ``h = g * scale`` (no ``mean(h)`` for RMSNorm), exact with eps; autodiff of the same
    formula kept c and two products as well."""
    return _scaled_norm_fwd(x, scale, center, eps)[0]


def _scaled_norm_fwd(x, scale, center, eps):
    c = x - jnp.mean(x, axis=-1, keepdims=True) if center else x
    inv = jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + eps)
    xhat = c * inv
    return xhat * scale, (xhat, inv, scale)


def _scaled_norm_bwd(center, eps, saved, g):
    xhat, inv, scale = saved
    h = g * scale
    dx = h - xhat * jnp.mean(h * xhat, axis=-1, keepdims=True)
    if center:
        dx = dx - jnp.mean(h, axis=-1, keepdims=True)
    dscale = jnp.sum((g * xhat).reshape(-1, xhat.shape[-1]), axis=0).reshape(scale.shape)
    return dx * inv, dscale


_scaled_norm.defvjp(_scaled_norm_fwd, _scaled_norm_bwd)


def _linear(p, name, x, precision):
    y = _matmul(x, p[name], precision)
    return y + p[name + ".bias"] if name + ".bias" in p else y


def _rotate(u, n):
    """Rotate the pairs (2f, 2f+1) of the last axis by t * theta_f (RoPE); u: (b, n, h, c)."""
    angle = jnp.asarray(rope_angles(n, u.shape[-1]), u.dtype)[None, :, None, :]
    even, odd = u[..., 0::2], u[..., 1::2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(u.shape)


def _attention(arch, p, x, precision, prefix="attn", mask=None, memory=None):
    """Multi-head self-attention softmax(QK^T/sqrt(d_head))V, logits and softmax in the
    activations' dtype (float32; float64 in the float64 mode) in every precision.  (cuDNN's
    fused attention through `jax.nn.dot_product_attention` was tried on an H200 with JAX
    0.11.2, batched by the seed `vmap` and, later, with the seed axis folded into its batch so
    that no vmap reached it: both gave gradient norms off by up to 11x per seed in bf16; see
    benchmarks/README.md.)  With `memory`, keys and values come from it (cross-attention, no
    mask); `mask` None takes ``arch.mask``."""
    b, n, d = x.shape
    kv_src = x if memory is None else memory
    heads = lambda name, src: _linear(p, f"{prefix}.{name}", src, precision).reshape(
        b, n, arch.n_heads, arch.d_head)
    q, k, v = heads("q", x), heads("k", kv_src), heads("v", kv_src)
    if arch.qk_norm:  # QK-Norm: RMS-normalize each head's queries and keys (gain 1)
        q, k = (u * jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + arch.norm_eps)
                for u in (q, k))
        if arch.qk_temperature is not None:  # Henry et al. 2020: logits = g * cos(q, k)
            q = q * (arch.qk_temperature / math.sqrt(arch.d_head))
    if arch.positions == "rope":
        q, k = _rotate(q, n), _rotate(k, n)
    if precision == "bfloat16":
        q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=x.dtype)
    logits = logits / math.sqrt(arch.d_head)
    if memory is None and (mask or arch.mask) == "causal":
        logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
    weights = _softmax(logits)
    if precision == "bfloat16":
        weights, v = weights.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v, preferred_element_type=x.dtype)
    return out.reshape(b, n, d)


def apply_steps(arch, steps, p, x, precision="float32", memory=None):
    """Run one block's primitive steps on ``x`` (batch, seq, d) (and an encoder-decoder's
    encoder output `memory`); returns the block output."""
    env = {"x": x, "mem": memory}
    phi = activation_fn(arch)
    for s in steps:
        if isinstance(s, Norm):
            env[s.dst] = _norm(arch, env[s.src], p[s.name + ".scale"])
        elif isinstance(s, Linear):
            env[s.dst] = _linear(p, s.name, env[s.src], precision)
        elif isinstance(s, Activation):
            env[s.dst] = phi(env[s.src])
        elif isinstance(s, Product):
            env[s.dst] = env[s.a] * env[s.b]
        elif isinstance(s, SelfAttention):
            env[s.dst] = _attention(arch, p, env[s.src], precision, s.prefix, s.mask)
        elif isinstance(s, CrossAttention):
            env[s.dst] = _attention(arch, p, env[s.src], precision, s.prefix,
                                    memory=env[s.memory])
        elif isinstance(s, Scale):
            env[s.dst] = s.factor * env[s.src]
        elif isinstance(s, Add):
            env[s.dst] = s.alpha * env[s.a] + s.beta * env[s.b]
        else:  # pragma: no cover - the recipe types are closed
            raise TypeError(f"unknown step {s!r}")
    return env[steps[-1].dst]


# ---- forward statistics ------------------------------------------------------------------------
def stream_stats(x):
    """(E||x||^2/d, mean within-sequence cosine over distinct tokens, mean cross-sequence cosine)
    of a residual-stream tensor (batch, seq, d)."""
    b, n, d = x.shape
    sq = jnp.sum(x * x, axis=-1)
    unit = x * jax.lax.rsqrt(sq)[..., None]
    per_seq = jnp.sum(unit, axis=1)  # (b, d)
    within_sum = jnp.sum(per_seq * per_seq)
    total = jnp.sum(per_seq, axis=0)
    cos_within = (within_sum - b * n) / (b * n * max(n - 1, 1))
    cos_across = (jnp.sum(total * total) - within_sum) / (b * max(b - 1, 1) * n * n)
    return jnp.stack([jnp.mean(sq) / d, cos_within, cos_across])


# ---- the whole network -------------------------------------------------------------------------
def segments(arch, stack=None) -> list[tuple[int, int, tuple, np.ndarray]]:
    """Runs of consecutive layers of `stack` (default: the first) with the same block template:
    ``(start, stop, template, constants (stop - start, n_constants))``."""
    stack = stack or stacks(arch)[0]
    runs: list = []
    for layer in range(stack.depth):
        template, consts = split_constants(block(arch, layer, stack))
        if runs and runs[-1][2] == template:
            runs[-1][1] = layer + 1
            runs[-1][3].append(consts)
        else:
            runs.append([layer, layer + 1, template, [consts]])
    return [(a, b, t, np.asarray(c, np.float32).reshape(b - a, -1)) for a, b, t, c in runs]


def embed(arch, params, tokens, prefix=""):
    x = arch.embed_scale * params[prefix + "embed.tok"][tokens]
    if arch.positions == "sinusoidal":
        x = x + jnp.asarray(sinusoidal_positions(arch.seq_len, arch.d_model), x.dtype)
    elif arch.positions == "learned":
        x = x + params[prefix + "embed.pos"]
    if arch.embed_norm:
        x = _norm(arch, x, params[prefix + "embed_norm.scale"])
    return x


def run_stack(arch, stack, params, tokens, precision="float32", unroll=False, remat=False,
              memory=None):
    """Embedding, blocks and final norm of one stack: (output, stream statistics (depth+1, 3))."""
    x = embed(arch, params, tokens, stack.prefix)
    stats = [stream_stats(x)[None]]
    for start, stop, template, consts in segments(arch, stack):
        layer_p = jax.tree_util.tree_map(lambda a: a[start:stop], params[stack.prefix + "layers"])

        def body(h, xs):
            p, c = xs
            h = apply_steps(arch, fill_constants(template, c), p, h, precision, memory)
            return h, stream_stats(h)

        if remat:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
        if unroll:
            for i in range(stop - start):
                x, s = body(x, jax.tree_util.tree_map(lambda a: a[i], (layer_p, consts)))
                stats.append(s[None])
        else:
            x, s = jax.lax.scan(body, x, (layer_p, jnp.asarray(consts)))
            stats.append(s)
    if arch.has_final_norm:
        x = _norm(arch, x, params[stack.prefix + "final_norm.scale"])
    return x, jnp.concatenate(stats, axis=0)


def forward(arch, params, tokens, precision="float32", unroll=False, remat=False):
    """Logits (batch, seq, vocab) and stream statistics ``{stack prefix: (depth + 1, 3)}``.

    tokens: (batch, seq) ints, or for an encoder-decoder the pair (source tokens, decoder
    input tokens).
    remat: recompute each block's activations in the backward pass (`jax.checkpoint`), so
    that only the block inputs are stored: memory O(depth) blocks instead of every
    intermediate, at the cost of a second forward pass; ``"weight_products"`` keeps the
    products with the weight matrices (x @ W) and recomputes the rest (norms, activations,
    the attention logits and probabilities): less memory traffic for a few percent more
    arithmetic."""
    sts = stacks(arch)
    token_sets = (tokens,) if len(sts) == 1 else tokens
    memory, stats = None, {}
    for st, toks in zip(sts, token_sets):
        memory, stats[st.prefix] = run_stack(arch, st, params, toks, precision, unroll, remat,
                                             memory)
    head = params[sts[-1].prefix + "embed.tok"].T if arch.tied_head else params["head.out"]
    return _matmul(memory, head, precision), stats


def loss_fn(arch, params, tokens, targets, precision="float32", unroll=False, remat=False):
    """Mean cross-entropy over all batch_size * seq_len (decoder) positions; aux = stream
    statistics."""
    logits, stats = forward(arch, params, tokens, precision, unroll, remat)
    logp = jax.nn.log_softmax(logits, axis=-1)  # float32 (float64) in every precision
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)
    return jnp.mean(nll), stats
