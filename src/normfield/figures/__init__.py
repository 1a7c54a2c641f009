"""Figure recipes: ``normfield figures [--quick] [--out figures/]`` calls `main`.

One module per figure (`xiong_fig3`, `xiong_lemma2`, `liu2020`, `normformer`, `hidden_growth`,
`atlas`);
each has ``make(ctx) -> list[Result]`` (figure, file stem, caption with the measured numbers).
`main` writes ``<out>/<name>.png`` and ``.pdf`` for every figure, the theory and probe profiles
as JSON in ``<out>/data/`` (one file per configuration, shared between figures and reused on a
rerun: an interrupted run resumes where it stopped), ``<out>/data/figures.json`` (which
configurations each figure uses) and all captions in ``<out>/captions.md``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

from normfield.figures.common import Context, Result, save_figure
from normfield.profile import atomic_write_text
from normfield.progress import progress

RECIPES = ("xiong_fig3", "xiong_lemma2", "liu2020", "normformer", "hidden_growth", "atlas")

__all__ = ["main", "run_recipe", "RECIPES", "Context", "Result"]


def run_recipe(name: str, ctx: Context) -> list[dict]:
    """Run one recipe and write its figures; returns one record per figure."""
    module = importlib.import_module(f"normfield.figures.{name}")
    ctx.used = []
    start = time.perf_counter()
    results = module.make(ctx)
    records = []
    for res in results:
        files = save_figure(res.fig, ctx.out, res.name)
        records.append({"figure": res.name, "recipe": name, "caption": res.caption,
                        "files": [os.path.basename(f) for f in files],
                        "configs": sorted(set(ctx.used)),
                        "seconds": time.perf_counter() - start})
    return records


def write_captions(out: str, records: list[dict], quick: bool) -> str:
    lines = [f"# normfield figures ({'quick' if quick else 'full'} mode)", ""]
    for r in records:
        lines += [f"## {r['figure']}", "", f"![{r['figure']}]({r['figure']}.png)", "",
                  r["caption"], ""]
    path = os.path.join(out, "captions.md")
    atomic_write_text(path, "\n".join(lines))
    return path


def main(quick: bool = False, out: str = "figures", recipes=RECIPES, ctx: Context | None = None) -> int:
    """Regenerate every figure into `out` (quick: small CPU-sized configurations)."""
    ctx = ctx or Context(out=out, quick=quick)
    os.makedirs(ctx.data_dir, exist_ok=True)
    start = time.perf_counter()
    records = []
    for name in progress(list(recipes), label="figures"):
        records.extend(run_recipe(name, ctx))
        print(f"{name}: done at {time.perf_counter() - start:.0f}s", file=sys.stderr)
    write_captions(ctx.out, records, quick)
    index = {r["figure"]: {k: r[k] for k in ("recipe", "caption", "files", "configs")}
             for r in records}
    atomic_write_text(os.path.join(ctx.data_dir, "figures.json"), json.dumps(index, indent=1))
    for r in records:
        print(f"{r['figure']}: {r['caption']}")
    print(f"{len(records)} figures in {time.perf_counter() - start:.0f}s "
          f"({len(ctx.computed)} configurations computed, the rest loaded from {ctx.data_dir})",
          file=sys.stderr)
    return 0
