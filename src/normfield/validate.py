"""`normfield validate`: theory against probe over a grid of architectures, as an error table.

For every configuration the probe measures ``sqrt(mean_seeds ||dL/dW||^2)`` with its standard
error and the theory predicts the same number; the relative error ``theory / measured - 1`` is
tabulated per parameter and layer.  The summary prints, per placement / mask / parameter, the
median, 95th-percentile and worst |relative error| next to the median measurement standard
error, and the RMS error beyond the measurement noise (`beyond_noise`), the estimate of the
theory's own error once the theory is good enough for the median |error| to be mostly noise;
and both per d_model (the theory is leading order in 1/width: its error should shrink as
width grows).

Measurements are made of independent seed blocks (`seed_blocks`: 32 seeds, keys 0, 1, ...),
each saved as soon as it exists (atomic JSON, resumable) under ``out/`` and pooled
(`profile.pool_seed_blocks`), so that raising a grid's seed count measures only the new
blocks; the theory is recomputed on every run (it is cheap, and a cached prediction would go
stale when the theory changes); the rows go to ``out/errors.csv``.

A configuration whose tokens the theory predicts to collapse below float32's resolution
(`measurement_precision`) is measured in float64: the float32 draws computed in float64.
"""

from __future__ import annotations

import csv
import itertools
import os
import time

import numpy as np

from normfield.arch import Arch, check_int, group_of
from normfield.probe.measure import measure_sweep
from normfield.profile import (FLOAT32_COSINE_FLOOR, GradProfile, atomic_write_text,
                               closest_tokens, pool_seed_blocks)
from normfield.progress import progress
from normfield.theory.predict import predict

QUICK_GRID = dict(placement=("post", "pre"), mask=("bidirectional",), activation=("relu",),
                  depth=(2, 6), d_model=(64, 128), seq_len=(16,), seeds=32)
MEDIUM_GRID = dict(placement=("post", "pre"), mask=("bidirectional", "causal"),
                   activation=("relu",), depth=(6, 12, 24), d_model=(256, 512), seq_len=(32,),
                   seeds=96)
COVERAGE_SEEDS = 64
FULL_GRID = dict(placement=("post", "pre"), mask=("bidirectional", "causal"),
                 activation=("relu", "gelu"), depth=(2, 6, 12, 24, 48),
                 d_model=(128, 256, 512, 1024), seq_len=(16, 64, 256), seeds=64)
# A sample of the full grid (d_model >= 256, depth <= 24, where the accuracy bar applies) along
# the axes the medium grid keeps fixed: seq_len 64 and 256, GELU, d_model 1024, depth 24 with GELU.
SAMPLE_GRIDS = (
    dict(placement=("post", "pre"), mask=("bidirectional", "causal"), activation=("relu", "gelu"),
         depth=(12,), d_model=(256,), seq_len=(64,)),
    dict(placement=("post", "pre"), mask=("bidirectional", "causal"), activation=("relu",),
         depth=(12,), d_model=(512,), seq_len=(256,)),
    dict(placement=("post", "pre"), mask=("bidirectional",), activation=("relu",), depth=(12,),
         d_model=(1024,), seq_len=(64,)),
    dict(placement=("post", "pre"), mask=("causal",), activation=("gelu",), depth=(24,),
         d_model=(512,), seq_len=(16,)),
)
SAMPLE_SEEDS = 64
SUMMARY_GROUPS = (("attn.v", "attn.o", "ffn.w1", "ffn.w2", "embed.tok", "head.out"),
                  ("attn.q", "attn.k"))


def grid_archs(grid: dict, **fixed) -> list[Arch]:
    keys = ("placement", "mask", "activation", "depth", "d_model", "seq_len")
    archs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        kw = dict(zip(keys, values))
        d = kw["d_model"]
        archs.append(Arch(n_heads=max(1, d // 64), d_ff=4 * d, batch_size=2,
                          vocab_size=512, **kw, **fixed))
    return archs


def sample_archs() -> list[Arch]:
    """The configurations of `SAMPLE_GRIDS` (each a member of the full grid)."""
    return [a for grid in SAMPLE_GRIDS for a in grid_archs(grid)]


COVERAGE_BASE = dict(depth=6, d_model=256, n_heads=4, d_ff=1024, seq_len=32, batch_size=2,
                     vocab_size=512)
COVERAGE_VARIANTS = (
    dict(placement="peri"), dict(placement="normformer"), dict(placement="deepnorm"),
    dict(placement="mixln", depth=8), dict(placement="lns"), dict(placement="scaled_pre"),
    dict(placement="pre", norm="rmsnorm"), dict(placement="pre", activation="gelu"),
    dict(placement="pre", activation="swiglu"), dict(placement="post", activation="gelu"),
    dict(placement="pre", positions="rope", mask="causal"), dict(placement="pre", qk_norm=True),
    dict(placement="pre", qk_norm=True, qk_temperature=12.0),
    dict(placement="pre", positions="learned"),
    dict(placement="post", decoder_depth=6), dict(placement="pre", decoder_depth=6),
    dict(placement="deepnorm", decoder_depth=6), dict(placement="b2t"),
    dict(placement="b2t", mask="causal"), dict(placement="b2t", decoder_depth=6),
    dict(placement="post"), dict(placement="post", mask="causal"),
    dict(placement="post", tokens="zipf"), dict(placement="pre", tokens="zipf"),
    dict(placement="post", mask="causal", tokens="zipf"))


COVERAGE_PRESETS = ("gpt2", "llama", "torch_encoder_layer", "gpt1", "bert", "vaswani2017",
                    "fairseq_iwslt")


def coverage_archs() -> list[Arch]:
    """One configuration per architecture feature (placements, norms, activations, positions,
    QK-Norm and its temperature, encoder-decoder stacks) and the presets (their own init
    schemes, biases, tied heads) at d_model 256, depth 6 (8 for Mix-LN, so that it has a
    Post-LN part; encoder-decoders 6 + 6); B2T, whose skip adds correlated operands, as an
    encoder, a causal stack and an encoder-decoder, beside plain Post-LN of the same shapes;
    Post-LN (bidirectional and causal) and Pre-LN with Zipfian tokens (repeated tokens: the
    embedding gradient's same-token pairs)."""
    from normfield import presets

    sizes = {k: v for k, v in COVERAGE_BASE.items() if k != "d_ff"}
    return ([Arch(**{**COVERAGE_BASE, **v}) for v in COVERAGE_VARIANTS]
            + [presets.get(name, **sizes) for name in COVERAGE_PRESETS])


def variant(arch: Arch) -> str:
    """Short tag of the features that distinguish a configuration beyond the grid axes."""
    tags = [f"encdec{arch.decoder_depth}"] if arch.decoder_depth else []
    tags.append(arch.activation)
    if arch.norm != "layernorm":
        tags.append(arch.norm)
    if arch.positions != "sinusoidal":
        tags.append(arch.positions)
    if arch.tokens != "uniform":
        tags.append(arch.tokens if arch.zipf_exponent == 1.0 else f"zipf{arch.zipf_exponent:g}")
    if arch.embed_norm:
        tags.append("embnorm")
    if arch.qk_norm:
        tags.append("qknorm" if arch.qk_temperature is None else f"qknorm{arch.qk_temperature:g}")
    if arch.init.scheme != "xavier_normal":
        tags.append(arch.init.scheme)
    if arch.init.gains:
        tags.append("gains")
    if arch.tied_head:
        tags.append("tied")
    if arch.bias:
        tags.append("bias")
    return "-".join(tags)


def config_name(arch: Arch) -> str:
    return (f"{arch.placement}-{arch.mask}-{variant(arch)}-L{arch.depth}-d{arch.d_model}"
            f"-n{arch.seq_len}-b{arch.batch_size}")


STREAM_STATS = {"sq_norm": "stream.sq_norm", "cos_within": "stream.1-cos_within",
                "cos_across": "stream.1-cos_across"}


def _row(a: Arch, name: str, group: str, layer: int, t: float, m: float, se: float) -> dict:
    return {"config": config_name(a), "placement": a.placement, "mask": a.mask,
            "activation": a.activation, "variant": variant(a), "depth": a.depth,
            "d_model": a.d_model, "seq_len": a.seq_len, "param": name, "group": group,
            "layer": layer, "theory": float(t), "measured": float(m),
            "rel_err": float(t / m - 1.0), "rel_se": float(se / m)}


def compare(theory: GradProfile, measured: GradProfile) -> list[dict]:
    """One row per (parameter, layer): relative error and relative standard error; then one
    row per residual-stream point for E||x||^2/d and for 1 - cosine (within and across
    sequences; the distance from collapse, the quantity the attention gradients follow),
    named ``stream.*`` (``enc.stream.*``, ``dec.stream.*``; `layer` = stream point)."""
    a = measured.arch
    rows = []
    for name, values in measured.grads.items():
        if name not in theory.grads or name.endswith(".bias"):
            continue
        for layer, (t, m, se) in enumerate(zip(theory.grads[name], values, measured.stderr[name])):
            rows.append(_row(a, name, group_of(name), layer, t, m, se))
    for key, values in measured.activations.items():
        stat = next((s for s in STREAM_STATS if key.endswith(s)), None)
        prefix = key[: -len(stat)] if stat else ""
        errs = (measured.activations_stderr or {}).get(key, np.full(len(values), np.nan))
        for point, (t, m, se) in enumerate(zip(theory.activations[key], values, errs)):
            if stat != "sq_norm":
                t, m = 1.0 - t, 1.0 - m
            if np.isfinite(m) and m > 0:
                rows.append(_row(a, prefix + STREAM_STATS[stat], STREAM_STATS[stat], point,
                                 t, m, se))
    return rows


SEED_BLOCK = 32


def seed_blocks(seeds: int) -> list[tuple[int, int]]:
    """(seeds, key) of the independent blocks a measurement of `seeds` seeds is made of: one
    block up to SEED_BLOCK seeds, else SEED_BLOCK-seed blocks with keys 0, 1, 2, ... (so that
    raising a grid's seed count adds blocks and keeps the measured ones)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1 or (
            seeds > SEED_BLOCK and seeds % SEED_BLOCK):
        raise ValueError(f"invalid seeds={seeds!r}: expected an integer from 1 to {SEED_BLOCK} "
                         f"or a multiple of {SEED_BLOCK}")
    if seeds <= SEED_BLOCK:
        return [(seeds, 0)]
    return [(SEED_BLOCK, k) for k in range(seeds // SEED_BLOCK)]


MEASURED_PRECISIONS = ("float32", "float64")  # the two `measurement_precision` chooses from


def measurement_precision(theory: GradProfile) -> str:
    """``"float64"`` when the predicted 1 - cosine between tokens (within or across sequences,
    any stream point of any stack) falls below `profile.FLOAT32_COSINE_FLOOR`, else
    ``"float32"``."""
    closest = closest_tokens(theory.activations)
    return "float64" if closest and closest[0] < FLOAT32_COSINE_FLOOR else "float32"


def block_path(out: str, arch: Arch, seeds: int, key: int, precision: str = "float32") -> str:
    """The cache file of one seed block; float64 blocks carry the precision in their name."""
    tag = "" if precision == "float32" else f"-{precision}"
    return os.path.join(out, f"{config_name(arch)}-s{seeds}-k{key}{tag}.json")


def run_grid(archs: list[Arch], seeds: int, out: str, cached_only: bool = False,
             chunk: int = 16) -> list[dict]:
    """Measure (or load) every configuration and compare it with the theory.  A measurement is
    made of the seed blocks of `seed_blocks` (one file each, so measurements resume and a larger
    seed count reuses the blocks measured before), pooled by `pool_seed_blocks`; blocks not
    measured yet go through `measure_sweep` (one configuration per local device at a time),
    each saved as soon as it is fetched.  With `cached_only` nothing is measured and a
    configuration is compared on the blocks it has (merging the shards of a job array); each
    row records its seed count.  `chunk`: seeds per compiled call (memory grows with it: per
    seed, the parameters and their gradients; d_model 1024 at depth 12 needs chunk 4 in 24 GB
    of host memory)."""
    os.makedirs(out, exist_ok=True)
    blocks = seed_blocks(seeds)
    theories = [predict(a) for a in archs]
    precisions = [measurement_precision(t) for t in theories]
    for n, key in blocks:
        for precision in sorted(set(precisions)):
            missing = [] if cached_only else [
                a for a, p in zip(archs, precisions)
                if p == precision and not os.path.exists(block_path(out, a, n, key, p))]
            sweep = measure_sweep(missing, seeds=n, key=key, chunk=min(n, chunk),
                                  precision=precision)
            for arch, measured in progress(zip(missing, sweep), total=len(missing),
                                           label=f"measure k{key} {precision}"):
                measured.save(block_path(out, arch, n, key, precision))
    rows = []
    for arch, theory, precision in progress(zip(archs, theories, precisions), total=len(archs),
                                            label="validate"):
        found = [block_path(out, arch, n, key, precision) for n, key in blocks]
        found = [GradProfile.load(f) for f in found if os.path.exists(f)]
        if found:
            measured = pool_seed_blocks(found)
            rows.extend(dict(r, seeds=measured.meta["seeds"], precision=precision)
                        for r in compare(theory, measured))
    return rows


def unmeasured(archs: list[Arch], rows: list[dict], seeds: int, out: str) -> list[str]:
    """The configurations of `archs` without a row (no seed block at the precision
    `measurement_precision` now asks for), one line each, naming the precision of any blocks
    they do have: after a theory change moves a configuration's predicted collapse across
    `profile.FLOAT32_COSINE_FLOOR`, its old blocks no longer count, and a merge must say so
    rather than leave the configuration out of the table unannounced."""
    seen = {r["config"] for r in rows}
    lines = []
    for arch in archs:
        name = config_name(arch)
        if name in seen:
            continue
        other = [p for p in MEASURED_PRECISIONS
                 if any(os.path.exists(block_path(out, arch, n, key, p))
                        for n, key in seed_blocks(seeds))]
        lines.append(f"{name}: " + (f"only {' and '.join(other)} blocks (the theory now asks "
                                    f"for the other precision)" if other else "no blocks"))
    return lines


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N) with 0 <= I < N: this process runs the configurations of shard I of
    N (`shard_configs`)."""
    if text is None:
        return None
    index, _, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(f"invalid shard={text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


def probe_cost(arch: Arch) -> float:
    """A measurement's relative cost, to balance shards: multiply-adds per sequence of the
    forward pass, ``layers n d (4 d + 2 d_ff + 2 n)`` (four d x d projections, two FFN
    matrices, the attention's two n x n products) plus the head's ``n d vocab``."""
    n, d = arch.seq_len, arch.d_model
    layers = arch.depth + arch.decoder_depth
    return float(layers * n * d * (4 * d + 2 * arch.d_ff + 2 * n) + n * d * arch.vocab_size)


def shard_configs(archs: list[Arch], index: int, count: int) -> list[Arch]:
    """The configurations of shard `index` of `count`, in grid order: each configuration in
    exactly one shard, the shards' total `probe_cost` balanced (largest first, each to the
    shard with the least so far, ties to the lower index).  Taking every count-th
    configuration instead gave one shard of the medium grid all the d_model 512 ones."""
    loads = [0.0] * count
    owner = {}
    for i in sorted(range(len(archs)), key=lambda i: (-probe_cost(archs[i]), i)):
        shard = min(range(count), key=lambda k: (loads[k], k))
        owner[i] = shard
        loads[shard] += probe_cost(archs[i])
    return [a for i, a in enumerate(archs) if owner[i] == index]


def _stats(rows: list[dict]) -> tuple[float, float, float, float, float]:
    """Median, 95th percentile and worst |relative error|, the median relative standard error,
    and the error beyond noise (`beyond_noise`)."""
    err = np.abs([r["rel_err"] for r in rows])
    se = np.array([r["rel_se"] for r in rows])
    return (float(np.median(err)), float(np.percentile(err, 95)), float(err.max()),
            float(np.median(se)), beyond_noise(rows))


def beyond_noise(rows: list[dict]) -> float:
    """RMS relative error of the theory beyond the measurement noise,
    ``sqrt(max(0, mean(err^2 - se^2)))``: ``E[err^2] = bias^2 + se^2`` for an unbiased
    measurement, so this estimates the RMS bias whatever the correlations between rows (the
    errors of one configuration share each seed's backward pass and move together, which makes
    the median |error| of a noisy grid mostly noise; correlations only widen this estimate's
    own scatter).  0 when the errors are all explained by noise."""
    err = np.array([r["rel_err"] for r in rows])
    se = np.array([r["rel_se"] for r in rows])
    return float(np.sqrt(max(0.0, np.mean(err ** 2 - se ** 2))))


def summarize(rows: list[dict]) -> str:
    """The printed error table (percent)."""
    lines = [f"{'placement':10s} {'mask':13s} {'variant':14s} {'params':24s} {'n':>5s} "
             f"{'median':>7s} {'p95':>7s} {'worst':>7s} {'med.se':>7s} {'beyond':>7s}"]
    keys = sorted({(r["placement"], r["mask"], r["variant"]) for r in rows})
    for (placement, mask, var), params in itertools.product(keys, SUMMARY_GROUPS):
        sel = [r for r in rows if (r["placement"], r["mask"], r["variant"]) == (placement, mask, var)
               and r["group"] in params]
        if sel:
            med, p95, worst, se, beyond = _stats(sel)
            lines.append(f"{placement:10s} {mask:13s} {var:14s} {' '.join(params):24.24s} "
                         f"{len(sel):5d} {100 * med:6.2f}% {100 * p95:6.2f}% {100 * worst:6.2f}% "
                         f"{100 * se:6.2f}% {100 * beyond:6.2f}%")
    lines.append("(beyond: RMS error beyond the measurement noise, sqrt(mean(err^2 - se^2)))")
    lines.append("")
    lines.append("residual stream (median / worst |error| over the stream points, %):")
    for placement, mask, var in keys:
        cells = []
        for stat in STREAM_STATS.values():
            sel = [r for r in rows if (r["placement"], r["mask"], r["variant"])
                   == (placement, mask, var) and r["group"] == stat]
            if sel:
                med, _, worst, _, _ = _stats(sel)
                cells.append(f"{stat[len('stream.'):]} {100 * med:5.1f}/{100 * worst:5.1f}")
        if cells:
            lines.append(f"  {placement:10s} {mask:13s} {var:14s} " + "  ".join(cells))
    lines.append("")
    lines.append("per parameter and depth (median / worst |error|, %):")
    for placement, param in sorted({(r["placement"], r["param"]) for r in rows}):
        cells = []
        for depth in sorted({r["depth"] for r in rows}):
            sel = [r for r in rows if r["placement"] == placement and r["param"] == param
                   and r["depth"] == depth]
            if sel:
                med, _, worst, _, _ = _stats(sel)
                cells.append(f"L{depth}: {100 * med:5.1f}/{100 * worst:5.1f}")
        lines.append(f"  {placement:10s} {param:18s} " + "  ".join(cells))
    lines.append("")
    lines.append("error trend with width over all parameters and layers, %: median |error| "
                 "(median se) / beyond noise:")
    for placement in sorted({r["placement"] for r in rows}):
        for group in SUMMARY_GROUPS:
            cells = []
            for d in sorted({r["d_model"] for r in rows}):
                sel = [r for r in rows if r["placement"] == placement and r["d_model"] == d
                       and r["group"] in group]
                if sel:
                    med, _, _, se, beyond = _stats(sel)
                    cells.append(f"d={d}: {100 * med:5.2f} ({100 * se:4.2f}) / {100 * beyond:4.2f}")
            lines.append(f"  {placement:10s} {group[0]:8s}... " + "  ".join(cells))
    return "\n".join(lines)


GRIDS = {"quick": QUICK_GRID, "medium": MEDIUM_GRID, "full": FULL_GRID, "sample": None,
         "coverage": None}


def grid_configs(name: str) -> tuple[list[Arch], int]:
    """The configurations of the grid `name` and its default seed count."""
    if name not in GRIDS:
        raise ValueError(f"invalid grid={name!r}: expected one of {', '.join(GRIDS)}")
    if name == "coverage":
        return coverage_archs(), COVERAGE_SEEDS
    if name == "sample":
        return sample_archs(), SAMPLE_SEEDS
    return grid_archs(GRIDS[name]), GRIDS[name]["seeds"]


def markdown_table(rows: list[dict]) -> str:
    """Compact Markdown table: per placement / mask / variant, median, 95th percentile and
    worst |error| (%) of the main parameters and of attn.q / attn.k, the median se, and the
    error beyond noise (`beyond_noise`) of both groups."""
    lines = ["| placement | mask | variant | main median | main p95 | main worst | q/k median "
             "| q/k worst | median se | main beyond noise | q/k beyond noise |",
             "|" + "---|" * 11]
    for key in sorted({(r["placement"], r["mask"], r["variant"]) for r in rows}):
        groups = [[r for r in rows if (r["placement"], r["mask"], r["variant"]) == key
                   and r["group"] in params] for params in SUMMARY_GROUPS]
        if not groups[0] or not groups[1]:
            continue
        main_stats, qk_stats = _stats(groups[0]), _stats(groups[1])
        cells = [main_stats[0], main_stats[1], main_stats[2], qk_stats[0], qk_stats[2],
                 main_stats[3], main_stats[4], qk_stats[4]]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     + " | ".join(f"{100 * c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main(quick: bool = False, out: str | None = None, seeds: int | None = None,
         grid: str | None = None, shard: str | None = None, merge: bool = False,
         chunk: int = 16) -> int:
    """Run a grid: `quick`, `medium` (the issue's d >= 256 bar on a CPU budget), `full`,
    `sample` (`SAMPLE_GRIDS`: the full grid's other axes at d >= 256) or `coverage` (one
    configuration per architecture feature); `out` defaults to
    ``results/validation-<grid>`` so that grids keep their own summaries.

    For a job array, run ``shard="I/N"`` for I = 0..N-1 (each writes its measurements to the
    shared `out`), then ``merge=True`` to compare everything measured so far."""
    name = grid or ("quick" if quick else "full")
    archs, default_seeds = grid_configs(name)
    out = out or f"results/validation-{name}"
    part = parse_shard(shard)
    if part:
        archs = shard_configs(archs, *part)
    seeds = default_seeds if seeds is None else seeds
    seed_blocks(seeds)  # ValueError for a bad seed count before any work
    check_int("chunk", chunk, 1)
    start = time.perf_counter()
    rows = run_grid(archs, seeds, out, cached_only=merge, chunk=chunk)
    if not rows:
        raise ValueError(f"no measurements under out={out!r} for grid={name!r}: run the shards first")
    with open(os.path.join(out, "errors.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summarize(rows)
    atomic_write_text(os.path.join(out, "summary.txt"), table + "\n")
    atomic_write_text(os.path.join(out, "summary.md"), markdown_table(rows) + "\n")
    print(table)
    missing = unmeasured(archs, rows, seeds, out)
    if missing:
        print(f"\n{len(missing)} of {len(archs)} configurations not in the table (run without "
              f"--merge to measure them):\n  " + "\n  ".join(missing))
    counts = sorted({r["seeds"] for r in rows})
    per_config = (f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}")
    print(f"\n{len(rows)} rows from {len({r['config'] for r in rows})} configurations, "
          f"{per_config} seeds each, {time.perf_counter() - start:.0f} s; saved under {out}/")
    return 0
