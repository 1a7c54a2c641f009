"""Measure per-layer weight-gradient norms of an `Arch` on many random seeds at once.

Each seed draws its own parameters, tokens and targets.  All seeds of a chunk run in one
``jit(vmap(...))``; squared Frobenius norms are reduced on device, so only (seeds, depth)
arrays come back.  With several local devices the seed axis is sharded over them
(``jax.sharding``); on CPU this can be tried with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import contextlib
import platform
import time
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from normfield.arch import check_choice, check_int
from normfield.data import token_arrays, token_probs
from normfield.probe.model import PRECISIONS, REMAT_POLICIES, loss_fn, init_params
from normfield.profile import (ACTIVATION_KEYS, GradProfile, control_covariates,
                               resolution_warning, seed_moments)

MATMUL_PRECISION = {"float32": "highest", "tf32": "tensorfloat32", "bfloat16": "default",
                    "float64": "highest"}


class NonFiniteGradientError(ArithmeticError):
    """A measured gradient norm is NaN or infinite."""


class PrecisionWarning(UserWarning):
    """A measurement below float64 whose tokens collapsed past float32's resolution
    (`profile.resolution_warning`)."""


def sample_batch(arch, key):
    """Tokens and targets (batch, seq), iid from `token_probs(arch)`; for an encoder-decoder
    the tokens are the pair (source, decoder input), also iid."""
    k_tok, k_tgt = jax.random.split(key)
    logits = jnp.log(jnp.asarray(token_probs(arch), jnp.float32))
    shape = (arch.batch_size, arch.seq_len)
    if arch.tokens == "uniform":
        # int32 also in 64-bit mode (float64 measurements draw the float32 ones' tokens)
        draw = lambda k: jax.random.randint(k, shape, 0, arch.vocab_size, jnp.int32)
    else:
        draw = lambda k: jax.random.categorical(k, logits, shape=shape)
    if arch.decoder_depth:
        k_src, k_tok = jax.random.split(k_tok)
        return (draw(k_src), draw(k_tok)), draw(k_tgt)
    return draw(k_tok), draw(k_tgt)


def _equal_pairs(tokens):
    """Ordered pairs (i, j) of positions of a 1-d token array with equal tokens, i = j
    included: ``sum_i #{j: t_j = t_i}``, each count read off the sorted array (O(n log n)
    time, O(n) memory whatever the vocabulary)."""
    ordered = jnp.sort(tokens)
    counts = (jnp.searchsorted(ordered, tokens, side="right")
              - jnp.searchsorted(ordered, tokens, side="left"))
    return jnp.sum(counts)


def collisions(arch, tokens, targets) -> dict:
    """The batch's token collision counts, per token array (`data.token_arrays`): ordered
    pairs of distinct positions holding the same token within one sequence (``.within``) and
    in different sequences (``.across``), counted on device (int32: exact up to 46,340
    positions per batch); their exact expectations are `data.expected_collisions`."""
    arrays = (*tokens, targets) if arch.decoder_depth else (tokens, targets)
    out = {}
    for name, batch in zip(token_arrays(arch), arrays):
        within = jnp.sum(jax.vmap(_equal_pairs)(batch)) - batch.size
        total = _equal_pairs(batch.reshape(-1)) - batch.size
        out[name + ".within"], out[name + ".across"] = within, total - within
    return out


def _squared_norms(grads) -> dict:
    """Per-layer squared norms of each stack's stacked parameters (names with the stack
    prefix), and the squared norms of the global parameters (length-1 arrays)."""
    out = {}
    for key, g in grads.items():
        if key.endswith("layers"):
            prefix = key[: -len("layers")]
            out.update({prefix + n: jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1)
                        for n, v in g.items()})
        else:
            out[key] = jnp.sum(g * g)[None]
    return out


def one_seed(arch, precision, key, remat=False, unroll=False):
    """Per-parameter squared gradient norms, stream statistics and the batch's token
    collision counts (`collisions`) for one seed (`unroll`: the layers as a Python loop
    instead of one `lax.scan`; same numbers, compile time grows with depth)."""
    k_param, k_data = jax.random.split(key)
    params = init_params(arch, k_param, jnp.float64 if precision == "float64" else jnp.float32)
    tokens, targets = sample_batch(arch, k_data)
    loss = partial(loss_fn, arch, precision=precision, remat=remat, unroll=unroll)
    grads, stats = jax.grad(loss, has_aux=True)(params, tokens, targets)
    return _squared_norms(grads), stats, collisions(arch, tokens, targets)


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("remat", "unroll"))
def _run_chunk(arch, precision, keys, remat=False, unroll=False):
    """All seeds of a chunk in one compiled call (parameters and data are created on device
    from the keys, so nothing but the keys goes in and only (seeds, depth) arrays come out)."""
    return jax.vmap(partial(one_seed, arch, precision, remat=remat, unroll=unroll))(keys)


def _shard(keys):
    devices = jax.local_devices()
    if len(devices) > 1 and keys.shape[0] % len(devices) == 0:
        mesh = Mesh(np.asarray(devices), ("seeds",))
        return jax.device_put(keys, NamedSharding(mesh, PartitionSpec("seeds")))
    return keys


def _x64_mode():
    """JAX's 64-bit mode as a context manager: ``jax.enable_x64(True)``, or on JAX versions
    without it (0.4.x) ``jax.experimental.enable_x64()``."""
    mode = getattr(jax, "enable_x64", None)
    if mode is None:
        from jax.experimental import enable_x64
        return enable_x64()
    return mode(True)


def _dispatch(arch, seeds, key, precision, chunk, options, device=None) -> list:
    """Dispatch every chunk of seeds (asynchronously; nothing is fetched): on `device`, or with
    the seed axis sharded over all local devices when `device` is None.  `options`: the
    compiled chunk's ``remat`` and ``unroll`` flags."""
    keys = jax.random.split(jax.random.PRNGKey(key), seeds)
    place = _shard if device is None else (lambda k: jax.device_put(k, device))
    # float64 needs JAX's 64-bit mode while it traces and runs; other precisions leave the
    # caller's setting alone
    x64 = _x64_mode() if precision == "float64" else contextlib.nullcontext()
    with x64, jax.default_matmul_precision(MATMUL_PRECISION[precision]):
        return [_run_chunk(arch, precision, place(keys[lo:lo + chunk]), **options)
                for lo in range(0, seeds, chunk)]


def _check_args(seeds, key, precision, chunk, remat) -> int:
    check_int("seeds", seeds, 1)
    check_int("key", key, 0)
    check_choice("precision", precision, PRECISIONS)
    choices = (False, *REMAT_POLICIES)
    if not isinstance(remat, (bool, str)) or remat not in choices:  # 1 is not True here
        raise ValueError(f"invalid remat={remat!r}: expected one of "
                         + ", ".join(repr(c) for c in choices))
    chunk = seeds if chunk is None else chunk
    check_int("chunk", chunk, 1)
    return chunk


def measure_grad_norms(arch, seeds: int = 16, key: int = 0, precision: str = "float32",
                       chunk: int | None = None, remat: bool | str = False,
                       unroll: bool = False) -> GradProfile:
    """Measure ``sqrt(mean_seeds ||dL/dW||_F^2)`` for every parameter of `arch`.

    The mean over seeds is the control-variate estimate on the token collisions each seed's
    batch drew (`collisions`, whose expectations are exact; `profile.seed_moments`) when there
    are at least 10 seeds per fitted coefficient (30 seeds for a decoder-only or encoder
    model, 40 for an encoder-decoder), else the plain mean: ``meta["estimator"]`` names it,
    ``per_seed_sq`` keeps the raw squared norms.

    Args:
      seeds: number of independent initializations (each with its own data).
      key: integer seed of the whole measurement (same key, same numbers).
      precision: ``"float32"`` (full-precision matmuls), ``"tf32"``, ``"bfloat16"``
        (bf16 operands, float32 accumulation) or ``"float64"`` (the float32 mode's weights
        and data, every operation in float64, under JAX's 64-bit mode: for collapsed tokens
        whose 1 - cosine nears float32's resolution, e.g. deep Post-LN).
      chunk: seeds per compiled call (default: all at once); lower it to save memory.
      remat: rematerialize each block in the backward pass (`jax.checkpoint`) to fit larger
        configurations (True: keep only the block inputs; ``"weight_products"``: keep the
        x @ W products too, recompute norms, activations and the attention's logits and
        probabilities: on an H200 at the GPT-2-small shape 9.6% less time per TF32 call, 4.2%
        per bf16 call, 1% more per float32 call, benchmarks/README.md); same numbers up to
        float rounding.
      unroll: run the layers as a Python loop instead of one `lax.scan`: same numbers up to
        float rounding, 6-24% less time per call at the GPT-2-small shape on an H200, but the
        first call (compile and autotuning) took 106-113 s instead of 14-48 s at depth 12
        and grows with depth (benchmarks/README.md): worth it for many calls of one shape.
    Raises:
      ValueError on bad arguments; NonFiniteGradientError naming the parameter and seed when
      a gradient is NaN or infinite (never averaged away).
    """
    chunk = _check_args(seeds, key, precision, chunk, remat)
    start = time.perf_counter()
    # every chunk is dispatched before any result is fetched: no host round trip in between
    options = {"remat": remat, "unroll": unroll}
    parts = jax.device_get(_dispatch(arch, seeds, key, precision, chunk, options))
    return _profile(arch, parts, seeds, key, precision, options, time.perf_counter() - start)


def measure_sweep(archs, seeds: int = 16, key: int = 0, precision: str = "float32",
                  chunk: int | None = None, remat: bool | str = False, unroll: bool = False):
    """`measure_grad_norms` of every Arch of `archs`, yielded in order, with the configuration
    axis spread over the local devices: configurations go out in waves of one per device
    (each pinned to its device, all of a wave dispatched before any result is fetched), so
    that N devices measure N configurations at once.  Same numbers as `measure_grad_norms`
    (up to float rounding); the metadata names the device (``sweep_device``) and the seconds
    from the wave's dispatch to this result.  Bad arguments raise ValueError at the call, not at
    the first result."""
    chunk = _check_args(seeds, key, precision, chunk, remat)
    return _sweep(list(archs), seeds, key, precision, chunk, {"remat": remat, "unroll": unroll})


def _sweep(archs, seeds, key, precision, chunk, options):
    devices = jax.local_devices()
    for lo in range(0, len(archs), len(devices)):
        wave = list(zip(archs[lo:lo + len(devices)], devices))
        start = time.perf_counter()
        pending = [_dispatch(a, seeds, key, precision, chunk, options, dev) for a, dev in wave]
        for (arch, dev), parts in zip(wave, pending):
            profile = _profile(arch, jax.device_get(parts), seeds, key, precision, options,
                               time.perf_counter() - start)
            profile.meta["sweep_device"] = str(dev)
            yield profile


def _profile(arch, parts, seeds, key, precision, options, elapsed) -> GradProfile:
    """The GradProfile of fetched chunk results; NonFiniteGradientError on NaN or inf."""
    sq_parts, stat_parts, coll_parts = zip(*parts)
    per_seed = {n: np.concatenate([p[n] for p in sq_parts]).astype(np.float64) for n in sq_parts[0]}
    coll = {n: np.concatenate([p[n] for p in coll_parts]).astype(np.float64) for n in coll_parts[0]}
    stats = {prefix: np.concatenate([p[prefix] for p in stat_parts]).astype(np.float64)
             for prefix in stat_parts[0]}  # stack prefix -> (seeds, depth + 1, 3)
    for name, values in per_seed.items():
        bad = np.argwhere(~np.isfinite(values))
        if bad.size:
            seed, layer = bad[0]
            raise NonFiniteGradientError(
                f"non-finite gradient norm of {name!r} (layer {layer}) at seed {seed} "
                f"of key={key}; {len(bad)} entries affected")
    grads, stderr, estimator = seed_moments(per_seed, control_covariates(arch, coll))
    acts, acts_se = {}, {}
    for prefix, st in stats.items():
        for i, k in enumerate(ACTIVATION_KEYS):
            values = st[:, :, i]
            acts[prefix + k] = values.mean(axis=0)
            acts_se[prefix + k] = (values.std(axis=0, ddof=1) / np.sqrt(seeds) if seeds > 1
                                   else np.full(values.shape[1], np.nan))
        if arch.batch_size == 1:
            acts[prefix + "cos_across"] = np.full(st.shape[1], np.nan)
    warning = resolution_warning(acts, precision)
    if warning:
        warnings.warn(warning, PrecisionWarning, stacklevel=3)
    meta = {"seeds": seeds, "key": key, "precision": precision, "estimator": estimator, **options,
            "jax_version": jax.__version__,
            "device": str(jax.devices()[0].device_kind), "n_devices": jax.local_device_count(),
            "platform": platform.platform(), "seconds": elapsed,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"precision_warning": warning} if warning else {})}
    return GradProfile(arch=arch, source="probe", grads=grads, stderr=stderr, per_seed_sq=per_seed,
                       per_seed_collisions=coll, activations=acts, activations_stderr=acts_se,
                       meta=meta)
