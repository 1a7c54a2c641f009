"""The probe's batching machinery: scan vs unrolled layers, vmap over seeds vs a loop, determinism,
a sharded seed axis, batch averaging, standard errors, and non-finite gradients.

One small Arch is used throughout so that XLA compiles each function once.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normfield.arch import Arch, Init
from normfield.probe import measure
from normfield.probe.measure import NonFiniteGradientError, measure_grad_norms, one_seed
from normfield.profile import GradProfile, pool_seed_blocks
from normfield.probe.model import init_params, loss_fn

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
# Mix-LN with one Post-LN block then two Pre-LN blocks: two scan segments, the first of length 1
ARCH_KW = dict(depth=3, placement="mixln", placement_options=(("post_fraction", 0.5),),
               d_model=8, n_heads=2, d_ff=16, seq_len=5, batch_size=2, vocab_size=11,
               activation="gelu", mask="causal", bias=True)
ARCH = Arch(**ARCH_KW)
SEEDS, KEY = 8, 3


@functools.lru_cache(maxsize=None)
def measured(key=KEY):
    return measure_grad_norms(ARCH, seeds=SEEDS, key=key)


@functools.lru_cache(maxsize=None)
def grads_three_ways():
    """Grads of one batch by scan, by the unrolled loop, and per sequence (batch of 1)."""
    # numpy draws in init_params' layout (compiling init_params costs more than the whole test)
    rng = np.random.default_rng(0)
    abstract = jax.eval_shape(lambda k: init_params(ARCH, k), jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.4 * rng.standard_normal(a.shape), jnp.float32), abstract)
    params = jax.tree_util.tree_map_with_path(  # norm gains around 1
        lambda path, a: a + 1.0 if jax.tree_util.keystr(path).endswith(".scale']") else a, params)
    tokens = jnp.asarray(rng.integers(0, ARCH.vocab_size, (2, ARCH.seq_len)))
    targets = jnp.asarray(rng.integers(0, ARCH.vocab_size, (2, ARCH.seq_len)))

    def lossgrad(p, t, y, unroll=False):
        return jax.value_and_grad(lambda q: loss_fn(ARCH, q, t, y, unroll=unroll)[0])(p)

    @jax.jit
    def run(p, t, y):
        scan = lossgrad(p, t, y)
        unrolled = lossgrad(p, t, y, unroll=True)
        per_seq = jax.vmap(lambda ti, yi: lossgrad(p, ti[None], yi[None]))(t, y)
        return scan, unrolled, per_seq

    with jax.default_matmul_precision("highest"):
        out = run(params, tokens, targets)
    return jax.tree_util.tree_map(np.asarray, out)


# d loss / d b_k is exactly zero (softmax is invariant to adding q.b_k to every key's logit)
ZERO_GRAD = ("attn.k.bias",)


def _sq_close(name, got, want, ref_sq):
    """Squared norms equal to float32 rounding; the exactly-zero key-bias gradient is float32
    noise, compared against the scale of the query gradient instead."""
    atol = 1e-8 * np.max(ref_sq["attn.q"]) if name in ZERO_GRAD else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)


def _leaves(tree):
    return [(jax.tree_util.keystr(path), a) for path, a in jax.tree_util.tree_leaves_with_path(tree)
            if not any(f"'{z}'" in jax.tree_util.keystr(path) for z in ZERO_GRAD)]


def test_key_bias_gradient_is_zero():
    (_, grads), _, _ = grads_three_ways()
    scale = np.max(np.abs(grads["layers"]["attn.q"]))
    assert np.max(np.abs(grads["layers"]["attn.k.bias"])) < 1e-5 * scale


def test_scan_equals_unrolled_loop():
    (l_scan, g_scan), (l_unr, g_unr), _ = grads_three_ways()
    assert l_scan == pytest.approx(l_unr, rel=1e-6)
    for (path, a), (_, b) in zip(_leaves(g_scan), _leaves(g_unr)):
        assert np.any(a != 0), path
        # float32: differences of a few ulps of the largest entry (reassociated sums)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6 * np.max(np.abs(a)), err_msg=path)


def test_batch_gradient_is_mean_of_per_sequence_gradients():
    """Mean cross-entropy over batch*seq positions: the batch's loss and gradient are the means
    of the single-sequence ones (same params), not their sums."""
    (loss, grads), _, (seq_losses, seq_grads) = grads_three_ways()
    assert seq_losses.shape == (2,)
    assert loss == pytest.approx(seq_losses.mean(), rel=1e-6)
    for (path, g), (_, gs) in zip(_leaves(grads), _leaves(seq_grads)):
        np.testing.assert_allclose(g, gs.mean(axis=0), rtol=1e-5, atol=5e-6 * np.max(np.abs(g)),
                                   err_msg=path)
        # and not their sum: the two sequences' grads differ, so mean != sum
        assert not np.allclose(g, gs.sum(axis=0), rtol=1e-3), path


def test_vmap_over_seeds_equals_loop_over_one_seed():
    prof = measured()
    keys = jax.random.split(jax.random.PRNGKey(KEY), SEEDS)
    single = jax.jit(functools.partial(one_seed, ARCH, "float32"))
    with jax.default_matmul_precision("highest"):
        loop = [jax.tree_util.tree_map(np.asarray, single(k)) for k in keys]
    assert set(prof.per_seed_sq) == set(loop[0][0])
    for name, values in prof.per_seed_sq.items():
        expect = np.stack([sq[name] for sq, _, _ in loop])
        assert values.shape == expect.shape == (SEEDS, ARCH.depth if expect.shape[1] > 1 else 1)
        _sq_close(name, values, expect, prof.per_seed_sq)
        if name not in ZERO_GRAD:
            np.testing.assert_allclose(prof.grads[name], np.sqrt(expect.mean(axis=0)), rtol=1e-5)
    for name, values in prof.per_seed_collisions.items():
        np.testing.assert_array_equal(values, [c[name] for _, _, c in loop])
    stats = np.stack([st[""] for _, st, _ in loop])  # (seeds, depth + 1, 3)
    np.testing.assert_allclose(prof.activations["sq_norm"], stats[:, :, 0].mean(0), rtol=1e-5)
    np.testing.assert_allclose(prof.activations["cos_within"], stats[:, :, 1].mean(0),
                               rtol=1e-4, atol=1e-6)


def test_same_key_is_bit_identical_and_other_key_differs():
    a = measured()
    b = measure_grad_norms(ARCH, seeds=SEEDS, key=KEY)
    assert a is not b
    for name in a.per_seed_sq:
        np.testing.assert_array_equal(a.per_seed_sq[name], b.per_seed_sq[name])
        np.testing.assert_array_equal(a.grads[name], b.grads[name])
    for k in a.activations:
        np.testing.assert_array_equal(a.activations[k], b.activations[k])
    c = measured(KEY + 1)
    for name in a.per_seed_sq:
        assert not np.any(a.per_seed_sq[name] == c.per_seed_sq[name]), name
    # distinct seeds within one measurement are distinct draws too
    sq = a.per_seed_sq["attn.q"]
    assert len(np.unique(sq[:, 0])) == SEEDS


def test_collapsed_tokens_warn_below_float64():
    """Post-LN at depth 24, d 32 collapses its tokens (the theory predicts 1 - cosine 6.5e-7 at
    the last stream point, below `FLOAT32_COSINE_FLOOR`): the float32 measurement warns, naming
    the statistic and the point, and keeps the warning in its metadata (a pooled measurement
    too); the float64 one and Pre-LN (1 - cosine above 0.1) do not warn."""
    shape = dict(depth=24, d_model=32, n_heads=2, d_ff=64, seq_len=8, batch_size=2,
                 vocab_size=64)
    post = Arch(placement="post", **shape)
    warned = r"1 - cos_within is .* at stream point 2[34]"
    with pytest.warns(measure.PrecisionWarning, match=warned):
        collapsed = measure_grad_norms(post, seeds=2)
    assert "precision='float64'" in collapsed.meta["precision_warning"]
    with pytest.warns(measure.PrecisionWarning):
        other = measure_grad_norms(post, seeds=2, key=1)
    assert "stream point" in pool_seed_blocks([collapsed, other]).meta["precision_warning"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", measure.PrecisionWarning)
        exact = measure_grad_norms(post, seeds=2, precision="float64")
        measure_grad_norms(Arch(placement="pre", **shape), seeds=2)
    assert "precision_warning" not in exact.meta
    assert 1.0 - exact.activations["cos_within"][-1] < 1e-5


def test_float64_measures_the_float32_draws_in_float64():
    """Same key: the float64 mode's seeds are the float32 mode's weights and tokens (equal
    collision counts; squared norms within float32 rounding, ~1e-6 relative here), computed in
    float64 (not bitwise equal), and the mode leaves JAX's 64-bit setting as it found it."""
    a = measured()
    b = measure_grad_norms(ARCH, seeds=SEEDS, key=KEY, precision="float64")
    assert b.meta["precision"] == "float64" and not jax.config.jax_enable_x64
    for name in a.per_seed_collisions:
        np.testing.assert_array_equal(a.per_seed_collisions[name], b.per_seed_collisions[name])
    for name in a.per_seed_sq:
        _sq_close(name, b.per_seed_sq[name], a.per_seed_sq[name], a.per_seed_sq)
    assert any(np.any(a.per_seed_sq[n] != b.per_seed_sq[n]) for n in a.per_seed_sq)


def test_grads_and_stderr_follow_from_per_seed_squares():
    prof = measured()
    assert prof.meta["seeds"] == SEEDS and prof.meta["key"] == KEY
    # 8 seeds are too few for control variates on 2 collision counts (`seed_moments`: 30)
    assert prof.meta["estimator"] == "mean"
    for name, sq in prof.per_seed_sq.items():
        n = sq.shape[0]
        mean = sq.sum(axis=0) / n
        sd = np.sqrt(((sq - mean) ** 2).sum(axis=0) / (n - 1))
        # delta method: se(sqrt(m)) = se(m) / (2 sqrt(m))
        np.testing.assert_allclose(prof.grads[name], np.sqrt(mean), rtol=1e-12)
        np.testing.assert_allclose(prof.stderr[name], sd / np.sqrt(n) / (2 * np.sqrt(mean)),
                                   rtol=1e-10)
        assert np.all(prof.stderr[name] > 0)
        assert np.all(prof.stderr[name] < prof.grads[name])


def _inject(monkeypatch, name, seed, layer, value):
    real = measure._run_chunk

    def fake(arch, precision, keys, **kw):
        sq, stats, coll = real(arch, precision, keys, **kw)
        sq = dict(sq)
        sq[name] = sq[name].at[seed, layer].set(value)
        return sq, stats, coll

    monkeypatch.setattr(measure, "_run_chunk", fake)


@pytest.mark.parametrize("name,seed,layer,value", [("attn.v", 3, 1, np.nan),
                                                   ("embed.tok", 5, 0, np.inf)])
def test_non_finite_gradient_names_parameter_and_seed(monkeypatch, name, seed, layer, value):
    measured()  # compile outside the patch
    _inject(monkeypatch, name, seed, layer, value)
    with pytest.raises(NonFiniteGradientError) as info:
        measure_grad_norms(ARCH, seeds=SEEDS, key=KEY)
    msg = str(info.value)
    assert repr(name) in msg and f"seed {seed}" in msg and f"layer {layer}" in msg, msg


@pytest.mark.slow
def test_overflowing_init_raises_non_finite_error():
    """A real overflow (float32 weights of std 1e30): the error surfaces, never averaged away."""
    arch = Arch(depth=1, placement="post", d_model=8, n_heads=2, d_ff=16, seq_len=4,
                batch_size=2, vocab_size=11, init=Init(scheme="normal", std=1e30))
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient norm of '[\w.]+'.* seed \d"):
        measure_grad_norms(arch, seeds=2)


SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from normfield.arch import Arch
    from normfield.probe.measure import _shard, measure_grad_norms, measure_sweep
    kw = json.loads(sys.argv[1])
    kw["placement_options"] = tuple(tuple(p) for p in kw["placement_options"])
    prof = measure_grad_norms(Arch(**kw), seeds=int(sys.argv[2]), key=int(sys.argv[3]))
    keys = _shard(jax.random.split(jax.random.PRNGKey(0), int(sys.argv[2])))
    # the configuration axis: the same Arch twice and a second Arch, one device each
    other = Arch(**dict(kw, mask="bidirectional"))
    sweep = list(measure_sweep([Arch(**kw), other, Arch(**kw)], seeds=int(sys.argv[2]),
                               key=int(sys.argv[3])))
    print(json.dumps({"n_devices": prof.meta["n_devices"],
                      "key_devices": len(keys.sharding.device_set),
                      "per_seed_sq": {k: v.tolist() for k, v in prof.per_seed_sq.items()},
                      "activations": {k: v.tolist() for k, v in prof.activations.items()},
                      "sweep_devices": [p.meta["sweep_device"] for p in sweep],
                      "sweep_sq": [{k: v.tolist() for k, v in p.per_seed_sq.items()}
                                   for p in sweep]}))
""")


SHARDED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def sharded_subprocess():
    """Start the 4-device measurement at the module's first test, so that it runs while this
    process compiles (XLA's CPU compiler is mostly single-threaded); killed if still running."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(),
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", SHARD_SCRIPT, json.dumps(ARCH_KW), str(SEEDS),
                             str(KEY)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    SHARDED["proc"] = proc
    yield
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_sharded_seed_axis_equals_single_device():
    proc = SHARDED["proc"]
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 4 and out["key_devices"] == 4  # really sharded over 4 devices
    ref = measured()  # in-process: the default single CPU device
    assert set(out["per_seed_sq"]) == set(ref.per_seed_sq)
    for name, values in out["per_seed_sq"].items():
        _sq_close(name, np.asarray(values), ref.per_seed_sq[name], ref.per_seed_sq)
    for k, values in out["activations"].items():
        np.testing.assert_allclose(np.asarray(values), ref.activations[k], rtol=1e-5, atol=1e-7)
    # measure_sweep: one configuration per device, the same numbers as one at a time
    assert len(set(out["sweep_devices"])) == 3
    first, other, again = out["sweep_sq"]
    for name in ref.per_seed_sq:
        _sq_close(name, np.asarray(first[name]), ref.per_seed_sq[name], ref.per_seed_sq)
        _sq_close(name, np.asarray(again[name]), ref.per_seed_sq[name], ref.per_seed_sq)
    assert any(not np.allclose(other[n], first[n]) for n in first)  # a different Arch


def test_pooled_seed_blocks_are_one_measurement_over_all_seeds():
    """Four independent blocks (keys 3-6) pooled: the norms and delta-method standard errors
    of the concatenated per-seed squared norms, with control variates on the concatenated
    collision counts (32 seeds: enough for 3 coefficients; the least-squares intercept and its
    standard error recomputed here from the normal equations), the stream statistics as
    seed-weighted means; bad block lists are refused by name."""
    blocks = [measured(KEY + i) for i in range(4)]
    a, b = blocks[:2]
    pooled = pool_seed_blocks(blocks)
    assert pooled.meta["seeds"] == 4 * SEEDS and pooled.meta["key"] == [KEY + i for i in range(4)]
    assert pooled.meta["estimator"] == "control variates: targets, tokens.within"
    assert pool_seed_blocks([a, b]).meta["estimator"] == "mean"  # 16 seeds: too few
    count = {n: np.concatenate([p.per_seed_collisions[n] for p in blocks])
             for n in a.per_seed_collisions}
    p_c = 1.0 / ARCH.vocab_size
    z_targets = count["targets.within"] + count["targets.across"] - 10 * 9 * p_c
    z_tokens = count["tokens.within"] - 2 * 5 * 4 * p_c
    x = np.column_stack([np.ones(4 * SEEDS), z_targets, z_tokens])
    inv = np.linalg.inv(x.T @ x)
    for name in a.grads:
        sq = np.concatenate([p.per_seed_sq[name] for p in blocks])
        coef = inv @ x.T @ sq
        resid = sq - x @ coef
        se_mean = np.sqrt(np.sum(resid ** 2, axis=0) / (4 * SEEDS - 3) * inv[0, 0])
        if name in ZERO_GRAD:
            continue
        np.testing.assert_allclose(pooled.grads[name], np.sqrt(coef[0]), rtol=1e-9)
        np.testing.assert_allclose(pooled.stderr[name], se_mean / (2 * np.sqrt(coef[0])),
                                   rtol=1e-7)
    for key in a.activations:
        np.testing.assert_allclose(pooled.activations[key],
                                   sum(p.activations[key] for p in blocks) / 4, rtol=1e-12)
        np.testing.assert_allclose(
            pooled.activations_stderr[key],
            np.sqrt(sum(p.activations_stderr[key] ** 2 for p in blocks)) / 4, rtol=1e-12)
    assert pool_seed_blocks([a]) is a
    with pytest.raises(ValueError, match="keys="):
        pool_seed_blocks([a, a])
    other = GradProfile.from_dict(dict(b.to_dict(), arch=Arch(**{**ARCH_KW, "depth": 2}).to_dict()))
    with pytest.raises(ValueError, match="arch="):
        pool_seed_blocks([a, other])
    with pytest.raises(ValueError, match="blocks=\\[\\]"):
        pool_seed_blocks([])
