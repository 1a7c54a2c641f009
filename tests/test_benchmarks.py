"""Smoke test of the benchmark script's probe timing (`benchmarks/run.py`): it reads the probe's
compiled chunk directly, so a change of what that chunk returns must not break it silently."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import numpy as np

from normfield import Arch

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def _load_run():
    spec = importlib.util.spec_from_file_location("benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_probe_reports_finite_rates_and_the_profile_norms():
    run = _load_run()
    arch = Arch(depth=1, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=4,
                batch_size=1, vocab_size=11)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    row, (per_seed, profile) = run.time_probe(arch, "float32", keys, flops=1e6, peak=1.0,
                                              min_time=0.0, repeats=1)
    assert row["iters"] >= 1 and row["max_rel_diff_vs_float32"] == 0.0
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("seconds_per_call", "tflops"))
    # per-seed norms of every parameter for 2 seeds; the profile's are sqrt(mean of squares)
    assert per_seed.size == 2 * profile.size
    assert np.all(np.isfinite(profile)) and np.all(profile >= 0)
