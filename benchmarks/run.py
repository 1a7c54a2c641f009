"""Benchmark of the normfield probe (JAX) and theory on one device.

    python benchmarks/run.py [--quick] [--out benchmarks/results/<device>.json]

Measures, in one process on ``jax.devices()[0]``:
  * dense matmul peak (jit'ed square matmul) in fp32 (precision highest), TF32 and bf16
    (bf16 operands, fp32 accumulation, as the probe's bf16 mode);
  * the probe (`normfield.probe.measure._run_chunk`, all seeds in one vmapped call) at the
    GPT-2-small shape (or a small shape with --quick), for float32 / tf32 / bfloat16:
    steady-state seconds per call, achieved TFLOP/s from the analytic FLOP count below, fraction
    of that precision's matmul peak, and the max relative difference of the per-seed gradient
    norms against float32; then the variants in `VARIANTS` (layers unrolled into a Python loop,
    rematerialized blocks; `--variants` picks some) against the same float32 reference;
  * compile time (``_run_chunk.lower(...).compile()``) at depth 6 and depth 48;
  * peak device memory (``memory_stats()``; null where the backend has none, e.g. CPU);
  * an optional PyTorch reference (`torch_reference.py`; skipped when torch is missing);
  * the theory (`predict_grad_norms`) time at depth 12, 48 (seq_len 128), 1000 and 10000
    (seq_len 16), each in a fresh process (`theory_speed.py`, which also times Pre-LN and
    causal masks), and theory vs probe time at the benchmark shape.

FLOP count (per seed; multiply-add = 2 FLOPs; T = batch*seq tokens, n = seq, d = d_model):
  forward = depth * (2*T*(4*d^2 + 2*d*d_ff) + 4*batch*n^2*d) + 2*T*d*vocab
  (QKVO + FFN matmuls, QK^T and AV attention, untied head), forward+backward = 3 * forward.
  Norms, softmax, embedding gathers and the stream statistics are not counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # theory timings: single-threaded BLAS

import jax
import jax.numpy as jnp
import numpy as np

from normfield import Arch
from normfield.probe.measure import MATMUL_PRECISION, _run_chunk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import theory_speed  # noqa: E402  (benchmarks/theory_speed.py, beside this script)

PLACEMENT = "post"  # bidirectional Post-LN (the Arch default mask is bidirectional)
FULL_SHAPE = dict(d_model=768, n_heads=12, d_ff=3072, depth=12, seq_len=512, batch_size=4,
                  vocab_size=8192)
QUICK_SHAPE = dict(d_model=128, n_heads=2, d_ff=512, depth=4, seq_len=64, batch_size=2,
                   vocab_size=512)
PRECISIONS = ("float32", "tf32", "bfloat16")
# probe options timed beside the default scan: name -> (options of `_run_chunk`, precisions)
VARIANTS = {"unroll": ({"unroll": True}, PRECISIONS),
            "remat": ({"remat": True}, ("float32",)),
            "remat_weight_products": ({"remat": "weight_products"}, PRECISIONS)}


def forward_flops(shape: dict) -> float:
    d, f, n, b = shape["d_model"], shape["d_ff"], shape["seq_len"], shape["batch_size"]
    t = b * n
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * b * n * n * d
    return shape["depth"] * per_layer + 2 * t * d * shape["vocab_size"]


def train_flops(shape: dict, seeds: int) -> float:
    return 3.0 * forward_flops(shape) * seeds


def timed(fn, min_time: float, min_iters: int = 3, max_iters: int = 50) -> list[float]:
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or (time.perf_counter() - start < min_time
                                     and len(times) < max_iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return times


# ---- matmul peak -------------------------------------------------------------------------------
def matmul_peak(size: int, min_time: float) -> dict:
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (size, size), jnp.float32)
    b = jax.random.normal(kb, (size, size), jnp.float32)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    flops = 2.0 * size ** 3
    out = {}
    cases = {
        "float32": ("highest", lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST),
                    a, b),
        "tf32": ("tensorfloat32", lambda x, y: jnp.matmul(x, y), a, b),
        "bfloat16": ("default", lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32),
                     a16, b16),
    }
    for name, (prec, fn, x, y) in cases.items():
        with jax.default_matmul_precision(prec):
            f = jax.jit(fn)
            jax.block_until_ready(f(x, y))  # compile + warm-up
            jax.block_until_ready(f(x, y))
            times = timed(lambda: f(x, y), min_time)
        best = min(times)
        out[name] = {"size": size, "seconds": best, "tflops": flops / best / 1e12,
                     "iters": len(times)}
        print(f"  matmul {name:9s} {size}^3: {flops / best / 1e12:8.3f} TFLOP/s", flush=True)
    return out


# ---- probe -------------------------------------------------------------------------------------
def make_arch(shape: dict, **changes) -> Arch:
    return Arch(placement=PLACEMENT, **{**shape, **changes})


def probe_call(arch, precision, keys, **options):
    with jax.default_matmul_precision(MATMUL_PRECISION[precision]):
        return jax.block_until_ready(_run_chunk(arch, precision, keys, **options))


def per_seed_norms(sq) -> np.ndarray:
    return np.concatenate([np.sqrt(np.asarray(v, np.float64)).reshape(-1) for _, v in
                           sorted(sq.items())])


def profile_norms(sq) -> np.ndarray:
    """sqrt(mean over seeds of the squared norm): the number a GradProfile reports (below 30
    seeds; with more, the control-variate estimate of `profile.seed_moments`)."""
    return np.concatenate([np.sqrt(np.asarray(v, np.float64).mean(axis=0)) for _, v in
                           sorted(sq.items())])


def max_rel(a, ref) -> float:
    return float((np.abs(a - ref) / np.maximum(np.abs(ref), 1e-30)).max())


def time_probe(arch, prec, keys, flops, peak, min_time, repeats, ref=None, **options):
    """One probe configuration: steady seconds per call, TFLOP/s, fraction of `peak` and the
    difference of its norms from `ref` (the float32 scan's (per seed, profile) norms; itself
    when None).  Returns (row, norms)."""
    t = time.perf_counter()
    sq = probe_call(arch, prec, keys, **options)[0]  # compile + first run
    first = time.perf_counter() - t
    times = timed(lambda: probe_call(arch, prec, keys, **options), min_time, min_iters=repeats)
    steady = statistics.median(times)
    norms = per_seed_norms(sq), profile_norms(sq)
    (seed_ref, prof_ref), (seed, prof) = ref or norms, norms
    tflops = flops / steady / 1e12
    row = {"seconds_per_call": steady, "seconds_min": min(times), "iters": len(times),
           "first_call_seconds": first, "compile_seconds_est": first - steady,
           "tflops": tflops, "fraction_of_peak": tflops / peak,
           "max_rel_diff_vs_float32": max_rel(seed, seed_ref),
           "profile_max_rel_diff_vs_float32": max_rel(prof, prof_ref)}
    label = prec + "".join(f" {k}={v}" for k, v in options.items() if v)
    print(f"  probe {label:16s}: {steady:.4f} s/call, {tflops:.4f} TFLOP/s "
          f"({100 * tflops / peak:.1f}% of peak), vs float32: per seed "
          f"max {row['max_rel_diff_vs_float32']:.1e}, profile max "
          f"{row['profile_max_rel_diff_vs_float32']:.1e}", flush=True)
    return row, norms


def bench_probe(shape, seeds, peaks, min_time, repeats, variants) -> tuple[dict, dict]:
    """The probe (one `lax.scan` over layers) in every precision, then the named `VARIANTS`
    against the same float32 reference."""
    arch = make_arch(shape)
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    flops = train_flops(shape, seeds)
    out, rows, ref = {}, {name: {} for name in variants}, None
    for prec in PRECISIONS:
        out[prec], norms = time_probe(arch, prec, keys, flops, peaks[prec]["tflops"], min_time,
                                      repeats, ref)
        ref = ref or norms
    for name in variants:
        options, precisions = VARIANTS[name]
        for prec in precisions:
            try:
                rows[name][prec], _ = time_probe(arch, prec, keys, flops, peaks[prec]["tflops"],
                                                 min_time, repeats, ref, **options)
            except Exception as exc:  # a variant that fails on this device: the row says why
                print(f"  probe {prec} {name}: failed: {exc!r}"[:300], flush=True)
                rows[name][prec] = {"error": repr(exc)[:2000]}
    return out, {"flops_per_call": flops, "seeds": seeds, "probe_variants": rows}


def compile_time(shape, depth, seeds, precision="float32") -> float:
    arch = make_arch(shape, depth=depth)
    keys = jax.random.split(jax.random.PRNGKey(1), seeds)
    with jax.default_matmul_precision(MATMUL_PRECISION[precision]):
        t = time.perf_counter()
        _run_chunk.lower(arch, precision, keys).compile()
        return time.perf_counter() - t


def compile_times(shape, seeds) -> dict:
    print("compile time:", flush=True)
    c6, c48 = compile_time(shape, 6, seeds), compile_time(shape, 48, seeds)
    print(f"  depth 6: {c6:.2f} s, depth 48: {c48:.2f} s", flush=True)
    return {"depth6_seconds": c6, "depth48_seconds": c48, "ratio_48_over_6": c48 / c6,
            "method": "_run_chunk.lower(arch, 'float32', keys).compile()"}


def torch_rows(shape, seeds, probe: dict) -> dict:
    """The PyTorch reference per precision (`torch_reference.py`), with its time over the
    probe's; an error row where torch is missing or fails."""
    print("torch reference:", flush=True)
    rows = {}
    for prec in PRECISIONS:
        try:
            import torch_reference
            tr = torch_reference.run(shape, seeds, prec)
        except Exception as exc:
            print(f"  torch reference failed: {exc!r}")
            tr = {"error": repr(exc)}
        if tr and "seconds_per_seed_batch" in tr:
            tr["torch_over_probe_time"] = (tr["seconds_per_seed_batch"]
                                           / probe[prec]["seconds_per_call"])
            print(f"  torch {prec:9s}: {tr['seconds_per_seed_batch']:.4f} s/seed batch, "
                  f"{tr['torch_over_probe_time']:.2f}x the probe's time", flush=True)
        rows[prec] = tr
    return rows


def memory_peak():
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        stats = None
    if not stats:
        return None
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


# ---- theory ------------------------------------------------------------------------------------
def theory_timings(shape, with_10000: bool) -> dict:
    """Theory times of bidirectional Post-LN, each configuration in a fresh single-threaded
    process (`theory_speed.time_in_fresh_process`: first call and fastest repeat), depth 12/48
    at seq_len 128, 1000/10000 at seq_len 16, and the benchmark shape itself; other Arch
    fields as the benchmark shape."""
    fields = {k: v for k, v in shape.items() if k not in ("depth", "seq_len")}
    theory = {}
    runs = [(12, 128), (48, 128), (1000, 16)] + ([(10000, 16)] if with_10000 else [])
    if not with_10000:
        theory["10000"] = {"skipped": "quick mode; use --theory-10000"}
    for depth, n in runs:
        row = theory_speed.time_in_fresh_process(depth, PLACEMENT, n, "bidirectional", fields)
        theory[str(depth)] = {"seq_len": n, "seconds": row["first_seconds"],
                              "warm_seconds": row["warm_seconds"], "finite": row["finite"]}
        print("  " + theory_speed.format_row(row), flush=True)
    row = theory_speed.time_in_fresh_process(shape["depth"], PLACEMENT, shape["seq_len"],
                                             "bidirectional", fields)
    theory["benchmark_shape"] = {"seconds": row["first_seconds"],
                                 "warm_seconds": row["warm_seconds"]}
    theory["host"] = platform.processor() or platform.machine()
    return theory


def collect_theory(child, path, shape, with_10000, probe_seconds) -> dict:
    """The theory timings: from the child process (`start_theory_process`) or, without one,
    measured now; with the probe/theory time ratio at the benchmark shape."""
    print("theory:", flush=True)
    if child is None:
        theory = theory_timings(shape, with_10000)
    else:
        child.wait()
        with open(path) as fh:
            theory = json.load(fh)
    theory["benchmark_shape"].update({
        "probe_float32_seconds_per_seed_batch": probe_seconds,
        "probe_over_theory_time": probe_seconds / theory["benchmark_shape"]["seconds"]})
    return theory


def start_theory_process(quick: bool, with_10000: bool, path: str):
    """The theory timings in a CPU-only child process, so that they run beside the device work
    (one core of the host; the child never touches the accelerator)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--theory-only", "--out", path]
    cmd += (["--quick"] if quick else []) + (["--theory-10000"] if with_10000 else [])
    return subprocess.Popen(cmd, env=env)


# ---- main --------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU / smoke test)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/<device>.json)")
    p.add_argument("--theory-10000", action="store_true",
                   help="also time the theory at depth 10000 in --quick mode")
    p.add_argument("--theory-only", action="store_true",
                   help="only the theory timings (written to --out); used by the child process")
    p.add_argument("--probe-only", action="store_true",
                   help="only the matmul peaks and the probe rows (no compile-time, PyTorch or "
                        "theory timings): fits a short device lease")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated probe variants to time beside the default scan, from "
                        + ", ".join(VARIANTS) + " (default: all)")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    quick = args.quick
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    with_10000 = not quick or args.theory_10000
    if args.theory_only:
        theory = theory_timings(shape, with_10000)
        with open(args.out, "w") as fh:
            json.dump(theory, fh)
        return theory

    dev = jax.devices()[0]
    kind = str(dev.device_kind)
    on_cpu = dev.platform == "cpu"
    seeds = 4 if quick else 8
    mm_size = 1024 if quick else (2048 if on_cpu else 8192)
    min_time = 0.3 if quick else 1.0
    repeats = 3 if quick else 5
    print(f"device {kind} ({dev.platform}), jax {jax.__version__}, "
          f"{'quick' if quick else 'full'} mode", flush=True)

    res = {"device": kind, "platform": dev.platform, "n_devices": jax.local_device_count(),
           "jax_version": jax.__version__, "numpy_version": np.__version__,
           "python": platform.python_version(), "host": platform.platform(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "mode": "quick" if quick else "full", "placement": PLACEMENT, "shape": shape,
           "seeds": seeds, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
           "flop_formula": ("3 * [depth*(2*T*(4d^2 + 2*d*d_ff) + 4*B*n^2*d) + 2*T*d*V] per seed, "
                            "T = B*n; norms/softmax/gathers not counted")}
    theory_path = tempfile.mktemp(suffix="-theory.json")
    # on an accelerator the theory (one CPU core) runs beside the device work; on a CPU it
    # would compete with the probe for the cores, so it runs afterwards
    child = (None if on_cpu or args.probe_only
             else start_theory_process(quick, with_10000, theory_path))

    print("matmul peak:", flush=True)
    res["matmul_peak"] = matmul_peak(mm_size, min_time)

    print("probe:", flush=True)
    res["probe"], info = bench_probe(shape, seeds, res["matmul_peak"], min_time, repeats,
                                     variants)
    res.update(info)
    res["peak_memory"] = memory_peak()

    if args.probe_only:
        res["compile"] = res["torch_reference"] = res["theory"] = {"skipped": "--probe-only"}
    else:
        res["compile"] = compile_times(shape, seeds)
        res["torch_reference"] = torch_rows(shape, seeds, res["probe"])
        res["theory"] = collect_theory(child, theory_path, shape, with_10000,
                                       res["probe"]["float32"]["seconds_per_call"])
        res["theory_note"] = ("first call in a fresh process (cold caches) and fastest of 3 "
                              "repeats (none after a first call over 15 s), one CPU core of "
                              "the host, other Arch "
                              "fields as the benchmark shape; depths 1000/10000 at seq_len 16, "
                              "12/48 at seq_len 128")

    print_table(res)
    out = args.out or os.path.join("benchmarks", "results",
                                   re.sub(r"[^A-Za-z0-9_.-]+", "-", kind).strip("-") + ".json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"saved {out}")
    return res


def print_table(r: dict) -> None:
    s = r["shape"]
    print()
    print(f"normfield benchmark - {r['device']} - jax {r['jax_version']} - {r['date']} "
          f"({r['mode']})")
    print(f"shape: d {s['d_model']}, heads {s['n_heads']}, d_ff {s['d_ff']}, depth {s['depth']}, "
          f"seq {s['seq_len']}, batch {s['batch_size']}, vocab {s['vocab_size']}, "
          f"{r['seeds']} seeds, {r['placement']}-LN; {r['flops_per_call'] / 1e9:.2f} GFLOP/call")
    print(f"{'precision':10s} {'peak TF/s':>10s} {'probe s/call':>13s} {'probe TF/s':>11s} "
          f"{'% peak':>7s} {'seed diff':>10s} {'prof diff':>10s} {'torch/probe':>12s}")
    for prec in PRECISIONS:
        pk, pr = r["matmul_peak"][prec], r["probe"][prec]
        tr = r["torch_reference"].get(prec) or {}
        ratio = f"{tr['torch_over_probe_time']:.2f}x" if "torch_over_probe_time" in tr else "-"
        print(f"{prec:10s} {pk['tflops']:10.3f} {pr['seconds_per_call']:13.4f} "
              f"{pr['tflops']:11.3f} {100 * pr['fraction_of_peak']:6.1f}% "
              f"{pr['max_rel_diff_vs_float32']:10.2e} "
              f"{pr['profile_max_rel_diff_vs_float32']:10.2e} {ratio:>12s}")
    print("(seed diff / prof diff: max relative difference from float32 of the per-seed norms /"
          " of sqrt(mean over seeds), over all parameters and layers)")
    for name, rows in r["probe_variants"].items():
        for prec, pr in rows.items():
            if "error" in pr:
                print(f"variant {name} {prec}: failed: {pr['error'][:200]}")
                continue
            print(f"variant {name} {prec}: {pr['seconds_per_call']:.4f} s/call "
                  f"({100 * pr['fraction_of_peak']:.1f}% of peak; scan "
                  f"{r['probe'][prec]['seconds_per_call']:.4f} s), profile diff vs float32 "
                  f"{pr['profile_max_rel_diff_vs_float32']:.2e}")
    pm = r["peak_memory"]
    print("peak device memory: " + ("null (not reported by this backend)" if pm is None else
                                    f"{pm.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB"))
    if "skipped" in r["compile"]:
        print("compile time, torch reference and theory: skipped (--probe-only)")
        return
    c = r["compile"]
    print(f"compile (float32): depth 6 {c['depth6_seconds']:.2f} s, depth 48 "
          f"{c['depth48_seconds']:.2f} s, ratio {c['ratio_48_over_6']:.2f}")
    if not any(r["torch_reference"].values()):
        print("torch reference: skipped (torch not importable)")
    th = r["theory"]
    for key in ("12", "48", "1000", "10000"):
        e = th[key]
        warm = "" if e.get("warm_seconds") is None else f", warm {e['warm_seconds']:.3f} s"
        print(f"theory depth {key:>5s}: " + (f"{e['seconds']:.2f} s first call{warm} "
                                             f"(seq {e['seq_len']})"
                                             if "seconds" in e else f"skipped: {e['skipped']}"))
    b = th["benchmark_shape"]
    print(f"theory at benchmark shape: {b['seconds']:.3f} s vs probe float32 "
          f"{b['probe_float32_seconds_per_seed_batch']:.4f} s/seed batch "
          f"-> probe/theory time {b['probe_over_theory_time']:.3g}")


if __name__ == "__main__":
    main()
