"""Shared machinery of the figure recipes: the cached theory/probe runs and figure saving.

Every theory or probe result is saved as ``<out>/data/<config-name>.json`` (via the atomic
`GradProfile.save`); the config name is derived from the source, the Arch and (for the probe)
the seed count and key.  Probe results are reused: two recipes asking for the same
configuration share one measurement, and a rerun after an interruption loads what is already
there.  Theory results are recomputed on every run (they are cheap and must follow the theory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from normfield.arch import Arch, Init
from normfield.probe.measure import measure_grad_norms
from normfield.profile import GradProfile
from normfield.theory.predict import predict

QUICK_D = 128
# Quick mode: one small shape for every recipe (so probe configurations are shared between
# figures), fairseq-style embeddings N(0, d^-1/2) * sqrt(d).
QUICK_BASE = dict(d_model=QUICK_D, n_heads=4, d_ff=256, seq_len=16, batch_size=2,
                  embed_scale=math.sqrt(QUICK_D), init=Init(embed_std=QUICK_D ** -0.5))


def fairseq_base(d_model: int, n_heads: int, d_ff: int, seq_len: int = 64,
                 batch_size: int = 4) -> dict:
    return dict(d_model=d_model, n_heads=n_heads, d_ff=d_ff, seq_len=seq_len,
                batch_size=batch_size, embed_scale=math.sqrt(d_model),
                init=Init(embed_std=d_model ** -0.5))


@dataclass
class Result:
    """One figure of a recipe: file stem, matplotlib Figure, caption (with numbers)."""

    name: str
    fig: object
    caption: str
    configs: list = field(default_factory=list)


@dataclass
class Context:
    """What a recipe needs: where to cache, quick or full sizes, probe seeds.

    `base` (if given) replaces every recipe's architecture sizes (tests use a tiny one);
    `max_depth` caps every depth a recipe asks for.
    """

    out: str
    quick: bool = True
    seeds: int | None = None
    base: dict | None = None
    max_depth: int | None = None
    key: int = 0
    used: list = field(default_factory=list)
    computed: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.seeds is None:
            self.seeds = 4 if self.quick else 32

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out, "data")

    def fields(self, full: dict) -> dict:
        """Architecture fields for a recipe: `base` if set, quick shape, else `full`."""
        if self.base is not None:
            return dict(self.base)
        return dict(QUICK_BASE) if self.quick else dict(full)

    def depth(self, depth: int) -> int:
        return min(depth, self.max_depth) if self.max_depth else depth

    def arch(self, depth: int, placement: str, fields: dict) -> Arch:
        return Arch(depth=self.depth(depth), placement=placement, **fields)

    # ---- cached runs ---------------------------------------------------------------------
    def config_name(self, source: str, arch: Arch) -> str:
        """``<source>-<placement>-L<depth>-d<d_model>-<digest>``; the digest hashes the Arch
        fields that differ from their defaults (so that a new field with a default leaves
        every cached name unchanged), and for the probe the seed count and key."""
        default = Arch(depth=arch.depth, placement=arch.placement).to_dict()
        fields = {k: v for k, v in arch.to_dict().items() if v != default[k]}
        spec = {"source": source, "arch": {**fields, "depth": arch.depth,
                                           "placement": arch.placement}}
        if source == "probe":
            spec.update(seeds=self.seeds, key=self.key)
        digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        return f"{source}-{arch.placement}-L{arch.depth}-d{arch.d_model}-{digest}"

    def _cached(self, source: str, arch: Arch, compute) -> GradProfile:
        name = self.config_name(source, arch)
        path = os.path.join(self.data_dir, name + ".json")
        self.used.append(name)
        if os.path.exists(path):
            try:
                prof = GradProfile.load(path)
                if prof.arch == arch and prof.source == source:
                    return prof
            except (ValueError, KeyError, TypeError):
                pass  # unreadable: recompute
        prof = compute()
        prof.save(path)
        self.computed.append(name)
        return prof

    def theory(self, arch: Arch) -> GradProfile:
        """Recomputed on every run (milliseconds to seconds; a cached prediction would go
        stale when the theory changes) and saved beside the figures."""
        name = self.config_name("theory", arch)
        self.used.append(name)
        prof = predict(arch)
        prof.meta.pop("seconds", None)  # keep the saved data byte-stable across reruns
        prof.save(os.path.join(self.data_dir, name + ".json"))
        return prof

    def probe(self, arch: Arch) -> GradProfile:
        return self._cached("probe", arch,
                            lambda: measure_grad_norms(arch, seeds=self.seeds, key=self.key))


def new_figure(nrows: int = 1, ncols: int = 1, size=(6.0, 4.2), **kw):
    """A pyplot-free Figure (no global state, nothing shown) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_figure(fig, out: str, name: str) -> list[str]:
    """Write ``<out>/<name>.png`` and ``.pdf`` (atomically: temporary file, then rename)."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for ext, kw in (("png", {"dpi": 130}), ("pdf", {})):
        path = os.path.join(out, f"{name}.{ext}")
        tmp = os.path.join(out, f".tmp-{name}.{ext}")
        fig.savefig(tmp, format=ext, metadata={"CreationDate": None} if ext == "pdf" else None,
                    **kw)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")
