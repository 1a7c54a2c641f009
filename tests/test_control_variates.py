"""The measurement's control variates: the batch's token collision counts (probe), their exact
expectations (data) and the control-variate estimate of the mean squared norm (profile)."""

from __future__ import annotations

from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest

from normfield.arch import Arch
from normfield.data import expected_collisions, token_probs
from normfield.probe.measure import collisions
from normfield.profile import GradProfile, control_covariates, pool_seed_blocks, seed_moments

ZIPF = Arch(depth=1, placement="pre", d_model=8, n_heads=2, d_ff=16, seq_len=7, batch_size=3,
            vocab_size=9, tokens="zipf")


def _brute_force(batch: np.ndarray) -> tuple[int, int]:
    """(within, across): ordered pairs of distinct positions with equal tokens."""
    b, n = batch.shape
    flat = batch.ravel()
    same = flat[:, None] == flat[None, :]
    seq = np.repeat(np.arange(b), n)
    same_seq = seq[:, None] == seq[None, :]
    off_diag = ~np.eye(b * n, dtype=bool)
    return int(np.sum(same & same_seq & off_diag)), int(np.sum(same & ~same_seq))


def test_collision_counts_match_pairwise_comparison():
    rng = np.random.default_rng(0)
    for arch in (ZIPF, replace(ZIPF, decoder_depth=1)):
        arrays = [rng.integers(0, arch.vocab_size, (arch.batch_size, arch.seq_len))
                  for _ in range(3 if arch.decoder_depth else 2)]
        tokens = tuple(map(jnp.asarray, arrays[:-1])) if arch.decoder_depth else arrays[0]
        got = collisions(arch, tokens, jnp.asarray(arrays[-1]))
        names = ("source", "tokens", "targets") if arch.decoder_depth else ("tokens", "targets")
        assert set(got) == {f"{n}.{k}" for n in names for k in ("within", "across")}
        for name, batch in zip(names, arrays):
            within, across = _brute_force(batch)
            assert float(got[name + ".within"]) == within
            assert float(got[name + ".across"]) == across


def test_expected_collisions_against_sampled_batches():
    """Means over 20,000 sampled Zipf batches within 4 standard errors of the closed forms
    ``B n (n-1) p_c`` and ``B (B-1) n^2 p_c``; uniform tokens: p_c = 1/V exactly."""
    rng = np.random.default_rng(1)
    p = token_probs(ZIPF)
    draws = rng.choice(ZIPF.vocab_size, size=(20000, ZIPF.batch_size, ZIPF.seq_len), p=p)
    counts = np.array([_brute_force(batch) for batch in draws], float)
    expect = expected_collisions(ZIPF)
    for column, kind in enumerate(("within", "across")):
        se = counts[:, column].std() / np.sqrt(len(counts))
        assert abs(counts[:, column].mean() - expect["tokens." + kind]) < 4 * se, kind
        assert expect["targets." + kind] == expect["tokens." + kind]
    uniform = expected_collisions(replace(ZIPF, tokens="uniform"))
    assert uniform["tokens.within"] == pytest.approx(3 * 7 * 6 / 9, rel=1e-12)
    assert uniform["tokens.across"] == pytest.approx(3 * 2 * 49 / 9, rel=1e-12)


def _synthetic(rng, seeds, noise=0.5):
    """Squared norms that depend linearly on two centred count covariates, plus noise; the
    true mean is 5 (layer 0) and 3 (layer 1)."""
    z = {"a": rng.poisson(4.0, seeds) - 4.0, "b": rng.poisson(9.0, seeds) - 9.0}
    eps = rng.normal(0.0, noise, (seeds, 2))
    sq = np.stack([5 + 2 * z["a"] - z["b"], 3 + 0.5 * z["b"]], axis=1) + eps
    return {"w": sq}, z


def test_control_variate_estimate_is_unbiased_and_its_stderr_honest():
    """Over 400 replicates of 64 seeds: the estimates' mean within 4 of its standard errors of
    the truth, their spread equal to the reported standard error (within 15%: the spread of 400
    replicates is known to 3.5%), and the plain mean's standard error larger by the share of
    the variance the covariates explain."""
    rng = np.random.default_rng(2)
    est, se, se_plain = [], [], []
    for _ in range(400):
        sq, z = _synthetic(rng, 64)
        g, s, name = seed_moments(sq, z)
        g0, s0, name0 = seed_moments(sq)
        assert name == "control variates: a, b" and name0 == "mean"
        est.append(g["w"] ** 2)
        se.append(2 * g["w"] * s["w"])  # back from the delta method to se(mean)
        se_plain.append(2 * g0["w"] * s0["w"])
    est, se, se_plain = np.array(est), np.mean(se, axis=0), np.mean(se_plain, axis=0)
    truth = np.array([5.0, 3.0])
    assert np.all(np.abs(est.mean(axis=0) - truth) < 4 * est.std(axis=0) / np.sqrt(len(est)))
    np.testing.assert_allclose(est.std(axis=0, ddof=1) / se, 1.0, atol=0.15)
    # the variance the covariates explain: Var(2a - b) = 4*4 + 9, Var(b/2) = 9/4; noise 0.25
    np.testing.assert_allclose(se_plain / se, np.sqrt([(25 + 0.25) / 0.25, (2.25 + 0.25) / 0.25]),
                               rtol=0.15)


def test_plain_mean_without_usable_covariates():
    rng = np.random.default_rng(3)
    sq, z = _synthetic(rng, 64)
    plain = seed_moments(sq)
    # a covariate that never varies carries nothing: dropped
    only_constant = seed_moments(sq, {"c": np.zeros(64) - 1.5})
    # fewer than 10 seeds per coefficient (3 coefficients need 30 seeds)
    few = seed_moments({"w": sq["w"][:29]}, {k: v[:29] for k, v in z.items()})
    np.testing.assert_array_equal(only_constant[0]["w"], plain[0]["w"])
    assert only_constant[2] == "mean" and few[2] == "mean"
    np.testing.assert_allclose(few[0]["w"], np.sqrt(sq["w"][:29].mean(axis=0)), rtol=1e-12)
    assert seed_moments({"w": sq["w"][:30]}, {k: v[:30] for k, v in z.items()})[2] != "mean"
    # one varying covariate among constant ones is used alone
    assert seed_moments(sq, {"a": z["a"], "c": np.zeros(64)})[2] == "control variates: a"


def test_control_covariates_are_the_targets_and_the_inputs_within_a_sequence():
    counts = {"source.within": np.array([1.0, 5.0]), "source.across": np.array([2.0, 3.0]),
              "tokens.within": np.array([4.0, 0.0]), "tokens.across": np.array([7.0, 1.0]),
              "targets.within": np.array([3.0, 2.0]), "targets.across": np.array([6.0, 9.0])}
    arch = replace(ZIPF, decoder_depth=1)
    e = expected_collisions(arch)
    z = control_covariates(arch, counts)
    assert set(z) == {"targets", "tokens.within", "source.within"}
    expect_targets = np.array([9.0, 11.0]) - e["targets.within"] - e["targets.across"]
    np.testing.assert_allclose(z["targets"], expect_targets)
    np.testing.assert_allclose(z["source.within"], np.array([1.0, 5.0]) - e["source.within"])
    assert control_covariates(arch, None) is None


def _block(arch, key, sq, counts):
    return GradProfile(arch=arch, source="probe", grads={}, activations={}, per_seed_sq=sq,
                       per_seed_collisions=counts, meta={"seeds": len(sq["w"]), "key": key})


def test_pooled_blocks_fit_the_control_variates_on_all_seeds():
    """Pooling concatenates the collision counts and fits once over every seed (the same as
    `seed_moments` on the concatenated arrays); a block without counts makes it the mean."""
    rng = np.random.default_rng(4)
    expect = expected_collisions(ZIPF)
    blocks, all_sq, all_counts = [], [], []
    for key in range(3):
        counts = {n: rng.poisson(e, 32).astype(float) for n, e in expect.items()}
        sq = {"w": 1.0 + 0.1 * counts["targets.within"][:, None] + rng.normal(0, 0.1, (32, 1))}
        blocks.append(_block(ZIPF, key, sq, counts))
        all_sq.append(sq["w"])
        all_counts.append(counts)
    pooled = pool_seed_blocks(blocks)
    joined = {n: np.concatenate([c[n] for c in all_counts]) for n in expect}
    g, s, name = seed_moments({"w": np.concatenate(all_sq)}, control_covariates(ZIPF, joined))
    assert pooled.meta["estimator"] == name and name.startswith("control variates")
    np.testing.assert_allclose(pooled.grads["w"], g["w"], rtol=1e-12)
    np.testing.assert_allclose(pooled.stderr["w"], s["w"], rtol=1e-12)
    old = _block(ZIPF, 3, {"w": np.ones((32, 1))}, None)
    assert pool_seed_blocks(blocks + [old]).meta["estimator"] == "mean"
