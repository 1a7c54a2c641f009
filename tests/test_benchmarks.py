"""Smoke tests of the benchmark scripts: the probe timing of `benchmarks/run.py` (it reads the
probe's compiled chunk directly, so a change of what that chunk returns must not break it
silently) and the fresh-process theory timing of `benchmarks/theory_speed.py`."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from normfield import Arch

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("benchmarks_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_probe_reports_finite_rates_and_the_profile_norms():
    run = _load(RUN)
    # the Arch, seed count and options of tests/test_probe_measure.py's measurement: one pytest
    # run compiles the probe's chunk for them once
    arch = Arch(depth=3, placement="mixln", placement_options=(("post_fraction", 0.5),),
                d_model=8, n_heads=2, d_ff=16, seq_len=5, batch_size=2, vocab_size=11,
                activation="gelu", mask="causal", bias=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    row, (per_seed, profile) = run.time_probe(arch, "float32", keys, flops=1e6, peak=1.0,
                                              min_time=0.0, repeats=1, remat=False,
                                              unroll=False)
    assert row["iters"] >= 1 and row["max_rel_diff_vs_float32"] == 0.0
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("seconds_per_call", "tflops"))
    # per-seed norms of every parameter for 8 seeds; the profile's are sqrt(mean of squares)
    assert per_seed.size == 8 * profile.size
    assert np.all(np.isfinite(profile)) and np.all(profile >= 0)


def test_theory_speed_times_a_configuration_in_a_fresh_process():
    """`benchmarks/theory_speed.py`: the child process runs the prediction it is given (a tiny
    causal Pre-LN arch) and reports its first call, a repeat and finiteness; only the issue's
    target configurations carry a target."""
    speed = _load(RUN.parent / "theory_speed.py")
    fields = dict(d_model=16, n_heads=2, d_ff=32, batch_size=2, vocab_size=11)
    row = speed.time_in_fresh_process(2, "pre", 4, "causal", fields, repeats=1)
    assert (row["depth"], row["placement"], row["seq_len"], row["mask"]) == (2, "pre", 4, "causal")
    assert row["finite"] is True and "target_seconds" not in row
    assert 0 < row["warm_seconds"] and 0 < row["first_seconds"]
    assert "first" in speed.format_row(row)


def test_theory_speed_reports_a_failing_configuration_with_its_error():
    speed = _load(RUN.parent / "theory_speed.py")
    with pytest.raises(RuntimeError, match="invalid mask='sideways'"):
        speed.time_in_fresh_process(2, "pre", 4, "sideways", {}, repeats=1)


def test_run_names_an_unknown_variant_and_the_valid_ones(capsys):
    run = _load(RUN)
    with pytest.raises(SystemExit):
        run.main(["--quick", "--variants", "remat,sideways"])
    err = capsys.readouterr().err
    assert "unknown --variants sideways" in err and "unroll, remat, remat_weight_products" in err


def test_a_failing_variant_becomes_a_row_with_its_error(monkeypatch):
    """A variant that fails on the device (e.g. an option the backend lacks) must not end a
    long benchmark run: its row records the error and the other rows stay."""
    run = _load(RUN)
    monkeypatch.setitem(run.VARIANTS, "broken", ({"remat": "bogus"}, ("float32",)))
    shape = dict(d_model=8, n_heads=2, d_ff=16, depth=2, seq_len=5, batch_size=2, vocab_size=11)
    peaks = {p: {"tflops": 1.0} for p in run.PRECISIONS}
    rows, info = run.bench_probe(shape, 2, peaks, 0.0, 1, ["broken"])
    assert "bogus" in info["probe_variants"]["broken"]["float32"]["error"]
    assert all(rows[p]["seconds_per_call"] > 0 for p in run.PRECISIONS)
