"""The `normfield` command line: probe/predict output files and one-line errors on bad input."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from normfield import Arch, GradProfile, Init
from normfield.cli import arch_from_args, build_parser, main
from normfield.progress import progress

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--depth", "2", "--placement", "post", "--d-model", "16", "--n-heads", "2", "--d-ff", "32",
        "--seq-len", "4", "--vocab-size", "11"]


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    return subprocess.run([sys.executable, "-m", "normfield", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0]


def test_options_cover_every_arch_field():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - introspection for the test
    for command in ("probe", "predict"):
        dests = {a.dest for a in sub[command]._actions}
        for f in dataclasses.fields(Arch):
            if f.name != "init":
                assert f.name in dests, (command, f.name)
        for f in dataclasses.fields(Init):
            assert f"init__{f.name}" in dests, (command, f.name)


def test_defaults_build_the_default_arch():
    args = build_parser().parse_args(["predict", "--depth", "3", "--placement", "pre"])
    assert arch_from_args(args) == Arch(depth=3, placement="pre")


def test_all_options_reach_the_arch():
    args = build_parser().parse_args([
        "probe", "--depth", "4", "--placement", "deepnorm", "--norm", "rmsnorm",
        "--activation", "swiglu", "--mask", "causal", "--positions", "learned", "--tied-head",
        "--final-norm", "true", "--bias", "--tokens", "zipf", "--zipf-exponent", "1.5",
        "--placement-options", "alpha=2", "--placement-options", "beta=0.5",
        "--init-scheme", "normal", "--init-std", "0.03", "--init-residual-scaling",
        "--init-gains", "attn.o=0.5", "--init-stds", "head.out=0.1"])
    arch = arch_from_args(args)
    assert arch == Arch(depth=4, placement="deepnorm", norm="rmsnorm", activation="swiglu",
                        mask="causal", positions="learned", tied_head=True, final_norm=True,
                        bias=True, tokens="zipf", zipf_exponent=1.5,
                        placement_options=(("alpha", 2.0), ("beta", 0.5)),
                        init=Init(scheme="normal", std=0.03, residual_scaling=True,
                                  gains=(("attn.o", 0.5),), stds=(("head.out", 0.1),)))


def test_probe_writes_json_and_csv(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    code, stdout, _ = run_main(capsys, "probe", *TINY, "--seeds", "2", "--out", str(out))
    assert code == 0
    profile = GradProfile.load(str(out))
    assert profile.source == "probe"
    assert profile.arch == Arch(depth=2, placement="post", d_model=16, n_heads=2, d_ff=32,
                                seq_len=4, vocab_size=11)
    assert profile.meta["seeds"] == 2
    assert "estimator='mean'" in stdout  # 2 seeds: too few for control variates
    assert set(profile.per_seed_collisions) == {"tokens.within", "tokens.across",
                                                "targets.within", "targets.across"}
    for name in profile.layer_names():
        assert profile[name].shape == (2,)
        assert np.all(np.isfinite(profile[name])) and np.all(profile[name] > 0)
        assert name in stdout
    assert "±" in stdout

    csv_path = tmp_path / "tiny.csv"
    code, _, _ = run_main(capsys, "probe", *TINY, "--seeds", "2", "--out", str(csv_path))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(rows) == len(profile.to_rows())
    assert set(rows[0]) == {"name", "layer", "grad_norm", "stderr", "source"}
    by_key = {(r["name"], r["layer"]): float(r["grad_norm"]) for r in rows}
    assert by_key[("attn.q", "1")] == pytest.approx(float(profile["attn.q"][1]), rel=1e-6)
    assert by_key[("head.out", "")] == pytest.approx(float(profile["head.out"][0]), rel=1e-6)


@pytest.mark.parametrize("bad", [
    ["--depth", "0", "--placement", "post"],
    ["--depth", "2", "--placement", "bogus"],
    ["--depth", "2", "--placement", "pre", "--d-model", "10", "--n-heads", "3"],
    ["--depth", "2", "--placement", "post", "--placement-options", "alpha=2"],
    ["--depth", "two", "--placement", "pre"],
])
def test_bad_input_is_one_line_exit_2(bad, capsys):
    code, _, err = run_main(capsys, "probe", *bad, "--seeds", "2")
    assert_one_line_error(code, err)


def test_bad_probe_argument(capsys):
    code, _, err = run_main(capsys, "probe", *TINY, "--seeds", "0")
    assert_one_line_error(code, err)
    assert "seeds" in err


@pytest.mark.parametrize("flag", ["--seeds", "--chunk"])
def test_validate_zero_seeds_or_chunk_is_an_error_not_the_default(flag, capsys, tmp_path):
    code, _, err = run_main(capsys, "validate", "--quick", flag, "0", "--out", str(tmp_path))
    assert_one_line_error(code, err)
    assert f"{flag[2:]}=0" in err


def test_python_dash_m_bad_input_subprocess():
    proc = run_module("probe", "--depth", "0", "--placement", "post")
    assert_one_line_error(proc.returncode, proc.stderr)
    assert proc.stderr.startswith("normfield: error: invalid depth=0")
    proc = run_module("predict", "--depth", "2", "--placement", "pre", "--d-model", "10",
                      "--n-heads", "3")
    assert_one_line_error(proc.returncode, proc.stderr)


def test_help_of_every_command():
    for command in ("probe", "predict", "validate", "figures"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0


def test_predict(tmp_path, capsys):
    import normfield

    arch = Arch(depth=2, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=4,
                vocab_size=11)
    try:
        normfield.predict(arch)
    except NotImplementedError:
        pytest.skip("theory not implemented yet")
    out = tmp_path / "pred.json"
    code, stdout, _ = run_main(capsys, "predict", *TINY[:2], "--placement", "pre", *TINY[4:],
                               "--out", str(out))
    assert code == 0
    profile = GradProfile.load(str(out))
    assert profile.source == "theory"
    assert profile.arch == arch
    assert "attn.q" in stdout
    json.loads(out.read_text())


def test_missing_module_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "normfield.validate", None)  # import raises ImportError
    code, _, err = run_main(capsys, "validate", "--quick")
    assert_one_line_error(code, err)


def test_dispatch_passes_quick_and_out(capsys, monkeypatch, tmp_path):
    import types

    calls = []
    fake = types.ModuleType("normfield.figures")
    fake.main = lambda quick, out: calls.append((quick, out))
    monkeypatch.setitem(sys.modules, "normfield.figures", fake)
    code, _, _ = run_main(capsys, "figures", "--quick", "--out", str(tmp_path))
    assert code == 0 and calls == [(True, str(tmp_path))]


def test_validate_seeds_reach_the_grid_and_bad_counts_are_refused(capsys, monkeypatch, tmp_path):
    import types

    calls = []
    fake = types.ModuleType("normfield.validate")
    fake.main = lambda quick, out, **kw: calls.append((quick, out, kw))
    monkeypatch.setitem(sys.modules, "normfield.validate", fake)
    code, _, _ = run_main(capsys, "validate", "--grid", "medium", "--seeds", "96", "--merge",
                          "--out", str(tmp_path))
    assert code == 0 and calls == [(False, str(tmp_path), {"grid": "medium", "merge": True,
                                                           "seeds": 96})]
    monkeypatch.undo()
    code, _, err = run_main(capsys, "validate", "--grid", "quick", "--seeds", "40", "--merge",
                            "--out", str(tmp_path))
    assert_one_line_error(code, err)
    assert "seeds=40" in err


def test_progress_bar():
    stream = io.StringIO()
    assert list(progress(range(5), label="t", stream=stream, enabled=True)) == list(range(5))
    text = stream.getvalue()
    assert "t [" in text and "5/5" in text
    assert list(progress(iter([1, 2]), stream=stream, enabled=False)) == [1, 2]


def test_predict_encoder_decoder_table_has_a_row_per_layer_of_the_longer_stack(capsys):
    code, stdout, _ = run_main(capsys, "predict", *TINY, "--decoder-depth", "3")
    assert code == 0
    lines = stdout.splitlines()
    assert "depth=2 decoder_depth=3" in lines[0]
    header = lines[2].split()
    assert "enc.attn.q" in header and "dec.cross_attn.k" in header
    rows = [line.split() for line in lines[4:7]]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    # layer 2 exists only in the decoder: its row has the decoder columns alone
    n_dec = sum(name.startswith("dec.") for name in header)
    assert len(rows[2]) == 1 + n_dec and len(rows[0]) == len(header)


@pytest.mark.parametrize("flags, remat", [([], False), (["--remat"], True),
                                          (["--remat", "weight_products"], "weight_products")])
def test_probe_remat_flag(flags, remat):
    from normfield.cli import build_parser

    args = build_parser().parse_args(["probe", *TINY, *flags])
    assert args.remat is remat if isinstance(remat, bool) else args.remat == remat


def test_probe_remat_flag_names_the_valid_policy(capsys):
    code, _, err = run_main(capsys, "probe", *TINY, "--remat", "dots")
    assert code == 2 and "weight_products" in err and "'dots'" in err
