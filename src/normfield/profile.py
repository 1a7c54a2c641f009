"""`GradProfile`: the one result type of theory and probe.

For every parameter name (canonical, shared by both sides: ``attn.q attn.k attn.v attn.o ffn.w1
ffn.w2 ffn.w3 norm1.scale ...`` per layer, and ``embed.tok embed.pos head.out final_norm.scale``
once) it holds ``sqrt(E ||dL/dW||_F^2)``: predicted by the theory, or measured as
``sqrt(mean over seeds of ||dL/dW||_F^2)`` (or its control-variate version on the token
collisions the seeds drew, `seed_moments`) with its standard error (delta method), the per-seed
squared norms and the per-seed collision counts.  Per-layer arrays have length ``depth``
(index 0 = block nearest the input); non-layer parameters have length 1.  Measurements of one
configuration made with different keys pool into one measurement over all their seeds
(`pool_seed_blocks`).

Forward statistics (`activations`) are given at the residual-stream points 0..depth (0 = the
embedding output, l = the output of block l):
``sq_norm`` = E||x||^2 / d, ``cos_within`` = mean cosine between distinct tokens of one sequence,
``cos_across`` = mean cosine between tokens of different sequences (NaN when batch_size = 1).

An encoder-decoder (``arch.decoder_depth > 0``) prefixes every name with its stack: ``enc.*``
per-layer arrays have length ``depth``, ``dec.*`` ones ``decoder_depth``; the statistics are
``enc.sq_norm`` (points 0..depth), ``dec.sq_norm`` (points 0..decoder_depth), and so on.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from normfield.arch import Arch
from normfield.data import expected_collisions

ACTIVATION_KEYS = ("sq_norm", "cos_within", "cos_across")
# Below this 1 - cosine between tokens a float32 measurement misreads the collapsed stream.
# Measured on Post-LN depth 24, d 512, seq 32, bidirectional (32 seeds, the same draws in
# float32 and float64): float32 reads 1 - cosine 0.4 / 4.4 / 20% above float64 at 2.8e-6 /
# 7.2e-7 / 1.8e-7 (an offset of 1-4e-8, a few float32 ulps of 1), and attn.q and attn.k of the
# last two layers (1 - cosine 3.6e-7 and 1.8e-7 after them) 3% and 19-20% high; every other
# parameter and point agrees within 0.01%.
FLOAT32_COSINE_FLOOR = 1e-5


def closest_tokens(activations: dict) -> tuple[float, str, int] | None:
    """``(1 - cosine, key, stream point)`` of the largest mean cosine between tokens (within or
    across sequences, any stack) in a profile's activations; None if none is finite."""
    best = None
    for key, values in activations.items():
        if not key.endswith(("cos_within", "cos_across")) or not np.any(np.isfinite(values)):
            continue
        point = int(np.nanargmax(values))
        if best is None or values[point] > best[0]:
            best = (float(values[point]), key, point)
    return None if best is None else (1.0 - best[0], best[1], best[2])


def resolution_warning(activations: dict, precision: str | None) -> str | None:
    """The warning for a measurement below float64 whose mean 1 - cosine between tokens falls
    below `FLOAT32_COSINE_FLOOR` anywhere in the stream; None otherwise."""
    closest = closest_tokens(activations)
    if precision == "float64" or closest is None or closest[0] >= FLOAT32_COSINE_FLOOR:
        return None
    gap, key, point = closest
    return (f"1 - {key} is {gap:.2g} at stream point {point}, below float32's resolution "
            f"({FLOAT32_COSINE_FLOOR:g}): with precision={precision!r} the stream statistics "
            f"and the query/key gradients there read high (by ~20% at 1.8e-7); measure with "
            f"precision='float64'")


def _arrays(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}


def _lists(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in d.items()}


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# Control variates need at least this many seeds per fitted coefficient (the "one in ten" rule
# of regression): where the covariates explain nothing, the fit inflates the intercept's
# variance by about 1 + p / (S - p - 1), under 12% in variance (5% in standard error) here.
SEEDS_PER_COEFFICIENT = 10


def control_covariates(arch: Arch, per_seed_collisions: dict | None) -> dict | None:
    """The control variates of `seed_moments`: the seeds' token collision counts
    (`probe.measure.collisions`) minus their exact expectations (`data.expected_collisions`).

    Two kinds: the targets' collisions over all pairs of positions (``targets``: the loss's
    logit-gradient kernel has the term ``1[y_i = y_j]`` at every pair, within a sequence or
    across), and each input array's collisions within a sequence (``tokens.within``, and an
    encoder-decoder's ``source.within``: the input tokens meet through attention, inside a
    sequence).  Input collisions across sequences reach the gradients only through the
    across-sequence kernel: as a covariate they explain nothing measurable (the medium and
    coverage grids) and each unneeded coefficient costs variance."""
    if not per_seed_collisions:
        return None
    expected = expected_collisions(arch)
    centred = {n: np.asarray(v, np.float64) - expected[n] for n, v in per_seed_collisions.items()}
    out = {"targets": centred["targets.within"] + centred["targets.across"]}
    out.update({n: z for n, z in centred.items()
                if n.endswith(".within") and not n.startswith("targets")})
    return out


def _design(covariates: dict | None, seeds: int) -> tuple[np.ndarray | None, list[str]]:
    """``[1, z_1, ..., z_p]`` over the covariates that vary across the seeds, or None when there
    are none, fewer than `SEEDS_PER_COEFFICIENT` seeds per coefficient (30 seeds for the usual
    two covariates), or collinear ones."""
    used = [n for n, z in (covariates or {}).items() if np.ptp(z) > 0]
    if not used or seeds < SEEDS_PER_COEFFICIENT * (len(used) + 1):
        return None, []
    design = np.column_stack([np.ones(seeds)] + [covariates[n] for n in used])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return None, []
    return design, used


def seed_moments(per_seed_sq: dict, covariates: dict | None = None) -> tuple[dict, dict, str]:
    """``sqrt(E||dL/dW||^2)`` per parameter from per-seed squared norms ((seeds, layers)
    arrays), its standard error by the delta method, ``se(mean) / (2 sqrt(mean))`` (NaN from a
    single seed), and the name of the estimator of the mean.

    Without `covariates` the mean over seeds.  With them (per-seed statistics minus their exact
    expectations, `control_covariates`: what the batch's tokens and targets drew) the
    control-variate estimate: the intercept of the least-squares fit ``sq ~ 1 + z`` (E z = 0,
    so the intercept estimates E sq; e.g. Glasserman 2003, "Monte Carlo Methods in Financial
    Engineering", section 4.1), its standard error the fit's, ``s^2 [(X^T X)^-1]_00``.  It
    removes the share of the seed-to-seed variance that the draw of token collisions explains
    (head.out of a Zipfian batch: its squared norm and the target collisions correlate at
    0.99).  Covariates that do not vary are dropped; with fewer than `SEEDS_PER_COEFFICIENT`
    seeds per coefficient the plain mean is used; an intercept <= 0 (a nonnegative quantity)
    falls back to the mean for that entry."""
    names = list(per_seed_sq)
    seeds = per_seed_sq[names[0]].shape[0] if names else 0
    design, used = _design(covariates, seeds)
    if design is not None:
        inv00 = np.linalg.inv(design.T @ design)[0, 0]  # the intercept's variance per unit s^2
    grads, stderr = {}, {}
    for name in names:
        sq = per_seed_sq[name]
        mean = sq.mean(axis=0)
        se_mean = (sq.std(axis=0, ddof=1) / np.sqrt(seeds) if seeds > 1
                   else np.full_like(mean, np.nan))
        if design is not None:
            coef, *_ = np.linalg.lstsq(design, sq, rcond=None)
            resid = sq - design @ coef
            var = np.sum(resid * resid, axis=0) / (seeds - design.shape[1])
            se_fit = np.sqrt(var * inv00)
            ok = coef[0] > 0
            mean, se_mean = np.where(ok, coef[0], mean), np.where(ok, se_fit, se_mean)
        grads[name] = np.sqrt(mean)
        stderr[name] = se_mean / (2.0 * np.sqrt(np.maximum(mean, 1e-300)))
    estimator = "control variates: " + ", ".join(used) if used else "mean"
    return grads, stderr, estimator


@dataclass
class GradProfile:
    arch: Arch
    source: str  # "theory" or "probe"
    grads: dict[str, np.ndarray]
    activations: dict[str, np.ndarray]
    stderr: dict[str, np.ndarray] | None = None
    per_seed_sq: dict[str, np.ndarray] | None = None
    per_seed_collisions: dict[str, np.ndarray] | None = None
    activations_stderr: dict[str, np.ndarray] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grads = _arrays(self.grads)
        self.activations = _arrays(self.activations)
        self.stderr = _arrays(self.stderr)
        self.per_seed_sq = _arrays(self.per_seed_sq)
        self.per_seed_collisions = _arrays(self.per_seed_collisions)
        self.activations_stderr = _arrays(self.activations_stderr)

    # ---- access ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.grads)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.grads:
            raise KeyError(f"no parameter {name!r} in this profile; it has: {', '.join(self.grads)}")
        return self.grads[name]

    def layer_names(self) -> list[str]:
        from normfield.placements import layer_params

        return [n for n in layer_params(self.arch) if n in self.grads]

    def to_rows(self) -> list[dict]:
        """One dict per (parameter, layer): ``name, layer, grad_norm, stderr, source``;
        ``layer`` is None for non-layer parameters.  Ready for ``csv.DictWriter`` or pandas."""
        layered = set(self.layer_names())
        rows = []
        for name, values in self.grads.items():
            errs = self.stderr.get(name) if self.stderr else None
            for i, v in enumerate(values):
                rows.append({"name": name, "layer": i if name in layered else None,
                             "grad_norm": float(v),
                             "stderr": float(errs[i]) if errs is not None else None,
                             "source": self.source})
        return rows

    # ---- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "source": self.source, "grads": _lists(self.grads),
                "activations": _lists(self.activations), "stderr": _lists(self.stderr),
                "per_seed_sq": _lists(self.per_seed_sq),
                "per_seed_collisions": _lists(self.per_seed_collisions),
                "activations_stderr": _lists(self.activations_stderr), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> "GradProfile":
        data = dict(data)
        return cls(arch=Arch.from_dict(data.pop("arch")), **data)

    def save(self, path: str) -> None:
        """Save as JSON (no pickle), atomically.  NaN is written as JSON ``NaN``."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str) -> "GradProfile":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


def pool_seed_blocks(blocks: list[GradProfile]) -> GradProfile:
    """One measurement over all the seeds of independent seed blocks of one configuration
    (probe profiles of the same arch and precision, measured with distinct keys): the per-seed
    squared norms (and collision counts, where every block has them) are concatenated, so the
    norms and standard errors are those of a single measurement over every seed.  Stream
    statistics (kept as per-block means) are pooled as the seed-weighted mean of the block
    means, with standard error
    ``sqrt(sum_b (s_b se_b)^2) / sum_b s_b``.  A single block is returned as it is.
    ValueError for an empty list, a block without per-seed norms, mixed archs or precisions,
    or a repeated key."""
    if not blocks:
        raise ValueError("invalid blocks=[]: expected at least one probe profile")
    first = blocks[0]
    if len(blocks) == 1:
        return first
    for p in blocks:
        if p.source != "probe" or p.per_seed_sq is None:
            raise ValueError(f"invalid block source={p.source!r}: expected probe profiles with "
                             "per-seed squared norms")
        if p.arch != first.arch:
            raise ValueError(f"invalid block arch={p.arch!r}: expected every block to measure "
                             f"{first.arch!r}")
        if p.meta.get("precision") != first.meta.get("precision"):
            raise ValueError(f"invalid block precision={p.meta.get('precision')!r}: expected "
                             f"{first.meta.get('precision')!r} like the first block")
    keys = [p.meta.get("key") for p in blocks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"invalid block keys={keys!r}: expected distinct keys (independent "
                         "seed blocks)")
    per_seed = {n: np.concatenate([p.per_seed_sq[n] for p in blocks]) for n in first.per_seed_sq}
    coll = None
    if all(p.per_seed_collisions for p in blocks):
        coll = {n: np.concatenate([p.per_seed_collisions[n] for p in blocks])
                for n in first.per_seed_collisions}
    grads, stderr, estimator = seed_moments(per_seed, control_covariates(first.arch, coll))
    counts = np.array([p.meta["seeds"] for p in blocks], float)
    total = counts.sum()
    acts = {k: sum(c * p.activations[k] for c, p in zip(counts, blocks)) / total
            for k in first.activations}
    acts_se = {k: np.sqrt(sum((c * p.activations_stderr[k]) ** 2
                              for c, p in zip(counts, blocks))) / total
               for k in (first.activations_stderr or {})}
    meta = {**first.meta, "seeds": int(total), "key": keys, "estimator": estimator,
            "seconds": sum(p.meta.get("seconds", 0.0) for p in blocks)}
    meta.pop("precision_warning", None)
    warning = resolution_warning(acts, first.meta.get("precision"))
    if warning:
        meta["precision_warning"] = warning
    return GradProfile(arch=first.arch, source="probe", grads=grads, stderr=stderr,
                       per_seed_sq=per_seed, per_seed_collisions=coll, activations=acts,
                       activations_stderr=acts_se, meta=meta)
