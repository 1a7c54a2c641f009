"""normfield.figures: one tiny recipe end to end, then a rerun served entirely from the cache."""

import json
import os

import matplotlib

matplotlib.use("Agg")

import normfield.figures.common as common
from normfield.figures import Context, main
from normfield.profile import GradProfile

TINY = dict(d_model=8, n_heads=2, d_ff=16, seq_len=4, batch_size=2, vocab_size=32)


def _ctx(out):
    return Context(out=str(out), quick=True, seeds=2, base=dict(TINY), max_depth=2)


def test_recipe_outputs_and_cache(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    assert main(quick=True, out=str(tmp_path), recipes=("xiong_lemma2",), ctx=ctx) == 0
    for ext in ("png", "pdf"):
        assert os.path.getsize(tmp_path / f"xiong_lemma2.{ext}") > 1000
    captions = (tmp_path / "captions.md").read_text()
    assert "xiong_lemma2" in captions and "Pre-LN grows" in captions
    data = sorted(p for p in os.listdir(tmp_path / "data") if p != "figures.json")
    assert len(data) == 4 and len(ctx.computed) == 2   # probe for post and pre (theory is not cached)
    sources = sorted(GradProfile.load(str(tmp_path / "data" / p)).source for p in data)
    assert sources == ["probe", "probe", "theory", "theory"]
    index = json.loads((tmp_path / "data" / "figures.json").read_text())
    assert sorted(index["xiong_lemma2"]["configs"]) == [p[:-5] for p in data]
    probes = [p for p in data if p.startswith("probe")]
    mtimes = {p: os.stat(tmp_path / "data" / p).st_mtime_ns for p in probes}

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached measurement")

    monkeypatch.setattr(common, "measure_grad_norms", fail)
    ctx2 = _ctx(tmp_path)
    assert main(quick=True, out=str(tmp_path), recipes=("xiong_lemma2",), ctx=ctx2) == 0
    assert ctx2.computed == []
    assert {p: os.stat(tmp_path / "data" / p).st_mtime_ns for p in probes} == mtimes
    assert (tmp_path / "captions.md").read_text() == captions


def test_config_names_are_stable_and_distinct(tmp_path):
    ctx = _ctx(tmp_path)
    a, b = ctx.arch(2, "pre", TINY), ctx.arch(2, "post", TINY)
    assert ctx.config_name("probe", a) == _ctx(tmp_path).config_name("probe", a)
    assert len({ctx.config_name(s, x) for s in ("theory", "probe") for x in (a, b)}) == 4
    ctx.seeds = 3
    assert ctx.config_name("probe", a) != _ctx(tmp_path).config_name("probe", a)
