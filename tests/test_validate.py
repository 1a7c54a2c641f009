"""normfield.validate: error rows, summary table and the measurement cache (probe stubbed)."""

import os

import numpy as np
import pytest

from normfield import Arch, validate
from normfield.theory.predict import predict

TINY = dict(depth=2, d_model=32, n_heads=2, d_ff=64, seq_len=4, batch_size=2, vocab_size=16)


def _fake_measure(scale, chunks=None):
    calls = []

    def sweep(archs, seeds, key, chunk, precision):
        if chunks is not None:
            chunks.append(chunk)
        for arch in archs:
            calls.append((arch, key, precision))
            prof = predict(arch)
            prof.source = "probe"
            prof.grads = {k: v * scale for k, v in prof.grads.items()}
            prof.stderr = {k: 0.01 * v for k, v in prof.grads.items()}
            # every seed measures the scaled theory exactly
            prof.per_seed_sq = {k: np.tile(v ** 2, (seeds, 1)) for k, v in prof.grads.items()}
            prof.meta = {"seeds": seeds, "key": key, "precision": precision}
            yield prof

    return sweep, calls


def test_rows_summary_and_cache(tmp_path, monkeypatch):
    measure, calls = _fake_measure(1.25)
    monkeypatch.setattr(validate, "measure_sweep", measure)
    archs = [Arch(placement="pre", **TINY), Arch(placement="post", **TINY)]
    rows = validate.run_grid(archs, seeds=2, out=str(tmp_path))
    # theory / measured - 1 = 1/1.25 - 1 = -0.2 for every parameter and layer; the stream
    # statistics were left equal to the theory's
    errs = np.array([r["rel_err"] for r in rows if not r["param"].startswith("stream.")])
    assert np.allclose(errs[np.isfinite(errs)], -0.2)
    stream = np.array([r["rel_err"] for r in rows if r["param"].startswith("stream.")])
    assert len(stream) == 2 * 3 * 3 and np.allclose(stream, 0.0)  # 2 archs, 3 stats, 3 points
    assert {r["placement"] for r in rows} == {"pre", "post"}
    table = validate.summarize(rows)
    assert "20.00%" in table and "post" in table and "pre" in table
    assert len(calls) == 2
    validate.run_grid(archs, seeds=2, out=str(tmp_path))  # second run: measurements cached
    assert len(calls) == 2


def test_collapsed_configurations_are_measured_in_float64(tmp_path, monkeypatch):
    """Post-LN at depth 24, d 512 collapses its tokens to a predicted 1 - cosine of 1.7e-7
    (below float32's resolution, `FLOAT32_COSINE_FLOOR`); Pre-LN keeps them apart: the first
    goes to a float64 sweep and a cache file of its own, the second stays float32."""
    shape = dict(depth=24, d_model=512, n_heads=8, d_ff=2048, seq_len=32, batch_size=2,
                 vocab_size=512)
    post, pre = Arch(placement="post", **shape), Arch(placement="pre", **shape)
    assert [validate.measurement_precision(predict(a)) for a in (post, pre)] == [
        "float64", "float32"]
    measure, calls = _fake_measure(1.0)
    monkeypatch.setattr(validate, "measure_sweep", measure)
    rows = validate.run_grid([post, pre], seeds=2, out=str(tmp_path))
    assert sorted((a.placement, p) for a, _, p in calls) == [("post", "float64"),
                                                              ("pre", "float32")]
    assert {(r["placement"], r["precision"]) for r in rows} == {("post", "float64"),
                                                                ("pre", "float32")}
    assert os.path.exists(validate.block_path(str(tmp_path), post, 2, 0, "float64"))
    assert not os.path.exists(validate.block_path(str(tmp_path), post, 2, 0))


def test_variant_names_distinguish_features():
    a = Arch(placement="pre", **TINY)
    b = Arch(placement="pre", positions="rope", qk_norm=True, norm="rmsnorm", **TINY)
    assert validate.config_name(a) != validate.config_name(b)
    assert validate.variant(b) == "relu-rmsnorm-rope-qknorm"
    assert validate.variant(Arch(placement="pre", tokens="zipf", **TINY)) == "relu-zipf"
    assert validate.variant(Arch(placement="pre", tokens="zipf", zipf_exponent=1.5,
                                 **TINY)) == "relu-zipf1.5"
    archs = validate.coverage_archs()
    assert len(archs) == len(validate.COVERAGE_VARIANTS) + len(validate.COVERAGE_PRESETS)
    assert len({validate.config_name(x) for x in archs}) == len(archs)


def test_sample_grid_is_part_of_the_full_grid_where_the_bar_applies():
    full = {validate.config_name(a) for a in validate.grid_archs(validate.FULL_GRID)}
    sample, seeds = validate.grid_configs("sample")
    names = [validate.config_name(a) for a in sample]
    assert len(names) == len(set(names)) == 16 and set(names) <= full and seeds == 64
    assert all(a.d_model >= 256 and a.depth <= 24 for a in sample)
    assert {a.seq_len for a in sample} == {16, 64, 256} and {a.d_model for a in sample} == {
        256, 512, 1024} and {a.activation for a in sample} == {"relu", "gelu"}


def test_bad_grid_name():
    with pytest.raises(ValueError, match="grid='huge'"):
        validate.main(grid="huge")


@pytest.mark.parametrize("kw,match", [(dict(seeds=0), "seeds=0"), (dict(seeds=40), "seeds=40"),
                                      (dict(chunk=0), "chunk=0")])
def test_bad_seeds_or_chunk_are_refused_before_any_work(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        validate.main(grid="quick", out=str(tmp_path), **kw)
    assert not list(tmp_path.iterdir())  # nothing measured or written


def test_markdown_table_has_one_row_per_configuration(tmp_path, monkeypatch):
    measure, _ = _fake_measure(2.0)
    monkeypatch.setattr(validate, "measure_sweep", measure)
    rows = validate.run_grid([Arch(placement="pre", **TINY)], seeds=2, out=str(tmp_path))
    table = validate.markdown_table(rows).splitlines()
    assert len(table) == 3 and table[2].startswith("| pre | bidirectional | relu | 50.0 |")


def test_shards_split_the_medium_grid_into_equal_costs():
    """Every configuration in exactly one shard, in grid order, and the shards' summed
    `probe_cost` within 5% of each other (every second configuration would put all the
    d_model 512 ones, 3.9x the cost, into one of two shards)."""
    archs, _ = validate.grid_configs("medium")
    for count in (2, 3, 4):
        shards = [validate.shard_configs(archs, i, count) for i in range(count)]
        assert sorted(map(validate.config_name, sum(shards, []))) == sorted(
            map(validate.config_name, archs))
        for shard in shards:
            assert shard == [a for a in archs if a in shard]
        loads = [sum(map(validate.probe_cost, shard)) for shard in shards]
        assert max(loads) <= 1.05 * min(loads), loads
    halves = [sum(map(validate.probe_cost, archs[i::2])) for i in range(2)]
    assert max(halves) > 3 * min(halves)


def test_shards_partition_the_grid_and_merge_reads_them(tmp_path, monkeypatch):
    measure, calls = _fake_measure(1.0)
    monkeypatch.setattr(validate, "measure_sweep", measure)
    monkeypatch.setattr(validate, "QUICK_GRID", dict(validate.QUICK_GRID, d_model=(32,),
                                                     seq_len=(4,), depth=(1, 2), seeds=2))
    monkeypatch.setitem(validate.GRIDS, "quick", validate.QUICK_GRID)
    for i in range(3):
        validate.main(grid="quick", out=str(tmp_path), shard=f"{i}/3")
    assert len(calls) == 4 == len({validate.config_name(a) for a, _, _ in calls})
    validate.main(grid="quick", out=str(tmp_path), merge=True)
    assert len(calls) == 4  # merging measures nothing
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError, match="shard="):
            validate.parse_shard(bad)
    # without --out every grid keeps its own folder (and summary)
    monkeypatch.chdir(tmp_path)
    validate.main(grid="quick", merge=False)
    assert (tmp_path / "results" / "validation-quick" / "summary.txt").exists()
    assert not (tmp_path / "results" / "validation").exists()


def test_stream_rows_compare_norms_and_distance_from_collapse():
    arch = Arch(placement="post", **TINY)
    theory = predict(arch)
    measured = predict(arch)
    measured.source = "probe"
    measured.stderr = {k: 0.0 * v for k, v in measured.grads.items()}
    measured.activations = {"sq_norm": 2.0 * theory.activations["sq_norm"],
                            "cos_within": 1.0 - 4.0 * (1.0 - theory.activations["cos_within"]),
                            "cos_across": theory.activations["cos_across"]}
    measured.activations_stderr = {k: np.full(3, 0.01) for k in measured.activations}
    rows = {(r["param"], r["layer"]): r for r in validate.compare(theory, measured)}
    for point in range(3):
        assert rows["stream.sq_norm", point]["rel_err"] == pytest.approx(-0.5)
        assert rows["stream.1-cos_within", point]["rel_err"] == pytest.approx(-0.75)
        assert rows["stream.1-cos_across", point]["rel_err"] == pytest.approx(0.0, abs=1e-12)
        one_minus_cos = 4.0 * (1.0 - theory.activations["cos_within"][point])
        assert rows["stream.1-cos_within", point]["rel_se"] == pytest.approx(0.01 / one_minus_cos)
    assert "residual stream" in validate.summarize(list(rows.values()))


def test_encoder_decoder_stream_rows_carry_the_stack_prefix():
    arch = Arch(placement="pre", decoder_depth=2, **TINY)
    prof = predict(arch)
    prof.stderr = {k: 0.0 * v for k, v in prof.grads.items()}
    names = {r["param"] for r in validate.compare(prof, prof)}
    assert {"enc.stream.sq_norm", "dec.stream.1-cos_within", "dec.cross_attn.k"} <= names


def test_seed_blocks_are_added_not_remeasured(tmp_path, monkeypatch):
    measure, calls = _fake_measure(1.0)
    monkeypatch.setattr(validate, "measure_sweep", measure)
    arch = Arch(placement="pre", **TINY)
    validate.run_grid([arch], seeds=32, out=str(tmp_path))
    assert [k for _, k, _ in calls] == [0]
    rows = validate.run_grid([arch], seeds=96, out=str(tmp_path))  # adds keys 1 and 2 only
    assert [k for _, k, _ in calls] == [0, 1, 2]
    assert {r["seeds"] for r in rows} == {96}
    chunks = []
    measure, calls = _fake_measure(1.0, chunks)
    monkeypatch.setattr(validate, "measure_sweep", measure)
    validate.run_grid([arch], seeds=64, out=str(tmp_path / "chunked"), chunk=4)
    assert chunks == [4, 4]  # seeds per compiled call, for configurations that need less memory
    assert validate.seed_blocks(96) == [(32, 0), (32, 1), (32, 2)]
    assert validate.seed_blocks(5) == [(5, 0)]
    for bad in (0, 40, 2.0, True):
        with pytest.raises(ValueError, match="seeds="):
            validate.seed_blocks(bad)


def test_beyond_noise_removes_the_measurement_variance():
    rows = [{"rel_err": e, "rel_se": 0.03} for e in (0.05, -0.05)]
    assert validate.beyond_noise(rows) == pytest.approx(0.04)  # sqrt(0.05^2 - 0.03^2)
    rows = [{"rel_err": e, "rel_se": 0.03} for e in (0.01, -0.02)]
    assert validate.beyond_noise(rows) == 0.0  # all within the noise


def test_beyond_noise_is_unbiased_on_simulated_measurements():
    """Errors drawn as bias + noise with known standard errors, strongly correlated within a
    configuration (one shared draw per configuration, as the seeds' shared backward pass
    makes them): the estimate recovers the RMS bias.  4000 configurations of 20 rows: the
    estimate's scatter is 0.06% (30 simulations), the tolerance 0.3%; without the noise
    subtracted it would read sqrt(1.82^2 + 4^2) = 4.4%."""
    rng = np.random.default_rng(0)
    bias = np.linspace(-0.03, 0.03, 20)  # RMS 1.82%
    se = np.full(20, 0.04)
    shared = rng.normal(size=(4000, 1))
    own = rng.normal(size=(4000, 20))
    err = bias + se * (0.9 * shared + np.sqrt(1 - 0.81) * own)
    rows = [{"rel_err": e, "rel_se": s} for e, s in zip(err.ravel(), np.tile(se, 4000))]
    assert validate.beyond_noise(rows) == pytest.approx(np.sqrt(np.mean(bias ** 2)), abs=0.003)
    assert np.median(np.abs(err)) > 0.025  # the median |error| is mostly noise


def test_merge_names_configurations_whose_precision_changed(tmp_path, monkeypatch, capsys):
    """A theory change that moves a configuration's predicted collapse across the float32
    floor makes its old blocks the wrong precision: the merge leaves it out of the table and
    says so, naming the precision of the blocks it has."""
    measure, calls = _fake_measure(1.0)
    monkeypatch.setattr(validate, "measure_sweep", measure)
    monkeypatch.setattr(validate, "QUICK_GRID", dict(validate.QUICK_GRID, d_model=(32,),
                                                     seq_len=(4,), depth=(1, 2), seeds=2))
    monkeypatch.setitem(validate.GRIDS, "quick", validate.QUICK_GRID)
    validate.main(grid="quick", out=str(tmp_path))
    assert "not in the table" not in capsys.readouterr().out
    flipped = validate.config_name(validate.grid_configs("quick")[0][0])
    real = validate.measurement_precision
    monkeypatch.setattr(validate, "measurement_precision", lambda t: "float64" if (
        validate.config_name(t.arch) == flipped) else real(t))
    validate.main(grid="quick", out=str(tmp_path), merge=True)
    out = capsys.readouterr().out
    assert "1 of 4 configurations not in the table" in out
    assert f"{flipped}: only float32 blocks" in out
    assert len(calls) == 4  # nothing measured by the merge
