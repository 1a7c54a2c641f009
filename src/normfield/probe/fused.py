"""Fused attention (`jax.nn.dot_product_attention`) under the probe's `vmap` over seeds.

The probe maps each seed's computation over the seed axis with `jax.vmap`.  Batching the fused
cuDNN attention call through JAX's own rules gave gradient norms off by up to 11x per seed on an
H200 with JAX 0.11.2 (benchmarks/README.md; the batching rules of the cuDNN attention fold every
leading axis into one batch and mishandle a mapped axis, jax-ml/jax issues 38495 and 36702).
Here the seed axis never reaches that call: a `jax.custom_batching.custom_vmap` rule folds it
into the batch axis, both for the forward call and for its vector-Jacobian product (a
`jax.custom_vjp` whose backward is itself a folded `jax.vjp` of the unbatched call), so the
fused kernel only ever sees plain (batch, seq, heads, head_dim) arrays.

``implementation="cudnn"`` needs a GPU and bf16 / fp16 operands; ``"xla"`` runs anywhere and is
what the CPU tests use to check the folding against the unfused attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def _fold(x, batched: bool, axis_size: int):
    """(axis, batch, ...) -> (axis * batch, ...); an unbatched argument is broadcast first."""
    if not batched:
        x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    return x.reshape((axis_size * x.shape[1],) + x.shape[2:])


def _unfold(x, axis_size: int):
    return x.reshape((axis_size, x.shape[0] // axis_size) + x.shape[1:])


@functools.lru_cache(maxsize=None)
def fused_attention(implementation: str, causal: bool):
    """``softmax(q k^T / sqrt(head_dim)) v`` of (batch, seq, heads, head_dim) arrays through
    `jax.nn.dot_product_attention`, differentiable and batchable with the mapped axis folded into
    the batch (module docstring)."""

    def core(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                            implementation=implementation)

    def core_vjp(q, k, v, g):
        return jax.vjp(core, q, k, v)[1](g)

    forward = jax.custom_batching.custom_vmap(core)
    backward = jax.custom_batching.custom_vmap(core_vjp)

    @forward.def_vmap
    def _forward_rule(axis_size, in_batched, q, k, v):
        args = [_fold(x, b, axis_size) for x, b in zip((q, k, v), in_batched)]
        return _unfold(forward(*args), axis_size), True

    @backward.def_vmap
    def _backward_rule(axis_size, in_batched, q, k, v, g):
        args = [_fold(x, b, axis_size) for x, b in zip((q, k, v, g), in_batched)]
        return tuple(_unfold(d, axis_size) for d in backward(*args)), (True, True, True)

    attention = jax.custom_vjp(forward)
    attention.defvjp(lambda q, k, v: (forward(q, k, v), (q, k, v)),
                     lambda saved, g: backward(*saved, g))
    return attention
