"""The mean-field interpreter of an `Arch`: embedding -> blocks -> final norm -> head -> loss,
forward kernels then backward kernels, and ``E||dL/dW||_F^2`` for every weight.

Approximations (each named where it is made): leading order in 1/width with the
gradient-independence assumption (`maps`), keeping the O(1/d) terms that compound over depth
(the norms' Jensen and projection factors, Euler's theorem for norms before homogeneous
branches, the cosine bias of the norm forward map); Gaussian logits with exchangeable keys for
the softmax (`attention`, `softmax`), plus the finite-width term that grows with the number of
keys n: the covariance of the keys' and values' realized kernels through their shared input
tokens (`attention.gram_fluctuation`), O(n c), with the realized kernel's fluctuation
amplitude c carried through the blocks (`fluctuation`: derived at the embedding, growing with
depth); token collisions enter the kernels in expectation (probability sum_v p_v^2) and c
through their variance, and the token-embedding gradient through the kernels' same-token
companion (`kernels`, `token_grad_sq`): the gradient kernel of two positions that hold the same
token, propagated by the same maps at the conditioned entries.
The loss is the mean cross-entropy over N = B n positions with targets iid from the token
distribution.  At initialization the logit gradient is ``(p_t - e_{y_t}) / N`` and
``E[(p_t - e_y_t) . (p_t' - e_y_t')] = E[p_t . p_t'] - 2/V + P(y_t = y_t')`` (``1 - 2/V + E||p||^2``
on the diagonal), with the softmax moments of `softmax.pair_moments` over the V classes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time

import numpy as np

from normfield.arch import GATED_ACTIVATIONS, MASKS, Arch
from normfield.data import collision_prob, sinusoidal_positions, token_probs
from normfield.placements import (Activation, Add, CrossAttention, Linear, Norm, Product, Scale,
                                  SelfAttention, Stack, block, stacks)
from normfield.profile import GradProfile
from normfield.theory import attention, fluctuation, gaussian
from normfield.theory.kernels import Blocks, cosine, pair_sum
from normfield.theory.maps import (Point, activation_forward, bias_grad_sq, gain_grad_sq,
                                   linear_backward, linear_forward, linear_grad_sq, norm_backward,
                                   norm_cross_backward, norm_cross_forward, norm_forward)

METHODS = ("analytic", "mc")
STORE_LIMIT_BYTES = 2e9


@functools.lru_cache(maxsize=16)
def _stack_vars(arch: Arch, stack: Stack) -> dict[str, tuple[float, float]]:
    """The memo of `_Block._var` shared by the blocks of one stack of one arch."""
    return {}


def _sym(k: Blocks) -> Blocks:
    """``C + C^T`` per block (the across block of a cross-kernel transposes by exchanging the
    two sequences)."""
    return Blocks.of(k.a + k.a.swapaxes(-1, -2))


def _scaled(value, factor):
    """``value * factor``, None staying None (a cross-kernel or coefficient that vanishes)."""
    return None if value is None else value * factor


def _correlated_adds(steps: tuple) -> tuple[frozenset, frozenset]:
    """The registers that carry a cross-kernel with the block input ``x`` and the indices of
    the Adds whose two operands are correlated through it (both empty when there are none).

    ``x`` carries; Norm and Scale pass it on; an Add carries when an operand does; Linear and
    attention outputs do not (zero-mean random weights).  An Add of two carrying operands is
    correlated; one operand must be ``x`` itself (B2T's skip), so that its cross term is the
    other operand's cross-kernel with x.  Recipes outside these rules raise
    NotImplementedError (no placement needs them): two correlated operands neither of which is
    x, more than one correlated add in a block, and an activation or gate applied to a
    carrying register or to a gradient that contains the correlated add's."""
    carries, correlated = {"x"}, []
    for i, s in enumerate(steps):
        if isinstance(s, (Norm, Scale)) and s.src in carries:
            carries.add(s.dst)
        elif isinstance(s, Add) and {s.a, s.b} & carries:
            carries.add(s.dst)
            if {s.a, s.b} <= carries:
                if "x" not in (s.a, s.b):
                    raise NotImplementedError(
                        f"Add {s.a!r} + {s.b!r}: both operands correlate with the block input "
                        "and neither is the block input itself")
                correlated.append(i)
    if not correlated:
        return frozenset(), frozenset()
    if len(correlated) > 1:
        raise NotImplementedError("more than one add of correlated operands in one block")
    reach = {steps[correlated[0]].dst}  # registers whose gradient contains the reference
    for s in reversed(steps):
        if isinstance(s, (Activation, Product)):
            operands = {s.src} if isinstance(s, Activation) else {s.a, s.b}
            if operands & carries or s.dst in reach:
                raise NotImplementedError(f"{type(s).__name__} on a register or gradient "
                                          "correlated with a skip of the block input")
        elif isinstance(s, (Norm, Scale)) and s.dst in reach:
            reach.add(s.src)
        elif isinstance(s, Add) and s.dst in reach:
            reach |= {s.a, s.b}
    return frozenset(carries), frozenset(correlated)


def _radial_free_norms(steps: tuple, homogeneous: bool, biased: frozenset) -> frozenset:
    """Indices of the Norm steps whose output gradient is exactly orthogonal to their output,
    token by token (Euler's theorem for homogeneous maps).

    Let y be a norm's output and f the map from y to the input u of a later norm.  If u
    depends on y alone and f is positively homogeneous of degree 1 token by token (bias-free
    Linear, ReLU, Scale, and Adds of such terms; every gain and norm bias at its init value),
    then ``g_y . y = g_u . J_f y = g_u . f(y) = g_u . u = 0``, the last because a norm is
    invariant to the scale of its input.  Post-LN's first norm is such a norm (u = h + FFN(h)
    with a ReLU FFN), as are DeepNorm's, Peri-LN's and NormFormer's norms before a ReLU FFN.
    `maps.norm_backward` then removes only the coordinate mean (LayerNorm) or nothing
    (RMSNorm) instead of an isotropic share 1/d of the gradient along y.

    A register is clean when it is computed from y by such steps alone; a clean register used
    in any other way (attention, a gate, a smooth activation, a biased Linear, an Add with a
    register not computed from y alone, or the block output, whose uses lie outside the
    block) breaks the property.  `homogeneous`: the block's activation is positively
    homogeneous (`gaussian.homogeneous`); `biased`: the names of Linears with random biases."""
    found = []
    for i, s in enumerate(steps):
        if not isinstance(s, Norm):
            continue
        clean, ok = {s.dst}, True
        for t in steps[i + 1:]:
            srcs = {t.a, t.b} if isinstance(t, (Add, Product)) else {getattr(t, "src", None)}
            if isinstance(t, (SelfAttention, CrossAttention)):
                srcs.add(getattr(t, "memory", None))
            used = srcs & clean
            if not used:
                continue
            if isinstance(t, Norm):
                continue  # closes: a norm is invariant to the scale of its input
            if (isinstance(t, Scale) or (isinstance(t, Linear) and t.name not in biased)
                    or (isinstance(t, Activation) and homogeneous)
                    or (isinstance(t, Add) and srcs <= clean)):
                clean.add(t.dst)
            else:
                ok = False
                break
        if ok and steps[-1].dst not in clean:
            found.append(i)
    return frozenset(found)


class _Gradients:
    """Gradient kernels ``G = E[g_i . g_j]/d`` of a block's registers, accumulated backward.

    Below the output gradient of a correlated add (B2T's skip), the reference ``g_ref``, a
    register also carries its cross-kernel ``Y(i,j) = E[g_i . g_ref,j]/d`` and, when its
    gradient is exactly ``c g_ref``, the coefficient c.  Two gradients a, b summed into one
    register then add their cross term: with ``a = c_a g_ref``,
    ``E[a_i . b_j] + E[b_i . a_j] = c_a (Y_b(j,i) + Y_b(i,j))``, so
    ``G_{a+b} = G_a + G_b + c_a (Y_b + Y_b^T)`` and ``Y_{a+b} = Y_a + Y_b``.  (Without a
    reference every Y is None and this is the plain sum of kernels.)"""

    def __init__(self, name: str, g: Blocks):
        self.g, self.y, self.coef = {name: g}, {}, {}

    def push(self, name: str, g: Blocks, y: Blocks | None = None, coef: float | None = None):
        if name not in self.g:
            self.g[name] = g
            if y is not None:
                self.y[name] = y
            if coef is not None:
                self.coef[name] = coef
            return
        y_old, coef_old = self.y.get(name), self.coef.pop(name, None)
        if y is not None and y_old is not None:
            if coef_old is not None:
                g = g + _sym(y) * coef_old
            elif coef is not None:
                g = g + _sym(y_old) * coef
            else:
                raise NotImplementedError(f"gradients summed into {name!r} both correlate with "
                                          "the skip's output gradient and neither is a "
                                          "multiple of it")
            if coef_old is not None and coef is not None:
                self.coef[name] = coef_old + coef
        self.g[name] = self.g[name] + g
        if y is not None:
            self.y[name] = y if y_old is None else y_old + y


class _Block:
    """Forward and backward interpretation of one block's steps (`stack` gives the init rules;
    `masks` the attention masks by kind).

    Correlated adds (`_correlated_adds`; B2T's ``z = r + x`` with ``r = h + F'(h)``,
    ``h = LN(x + F(x))``).
    Forward, every register r that carries one has its cross-kernels with the block input,
    ``X_r(i,j) = E[r_i . x_j]/d`` and ``MX_r(i,j) = E[rbar_i xbar_j]``: ``X_x = K_x``,
    ``MX_x = M_x``; an add ``alpha a + beta b`` gives ``alpha X_a + beta X_b`` (a Linear or
    attention operand has X = 0: zero-mean random weights); Scale c gives c X; a norm gives
    `maps.norm_cross_forward`.  The correlated add ``alpha r + beta x`` then has
    ``K = alpha^2 K_r + beta^2 K_x + alpha beta (X_r + X_r^T)`` and the same for M with MX.
    Backward, its output gradient is the reference g_ref of `_Gradients`: it reaches the block
    input directly (coefficient beta) and through the earlier norms, whose maps scale its
    cross-kernel by the per-token factor of `maps.norm_cross_backward`; the block input's
    gradient kernel then gains ``beta (Y + Y^T)`` (Y: the cross-kernel of the path through
    the norms), ``G_x = beta^2 G_ref + G_path + beta (Y + Y^T)``.  Weight and gain gradients
    use the kernels of their own input and output gradient, so the cross terms reach them
    through those kernels; their maps are unchanged (leading order, gradient independence).
    A block without a correlated add computes exactly what it did without this tracking.

    Every register also carries the fluctuation amplitude c of its realized kernel
    (`Point.fluct`, rules in `fluctuation`; forward tracks, per register, the share of the
    block input's fluctuation it inherits), read by the attention maps at their key/value
    input; and the Norm steps of `_radial_free_norms` use the backward map of a gradient
    orthogonal to their output."""

    def __init__(self, arch: Arch, steps: tuple, masks: dict, method: str, stack: Stack):
        self.arch, self.steps, self.masks, self.method, self.stack = arch, steps, masks, method, stack
        self.phi = GATED_ACTIVATIONS.get(arch.activation, arch.activation)
        self.heads = attention.HeadSpec(arch.d_head, arch.positions == "rope", arch.qk_norm,
                                        arch.norm_eps, arch.qk_temperature)
        self._vars = _stack_vars(arch, stack)
        self.carries, self.correlated = _correlated_adds(steps)
        biased = frozenset(s.name for s in steps if isinstance(s, Linear) and self._var(s.name)[1])
        self.radial_free = _radial_free_norms(steps, gaussian.homogeneous(self.phi), biased)

    def _var(self, name: str) -> tuple[float, float]:
        """(weight variance, bias variance) of a parameter, resolved once per stack (the
        forward and backward passes ask for each several times, and every block of a stack has
        the same init)."""
        if name not in self._vars:
            var_b = self.arch.bias_init(name).std ** 2 if self.arch.bias else 0.0
            self._vars[name] = (self.arch.param_init(name, self.stack).std ** 2, var_b)
        return self._vars[name]

    def _attention_mask(self, s) -> attention.Mask:
        kind = "bidirectional" if isinstance(s, CrossAttention) else (s.mask or self.arch.mask)
        return self.masks[kind]

    def _cross(self, s, env: dict, cross: dict) -> tuple[Blocks, Blocks]:
        """(X, MX) of the register `s` writes (a Norm, Scale or Add that carries)."""
        if isinstance(s, Norm):
            return norm_cross_forward(env[s.src], *cross[s.src], self.arch.norm,
                                      self.arch.norm_eps)
        if isinstance(s, Scale):
            return tuple(v * s.factor for v in cross[s.src])
        terms = [(cross[n][0] * w, cross[n][1] * w)
                 for n, w in ((s.a, s.alpha), (s.b, s.beta)) if n in cross]
        if len(terms) == 1:
            return terms[0]
        return terms[0][0] + terms[1][0], terms[0][1] + terms[1][1]

    def forward(self, x: Point, memory: Point | None = None):
        a = self.arch
        env, saved = {"x": x, "mem": memory}, {}
        cross = {"x": (x.k, x.m)} if self.correlated else {}
        transfer = {"x": 1.0, "mem": 0.0}
        for i, s in enumerate(self.steps):
            if isinstance(s, Norm):
                env[s.dst] = norm_forward(env[s.src], a.norm, a.norm_eps)
            elif isinstance(s, Linear):
                var_w, var_b = self._var(s.name)
                env[s.dst] = linear_forward(env[s.src], var_w, var_b, a.width(s.fan_out))
            elif isinstance(s, Activation):
                env[s.dst], saved[i] = activation_forward(env[s.src], self.phi)
            elif isinstance(s, Product):
                pa, pb = env[s.a], env[s.b]
                k = pa.k * pb.k
                env[s.dst] = Point(k, k * (1.0 / pa.width), pa.width)
            elif isinstance(s, (SelfAttention, CrossAttention)):
                (vq, bq), (vk, bk), (vv, bv) = (self._var(f"{s.prefix}.{p}") for p in "qkv")
                memory = env[s.memory] if isinstance(s, CrossAttention) else None
                ko, saved[i] = attention.forward(env[s.src].k, self._attention_mask(s), vq, vk,
                                                 vv, a.d_model, (bq, bk, bv), self.method,
                                                 self.heads, memory and memory.k,
                                                 (memory or env[s.src]).c,
                                                 (memory or env[s.src]).coherent)
                env[s.dst] = Point(ko, ko * (1.0 / a.d_model), a.d_model)
            elif isinstance(s, Scale):
                p = env[s.src]
                env[s.dst] = Point(p.k * s.factor ** 2, p.m * s.factor ** 2, p.width)
            elif isinstance(s, Add):
                pa, pb = env[s.a], env[s.b]
                k = pa.k * s.alpha ** 2 + pb.k * s.beta ** 2
                m = pa.m * s.alpha ** 2 + pb.m * s.beta ** 2
                if i in self.correlated:
                    xk, xm = cross[s.b if s.a == "x" else s.a]
                    k, m = k + _sym(xk) * (s.alpha * s.beta), m + _sym(xm) * (s.alpha * s.beta)
                env[s.dst] = Point(k, m, pa.width)
            fluct, transfer[s.dst] = self._fluct(s, env, transfer,
                                                 cross if i in self.correlated else None)
            p = env[s.dst]
            env[s.dst] = Point(p.k, p.m, p.width, fluct)
            if s.dst in self.carries:
                cross[s.dst] = self._cross(s, env, cross)
        return env, saved

    def _fluct(self, s, env: dict, transfer: dict,
               cross: dict | None = None) -> tuple[fluctuation.Fluct, float]:
        """The fluctuation state of the register `s` writes and the share of the block input's
        spread fluctuation it carries (rules in `fluctuation`).  `cross`: the cross-kernels
        with the block input when `s` is the correlated add, whose other operand is first
        regressed on the block input (`fluctuation.regress_on_input`)."""
        a, F = self.arch, fluctuation.Fluct
        if isinstance(s, Norm):
            u = env[s.src]
            return fluctuation.after_norm(u.c, u.c_diag, u.coherent, u.k), transfer[s.src]
        if isinstance(s, Linear):
            u, fan = env[s.src], a.width(s.fan_out)
            return F(fluctuation.linear(u.c, fan), fluctuation.linear(u.c_diag, fan),
                     u.coherent), transfer[s.src]
        if isinstance(s, Activation):
            u = env[s.src]
            q = float(np.mean(u.k.diag))
            c, t = fluctuation.activation(u.c, self.phi, q, fluctuation.mean_cosine(u.k),
                                          u.width)
            return F(c, fluctuation.diag_activation(u.c_diag, self.phi, q, u.width),
                     u.coherent), t * transfer[s.src]
        if isinstance(s, Product):
            pa, pb = env[s.a], env[s.b]
            return F(max(pa.c, pb.c), max(pa.c_diag, pb.c_diag), max(pa.coherent, pb.coherent)), \
                max(transfer[s.a], transfer[s.b])
        if isinstance(s, (SelfAttention, CrossAttention)):  # the values' input
            kv = s.memory if isinstance(s, CrossAttention) else s.src
            u = env[kv]
            return F(fluctuation.linear(u.c, a.d_model), fluctuation.linear(u.c_diag, a.d_model),
                     u.coherent), transfer[kv]
        if isinstance(s, Add):
            pa, pb = env[s.a], env[s.b]
            sa, sb = fluctuation.spread(pa.k), fluctuation.spread(pb.k)
            if cross is None:
                c, t = fluctuation.add(pa.c, pb.c, transfer[s.a], transfer[s.b], env["x"].c,
                                       sa, sb, s.alpha, s.beta, pa.width)
            else:  # x + o with o = lam x + xi: an add of x and xi, which are uncorrelated
                first = s.a == "x"
                o = s.b if first else s.a
                (s_x, s_o), (coef_x, coef_o) = (((sa, sb), (s.alpha, s.beta)) if first
                                                else ((sb, sa), (s.beta, s.alpha)))
                c_x = env["x"].c
                lam, s_xi, c_xi, t_xi = fluctuation.regress_on_input(
                    s_x, s_o, fluctuation.spread(cross[o][0]), c_x, env[o].c, transfer[o],
                    pa.width)
                c, t = fluctuation.add(c_x, c_xi, 1.0, t_xi, c_x, s_x, s_xi,
                                       coef_x + coef_o * lam, coef_o, pa.width)
            c_diag = fluctuation.diag_add(pa.c_diag, pb.c_diag, float(np.mean(pa.k.diag)),
                                          float(np.mean(pb.k.diag)), s.alpha, s.beta, pa.width)
            v = fluctuation.coherent_add(pa.coherent, pb.coherent, sa, sb, s.alpha, s.beta)
            return F(c, c_diag, v), t
        u = env[s.src]  # Scale
        return u.fluct or F(u.c, u.c_diag, u.coherent), transfer[s.src]

    def backward(self, env: dict, saved: dict, g_out: Blocks):
        """Gradient kernels at the block input and at the memory (None without
        cross-attention), and the squared weight-gradient norms."""
        a, b = self.arch, self.arch.batch_size
        pc = collision_prob(a)
        grads: dict[str, float] = {}
        gs = _Gradients(self.steps[-1].dst, g_out)
        push = gs.push

        for i in reversed(range(len(self.steps))):
            s = self.steps[i]
            g = gs.g.get(s.dst)
            if g is None:
                continue
            y, coef = gs.y.get(s.dst), gs.coef.get(s.dst)
            if isinstance(s, Norm):
                y_src = (None if y is None else
                         y * norm_cross_backward(env[s.src], a.norm, a.norm_eps)[:, None])
                push(s.src, norm_backward(env[s.src], env[s.dst], g, a.norm, a.norm_eps,
                                          radial=i not in self.radial_free), y_src)
                grads[f"{s.name}.scale"] = gain_grad_sq(env[s.dst], g, b, pc)
            elif isinstance(s, Linear):
                var_w, _ = self._var(s.name)
                fan_out = a.width(s.fan_out)
                push(s.src, linear_backward(g, var_w, fan_out))
                grads[s.name] = linear_grad_sq(env[s.src], g, fan_out, b, pc)
                if a.bias:
                    grads[f"{s.name}.bias"] = bias_grad_sq(g, fan_out, b)
            elif isinstance(s, Activation):
                push(s.src, g * saved[i])
            elif isinstance(s, Product):
                push(s.a, g * env[s.b].k)
                push(s.b, g * env[s.a].k)
            elif isinstance(s, (SelfAttention, CrossAttention)):
                kv_src = s.memory if isinstance(s, CrossAttention) else s.src
                d = a.d_model
                g_qkv = attention.backward(g, self._attention_mask(s), saved[i], self.heads)
                terms = attention.weight_gradient_terms(g, saved[i], b)
                for p, gp, (factor, ex) in zip("qkv", g_qkv, terms):
                    src = s.src if p == "q" else kv_src
                    name = f"{s.prefix}.{p}"
                    var_w, _ = self._var(name)
                    push(src, linear_backward(gp, var_w, d))
                    # no collision covariance here: the attention sums already carry the token
                    # collisions through the realized-Gram term (`weight_gradient_terms`, in G_q
                    # and the k, v extras), whose amplitude is matched on the data's collision
                    # fluctuation (`fluctuation.embedding`); and the projections' companions
                    # drop the colliding pair's own attention-column and logit-row correlations
                    grads[name] = factor * (linear_grad_sq(env[src], gp, d, b)
                                            + env[src].width * d * ex)
                    if a.bias:
                        grads[f"{name}.bias"] = bias_grad_sq(gp, d, b)
            elif isinstance(s, Scale):
                push(s.src, g * s.factor ** 2, _scaled(y, s.factor), _scaled(coef, s.factor))
            elif isinstance(s, Add):
                if i in self.correlated:  # the reference: Y = G, g = 1 * g_ref
                    y, coef = g, 1.0
                push(s.a, g * s.alpha ** 2, _scaled(y, s.alpha), _scaled(coef, s.alpha))
                push(s.b, g * s.beta ** 2, _scaled(y, s.beta), _scaled(coef, s.beta))
        return gs.g["x"], gs.g.get("mem"), grads


# ---- embedding and head --------------------------------------------------------------------------
def token_kernel(arch: Arch) -> Blocks:
    """E[onehot(t_i) . onehot(t_j)]: 1 on the within-sequence diagonal, p_c = sum_v p_v^2
    elsewhere; its same-token companion (`kernels`) is 1 everywhere."""
    n, pc = arch.seq_len, collision_prob(arch)
    k = Blocks.full(n, pc, pc).with_same(Blocks.full(n, 1.0, 1.0))
    np.fill_diagonal(k.w, 1.0)
    return k


def token_grad_sq(arch: Arch, g: Blocks) -> float:
    """``E||dL/dE_tok||^2`` from the gradient kernel g at the embedding sum and its same-token
    companion G_s (`Blocks.same`, which g must carry): dL/dE_v sums ``embed_scale * g_i`` over the positions i holding token v, so

        E||dL/dE||^2 = embed_scale^2 d [sum_i G(i, i) + p_c sum_{i != j} G_s(i, j)],

    the sum over all N = B n positions (`pair_sum`).  A pair of positions holds the same token
    with probability p_c, and its gradients are then more correlated than an average pair's
    (G_s > G): with Zipfian tokens (p_c 0.03 at V 1024) the colliding pairs carry most of the
    squared norm."""
    n, pc = arch.seq_len, collision_prob(arch)
    eye = Blocks(np.eye(n), np.zeros((n, n)))
    pairs = Blocks(1.0 - np.eye(n), np.ones((n, n)))
    b = arch.batch_size
    return arch.embed_scale ** 2 * arch.d_model * (pair_sum(eye, g, b)
                                                   + pc * pair_sum(pairs, g.same, b))


def position_kernels(arch: Arch) -> tuple[Blocks, Blocks]:
    """Kernel and coordinate-mean kernel of the position embeddings (shared by all sequences)."""
    n, d = arch.seq_len, arch.d_model
    if arch.positions == "sinusoidal":
        table = sinusoidal_positions(n, d)
        k, mean = table @ table.T / d, table.mean(axis=1)
        return Blocks(k, k.copy()), Blocks(np.outer(mean, mean), np.outer(mean, mean))
    if arch.positions == "learned":
        var = arch.param_init("embed.pos").std ** 2
        eye = np.eye(n) * var
        return Blocks(eye, eye.copy()), Blocks(eye / d, eye / d)
    zero = Blocks.full(n, 0.0, 0.0)
    return zero, zero


def embedding_point(arch: Arch) -> Point:
    """``x_t = embed_scale * E[token_t] + P[t]``, with the fluctuation of its realized kernel
    (`fluctuation.embedding`: the tokens', the positions' if learned, and the data's)."""
    var = arch.embed_scale ** 2 * arch.param_init("embed.tok").std ** 2
    tok = token_kernel(arch) * var
    pk, pm = position_kernels(arch)
    c, c_diag = fluctuation.embedding(token_probs(arch), var, pk.w, arch.positions == "learned",
                                      arch.d_model)
    return Point(tok + pk.with_same(), tok * (1.0 / arch.d_model) + pm.with_same(),
                 arch.d_model, fluctuation.Fluct(c, c_diag, 0.0))


def _normed(x: Point, arch: Arch) -> Point:
    """A stack-level norm (embedding norm, final norm) of `x`, carrying the fluctuation state
    by the rule of every Norm step (`fluctuation.after_norm`)."""
    y = norm_forward(x, arch.norm, arch.norm_eps)
    return Point(y.k, y.m, y.width, fluctuation.after_norm(x.c, x.c_diag, x.coherent, x.k))


def head_var(arch: Arch) -> float:
    return arch.param_init("embed.tok" if arch.tied_head else "head.out").std ** 2


def logit_gradient_kernel(arch: Arch, h: Point, method: str) -> Blocks:
    """E[(p_i - e_{y_i}) . (p_j - e_{y_j})] over the V classes (un-normalized by N).

    The logits are Gaussian with the head input's kernel, the head weights independent of the
    input.  For a tied head (the token embedding as head weights) that is an approximation:
    the input carries its own token's embedding through the residual skips, which raises that
    token's logit by about (its share of the input) x d x (embedding variance); left out.
    Measured: within noise at logit variance 1, tens of percent off at 64 and 256 (README,
    "How the theory works")."""
    v_cls = arch.vocab_size
    var_logit = head_var(arch) * h.width * h.k.diag
    rho = cosine(h.k)
    pc = collision_prob(arch)

    def block(r, same_target_prob):
        v = np.sqrt(var_logit[:, None] * var_logit[None, :])
        t1, _ = attention.softmax_moments(v_cls, v_cls, v, np.clip(r, -1.0, 1.0), method)
        return t1 - 2.0 / v_cls + same_target_prob

    within = block(rho.w, pc)
    np.fill_diagonal(within, np.diag(block(np.ones_like(rho.w), 1.0)))
    k = Blocks(within, block(rho.c, pc))
    same = rho.same  # the targets are iid whatever the inputs: P(y_i = y_j) = p_c still
    return k if same is None else k.with_same(Blocks(block(same.w, pc), block(same.c, pc)))


def head_gain_coherent_sq(arch: Arch, h: Point, method: str) -> float:
    """Coherent part of the gradient of the norm gain that feeds the head.

    The head's logit gradient depends on the head weights W, so g_h = W (p - e_y) / N is not
    independent of the head input y: by Stein's lemma ``E[g_ik | y] = s_H^2 y_ik (1 - E||p_i||^2)/N``.
    Summed over the N positions this mean adds coherently in dL/dgain_k = sum_i y_ik g_ik:
    ``||E dL/dgain||^2 = d s_H^4 / N^2 sum_ij (1 - P_i)(1 - P_j)(K_ii K_jj + 2 K_ij^2)``
    (Gaussian fourth moments of y), added to the incoherent part ``d sum_ij K_ij G_ij``.
    It matters when s_H^2 N is not small against 1 (e.g. d 256, V 512, N 128: +30%)."""
    v_cls, b, n = arch.vocab_size, arch.batch_size, arch.seq_len
    var = head_var(arch)
    p_sq, _ = attention.softmax_moments(v_cls, v_cls, var * h.width * h.k.diag, 1.0, method)
    c = 1.0 - p_sq
    cc = np.outer(c, c)
    kd = np.outer(h.k.diag, h.k.diag)
    fourth = Blocks(cc * (kd + 2 * h.k.w ** 2), cc * (kd + 2 * h.k.c ** 2))
    ones = Blocks.full(n, 1.0, 1.0)
    return h.width * var ** 2 / (b * n) ** 2 * pair_sum(fourth, ones, b)


@functools.lru_cache(maxsize=8)
def _off_diagonal(n: int) -> np.ndarray:
    """Flat indices of the off-diagonal entries of an n x n matrix, in row-major order."""
    return np.flatnonzero(~np.eye(n, dtype=bool))


def stream_stats(p: Point) -> tuple[float, float, float]:
    n = p.k.w.shape[0]
    cos = cosine(p.k.main)
    off = _off_diagonal(n)  # x.mean() is add.reduce(x) / x.size: the same values, less overhead
    within = float(np.add.reduce(cos.w.take(off)) / off.size) if n > 1 else float("nan")
    return (float(np.add.reduce(p.k.diag) / n), within,
            float(np.add.reduce(cos.c, axis=None) / cos.c.size))


# ---- the interpreter -----------------------------------------------------------------------------
class _StackRun:
    """One stack's forward pass: its blocks, block inputs, saved block states (when they fit in
    `STORE_LIMIT_BYTES`), stream statistics, last block output and the (final-normed) output."""

    def __init__(self, arch: Arch, stack: Stack, masks: dict, method: str, memory: Point | None):
        n = arch.seq_len
        self.stack, self.memory = stack, memory
        self.blocks = [_Block(arch, block(arch, l, stack), masks, method, stack)
                       for l in range(stack.depth)]
        # per step: K and M, each 4 n x n blocks (the companion included) of 8 bytes
        self.store = stack.depth * len(self.blocks[0].steps) * 8 * n * n * 8 < STORE_LIMIT_BYTES
        x = self.embedded = embedding_point(arch)
        if arch.embed_norm:
            x = _normed(x, arch)
        self.embed_out = x
        self.inputs, self.kept, self.stats = [], [], [stream_stats(x)]
        where = "" if stack.role == "single" else f" of the {stack.role}"
        for l, blk in enumerate(self.blocks):
            self.inputs.append(x)
            with _located(f"block {l}{where}"):
                env, saved = blk.forward(x, memory)
            self.kept.append((env, saved) if self.store else None)
            x = env[blk.steps[-1].dst]
            if not np.isfinite(x.k.a).all():
                raise FloatingPointError(f"the theory diverged: the kernel at the output of "
                                         f"block {l}{where} is not finite ({arch!r})")
            self.stats.append(stream_stats(x))
        self.stream = x
        self.out = _normed(x, arch) if arch.has_final_norm else x

    def backward(self, arch: Arch, g: Blocks, grads_sq: dict) -> tuple[Blocks, Blocks | None]:
        """Backward from the gradient kernel `g` at `out`: fills `grads_sq` with the stack's
        (prefixed) per-layer, final-norm and embedding-norm entries; returns the gradient
        kernels at the embedding sum (before the embedding norm, if any) and at the memory
        (summed over the blocks)."""
        b, pre, pc = arch.batch_size, self.stack.prefix, collision_prob(arch)
        if arch.has_final_norm:
            grads_sq[pre + "final_norm.scale"] = np.array([gain_grad_sq(self.out, g, b, pc)])
            g = norm_backward(self.stream, self.out, g, arch.norm, arch.norm_eps)
        per_layer: list[dict] = [None] * self.stack.depth
        g_mem = None
        for l in reversed(range(self.stack.depth)):
            blk = self.blocks[l]
            env, saved = self.kept[l] if self.store else blk.forward(self.inputs[l], self.memory)
            g, g_m, per_layer[l] = blk.backward(env, saved, g)
            if g_m is not None:
                g_mem = g_m if g_mem is None else g_mem + g_m
        for name in per_layer[0]:
            grads_sq[pre + name] = np.array([layer[name] for layer in per_layer])
        if arch.embed_norm:
            grads_sq[pre + "embed_norm.scale"] = np.array([gain_grad_sq(self.embed_out, g, b, pc)])
            g = norm_backward(self.embedded, self.embed_out, g, arch.norm, arch.norm_eps)
        return g, g_mem


@contextlib.contextmanager
def _located(where: str):
    """Prefix a ValueError raised inside with where it arose (a logit variance beyond the
    analytic softmax moments' range, `softmax.V_MAX`, comes from the architecture and its
    init, deep in the network)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _head_gain(arch: Arch, run: _StackRun) -> str | None:
    """The norm gain whose output feeds the head (final norm, or the last block's last norm)."""
    if arch.has_final_norm:
        return run.stack.prefix + "final_norm.scale"
    last = run.blocks[-1].steps[-1]
    return run.stack.prefix + f"{last.name}.scale" if isinstance(last, Norm) else None


def _gc_paused(fn):
    """Run `fn` with the cyclic garbage collector paused: a deep prediction keeps hundreds of
    thousands of small kernel objects alive until it returns, and the collector's repeated
    full passes over them cost 10-20% of the run (reference counting frees everything else)."""
    @functools.wraps(fn)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return paused


@_gc_paused
def predict(arch: Arch, method: str = "analytic") -> GradProfile:
    """Mean-field prediction of ``sqrt(E||dL/dW||_F^2)`` for every parameter of `arch`, and of
    the residual-stream statistics at every block output (see `GradProfile`).

    An encoder-decoder (``arch.decoder_depth > 0``) runs the encoder, then the decoder with the
    encoder output as the memory of its cross-attentions; backward, the memory's gradient
    kernel is the sum of the cross-attention key and value paths of every decoder block (each
    through its own independent W_k, W_v, so the cross terms vanish at this order).

    method: ``"analytic"`` (closed-form softmax moments, the default) or ``"mc"`` (fixed-sample
    Monte-Carlo softmax moments, the reference the closed form is validated against).

    Raises ValueError for a bad `arch` or `method`, or, naming the block or the output head,
    where a logit variance leaves the analytic softmax moments' range (`softmax.V_MAX` = 30;
    e.g. a head tied to unit-variance embeddings has logit variance ~d_model; ``method="mc"``
    has no limit).  Raises FloatingPointError naming the block or the parameter where the
    kernels or gradient norms stop being finite, so a NaN is never returned.  Seen in a
    NormFormer with a gated FFN at d_model 4 and two tokens per sequence, where the same-token
    companion's approximations, made for long sequences, blow up.
    """
    if not isinstance(arch, Arch):
        raise ValueError(f"invalid arch={arch!r}: expected a normfield.Arch")
    if method not in METHODS:
        raise ValueError(f"invalid method={method!r}: expected one of {METHODS}")
    start = time.perf_counter()
    n, b = arch.seq_len, arch.batch_size
    masks = {kind: attention.Mask.build(kind, n) for kind in MASKS}
    runs, memory = [], None
    for stack in stacks(arch):
        runs.append(_StackRun(arch, stack, masks, method, memory))
        memory = runs[-1].out

    grads_sq: dict[str, np.ndarray] = {}
    h = runs[-1].out
    big_n = b * n
    with _located("the output head"):
        dk = logit_gradient_kernel(arch, h, method)
    g = dk * (head_var(arch) / big_n ** 2)
    head_sq = h.width * pair_sum(h.k, dk, b, collision_prob(arch)) / big_n ** 2
    for i in reversed(range(len(runs))):
        g_embed, g = runs[i].backward(arch, g, grads_sq)
        pre = runs[i].stack.prefix
        tied = arch.tied_head and i == len(runs) - 1
        tok_sq = token_grad_sq(arch, g_embed)
        grads_sq[pre + "embed.tok"] = np.array([tok_sq + (head_sq if tied else 0.0)])
        if arch.positions == "learned":
            eye = Blocks(np.eye(n), np.eye(n))
            grads_sq[pre + "embed.pos"] = np.array([arch.d_model * pair_sum(eye, g_embed, b)])
    head_gain = _head_gain(arch, runs[-1])
    if head_gain:
        grads_sq[head_gain][-1] += head_gain_coherent_sq(arch, h, method)
    if not arch.tied_head:
        grads_sq["head.out"] = np.array([head_sq])

    activations = {}
    for run in runs:
        acts = np.array(run.stats)
        pre = run.stack.prefix
        activations.update({pre + "sq_norm": acts[:, 0], pre + "cos_within": acts[:, 1],
                            pre + "cos_across": acts[:, 2] if b > 1
                            else np.full(run.stack.depth + 1, np.nan)})
    for name, sq in grads_sq.items():
        if not np.isfinite(sq).all():
            layer = int(np.flatnonzero(~np.isfinite(sq))[0])
            raise FloatingPointError(f"the theory diverged: the squared gradient norm of "
                                     f"{name!r} (layer {layer}) is {sq[layer]} ({arch!r})")
    meta = {"method": method, "seconds": time.perf_counter() - start}
    return GradProfile(arch=arch, source="theory",
                       grads={k: np.sqrt(np.maximum(v, 0.0)) for k, v in grads_sq.items()},
                       activations=activations, meta=meta)


def predict_grad_norms(depth: int, placement: str = "pre", method: str = "analytic",
                       **arch_fields) -> GradProfile:
    """``predict(Arch(depth=depth, placement=placement, **arch_fields))``."""
    return predict(Arch(depth=depth, placement=placement, **arch_fields), method=method)


def predict_activations(depth: int, placement: str = "pre", **arch_fields) -> dict:
    """Predicted residual-stream statistics per block output 0..depth: ``sq_norm`` (E||x||^2/d),
    ``cos_within`` and ``cos_across`` (mean cosine between distinct tokens of one sequence / of
    two sequences)."""
    return predict_grad_norms(depth, placement, **arch_fields).activations
