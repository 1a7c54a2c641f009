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


def test_liu2020_layer_total_sums_weight_gradients_per_layer():
    import numpy as np

    from normfield import Arch
    from normfield.figures.liu2020 import layer_total
    from normfield.placements import layer_params
    from normfield.profile import GradProfile

    arch = Arch(depth=2, decoder_depth=3, placement="post", d_model=8, n_heads=2, d_ff=8,
                seq_len=2, batch_size=1, vocab_size=5)
    rng = np.random.default_rng(0)
    per_seed = {n: rng.uniform(0.5, 2.0, size=(4, 2 if n.startswith("enc.") else 3))
                for n in layer_params(arch)}
    grads = {n: np.sqrt(v.mean(axis=0)) for n, v in per_seed.items()}
    prof = GradProfile(arch=arch, source="probe", grads=grads, activations={},
                       stderr={n: 0 * g for n, g in grads.items()}, per_seed_sq=per_seed)
    weights = [n for n in layer_params(arch) if n.startswith("dec.") and not n.endswith(".scale")]
    assert len(weights) == 10  # self/cross attention q, k, v, o and ffn w1, w2
    total = sum(per_seed[n] for n in weights)  # (seeds, layers)
    values, se = layer_total(prof, "dec.")
    np.testing.assert_allclose(values, np.sqrt(total.mean(axis=0)))
    np.testing.assert_allclose(se, total.std(axis=0, ddof=1) / 2 / np.sqrt(4 * total.mean(axis=0)))
    assert layer_total(prof, "enc.")[0].shape == (2,)
