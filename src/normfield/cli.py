"""Command-line interface: ``normfield {probe,predict,validate,figures}``.

The architecture options of ``probe`` and ``predict`` are generated from
``dataclasses.fields(Arch)`` (and ``fields(Init)``, prefixed ``--init-``), so they never drift
from the dataclass: every field is an option with the dataclass default.  Errors in the input
(any ``ValueError`` raised by `Arch`, the probe or the theory) print one line
``normfield: error: <message>`` on stderr and exit with status 2, like argparse's own errors.

`progress` (re-exported from `normfield.progress`) draws a stderr progress bar:
``progress(iterable, total=None, label="", stream=None, enabled=None)``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys
from typing import Any, Sequence

from normfield.arch import (ACTIVATIONS, INIT_SCHEMES, MASKS, NORMS, POSITIONS,
                            TOKEN_DISTRIBUTIONS, WEIGHT_GROUPS, Arch, Init)
from normfield.placements import PLACEMENTS
from normfield.progress import progress

__all__ = ["main", "build_parser", "arch_from_args", "format_profile", "write_profile", "progress"]

PROG = "normfield"
# normfield.probe.model.PRECISIONS (no jax import)
PRECISIONS = ("float32", "tf32", "bfloat16", "float64")

CHOICES: dict[str, Sequence[str]] = {
    "placement": tuple(PLACEMENTS), "norm": NORMS, "activation": ACTIVATIONS, "mask": MASKS,
    "positions": POSITIONS, "tokens": TOKEN_DISTRIBUTIONS, "init.scheme": INIT_SCHEMES,
}

HELP: dict[str, str] = {
    "depth": "number of Transformer blocks (>= 1)",
    "placement": "where the normalization layers sit in each block (see README, Placements)",
    "d_model": "model (residual stream) width",
    "n_heads": "number of attention heads; must divide d_model",
    "d_ff": "hidden width of the position-wise FFN",
    "seq_len": "tokens per sequence",
    "batch_size": "sequences per batch (the loss is the mean over batch_size*seq_len tokens)",
    "vocab_size": "vocabulary size of the input tokens and of the output head (>= 2)",
    "norm": "normalization layer: LayerNorm or RMSNorm",
    "norm_eps": "epsilon added to the variance inside each norm (>= 0)",
    "activation": "FFN activation; swiglu/geglu are gated FFNs (extra ffn.w3 projection)",
    "mask": "attention mask: bidirectional (encoder) or causal (decoder)",
    "positions": "position encoding added to the token embeddings",
    "embed_scale": "constant multiplying the token embeddings (> 0)",
    "embed_norm": "normalize the embedding sum (token + position) before the first block "
                  "(BERT's embedding LayerNorm)",
    "tied_head": "tie the output head to the token embedding",
    "final_norm": "norm after the last block: auto = the placement's own default "
                  "(none for post/deepnorm/b2t, a final norm for pre-norm-style placements)",
    "bias": "give every linear layer a bias (norms have a gain only)",
    "qk_norm": "QK-Norm: RMS-normalize each head's queries and keys",
    "qk_temperature": "with --qk-norm, logits = temperature * cos(q, k) (Henry et al. 2020) "
                      "instead of q.k/sqrt(d_head)",
    "tokens": "distribution of the iid input tokens and targets",
    "zipf_exponent": "exponent s of the Zipf token distribution p(k) ~ k^-s (with --tokens zipf)",
    "decoder_depth": "decoder blocks of an encoder-decoder (0: a single stack of depth blocks; "
                     ">0: depth encoder blocks, then decoder_depth decoder blocks with "
                     "cross-attention)",
    "placement_options": "placement-specific constant, NAME=VALUE, repeatable: "
                         + "; ".join(f"{n}: {', '.join(s.options)}"
                                     for n, s in PLACEMENTS.items() if s.options),
    "init.scheme": "weight initialization scheme: xavier_normal (Xiong et al. 2020), normal "
                   "(N(0, init-std), GPT-2/BERT), torch (PyTorch nn.TransformerEncoderLayer)",
    "init.std": "std of every weight and embedding under --init-scheme normal (> 0)",
    "init.embed_std": "std of the token (and learned position) embeddings under xavier_normal (> 0)",
    "init.residual_scaling": "with --init-scheme normal, divide the std of attn.o and ffn.w2 by "
                             "sqrt(2*depth) (GPT-2)",
    "init.gains": "GROUP=GAIN multiplying the scheme's std of a weight group, repeatable; groups: "
                  + ", ".join(WEIGHT_GROUPS),
    "init.stds": "GROUP=STD replacing the scheme's std of a weight group, repeatable; groups: "
                 + ", ".join(WEIGHT_GROUPS),
}


class CLIError(ValueError):
    """Bad command-line input detected by the CLI itself."""


# ---- option generation ------------------------------------------------------------------------
def _pair(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number after '=' in {text!r}") from None


_FINAL_NORM = {"auto": None, "true": True, "false": False}


def _add_field(group, f: dataclasses.Field, key: str, flag: str) -> None:
    """Add one option for dataclass field `f` (dotted `key` for HELP/CHOICES, `flag` name)."""
    help_text = HELP.get(key, key.replace("_", " "))
    dest = key.replace(".", "__")
    has_default = f.default is not dataclasses.MISSING
    default = f.default if has_default else None
    if key == "final_norm":
        group.add_argument(flag, dest=dest, choices=tuple(_FINAL_NORM), default="auto",
                           help=help_text + " (default: %(default)s)")
        return
    if isinstance(default, bool):
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                           default=default, help=help_text + " (default: %(default)s)")
        return
    if isinstance(default, tuple):  # tuples of (name, value) pairs
        group.add_argument(flag, dest=dest, type=_pair, action="append", default=None,
                           metavar="NAME=VALUE", help=help_text + " (default: none)")
        return
    kwargs: dict[str, Any] = {"dest": dest, "help": help_text, "metavar": f.name.upper()}
    if key in CHOICES:
        kwargs["choices"] = tuple(CHOICES[key])
    if has_default:
        kwargs["type"] = float if default is None else type(default)  # Optional numbers
        kwargs["default"] = default
        kwargs["help"] += " (default: %(default)s)"
    else:  # depth, placement: required
        kwargs["type"] = int if key == "depth" else str
        kwargs["required"] = True
        kwargs["help"] += " (required)"
    if "choices" in kwargs:
        kwargs["metavar"] = "{" + ",".join(kwargs["choices"]) + "}"
    group.add_argument(flag, **kwargs)


def add_arch_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per `Arch` field (and per `Init` field, as ``--init-*``) to `parser`."""
    group = parser.add_argument_group("architecture (fields of normfield.Arch)")
    for f in dataclasses.fields(Arch):
        if f.name == "init":
            continue
        _add_field(group, f, f.name, "--" + f.name.replace("_", "-"))
    init_group = parser.add_argument_group("initialization (fields of normfield.Init)")
    for f in dataclasses.fields(Init):
        _add_field(init_group, f, "init." + f.name, "--init-" + f.name.replace("_", "-"))


def arch_from_args(args: argparse.Namespace) -> Arch:
    """Build the `Arch` described by parsed options (raises ValueError on invalid values)."""
    def value(key: str, f: dataclasses.Field):
        v = getattr(args, key.replace(".", "__"))
        if key == "final_norm":
            return _FINAL_NORM[v]
        if isinstance(f.default, tuple):
            return tuple(v or ())
        return v

    init = Init(**{f.name: value("init." + f.name, f) for f in dataclasses.fields(Init)})
    kwargs = {f.name: value(f.name, f) for f in dataclasses.fields(Arch) if f.name != "init"}
    return Arch(init=init, **kwargs)


# ---- output -----------------------------------------------------------------------------------
def _cell(value: float, err: float | None) -> str:
    if err is None or err != err:  # None or NaN
        return f"{value:.4g}"
    return f"{value:.4g} ± {err:.2g}"


def format_profile(profile) -> str:
    """A readable table of a `GradProfile`: one row per layer, one column per layer parameter
    (grad norm ± standard error for measurements), then the non-layer parameters."""
    arch = profile.arch
    layered = profile.layer_names()
    errs = profile.stderr or {}

    def cell(name: str, i: int) -> str:
        if i >= len(profile.grads[name]):  # an encoder-decoder's shorter stack
            return ""
        e = errs.get(name)
        return _cell(float(profile.grads[name][i]), None if e is None else float(e[i]))

    decoder = f" decoder_depth={arch.decoder_depth}" if arch.decoder_depth else ""
    lines = [f"{profile.source}: depth={arch.depth}{decoder} placement={arch.placement} "
             f"d_model={arch.d_model} n_heads={arch.n_heads} d_ff={arch.d_ff} norm={arch.norm} "
             f"activation={arch.activation}"]
    meta = profile.meta or {}
    if "seeds" in meta:
        lines.append(f"seeds={meta['seeds']} key={meta.get('key')} precision={meta.get('precision')}"
                     f" device={meta.get('device')} time={meta.get('seconds', float('nan')):.1f}s"
                     f" estimator={meta.get('estimator', 'mean')!r}")
    lines.append("grad norm sqrt(E||dL/dW||_F^2)" + (" ± stderr" if errs else "")
                 + "; layer 0 = block nearest the input")
    if layered:
        rows = [["layer", *layered]]
        n_rows = max(arch.depth, arch.decoder_depth)
        rows += [[str(i), *(cell(n, i) for n in layered)] for i in range(n_rows)]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for k, row in enumerate(rows):
            lines.append("  ".join(s.rjust(w) for s, w in zip(row, widths)))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
    others = [n for n in profile.grads if n not in layered]
    if others:
        lines.append("")
        width = max(len(n) for n in others)
        lines += [f"{n.ljust(width)}  {cell(n, 0)}" for n in others]
    return "\n".join(lines)


def write_profile(profile, path: str) -> None:
    """Save `profile` to `path`: CSV rows (`GradProfile.to_rows`) if it ends with ``.csv``,
    JSON (`GradProfile.save`, loadable with `GradProfile.load`) otherwise."""
    if path.lower().endswith(".csv"):
        from normfield.profile import atomic_write_text

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["name", "layer", "grad_norm", "stderr", "source"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(profile.to_rows())
        atomic_write_text(path, buf.getvalue())
    else:
        profile.save(path)


def _emit(profile, args) -> int:
    print(format_profile(profile))
    if args.out:
        write_profile(profile, args.out)
        print(f"\nsaved {args.out}", file=sys.stderr)
    return 0


# ---- subcommands ------------------------------------------------------------------------------
def cmd_probe(args) -> int:
    arch = arch_from_args(args)
    from normfield.probe.measure import measure_grad_norms

    profile = measure_grad_norms(arch, seeds=args.seeds, key=args.key, precision=args.precision,
                                 chunk=args.chunk, remat=args.remat, unroll=args.unroll)
    return _emit(profile, args)


def cmd_predict(args) -> int:
    arch = arch_from_args(args)
    import normfield

    try:
        profile = normfield.predict(arch)
    except NotImplementedError as exc:
        raise CLIError(f"the theory is not available: {exc}") from None
    return _emit(profile, args)


def _dispatch(module: str, args) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
        entry = getattr(mod, "main")
    except (ImportError, AttributeError) as exc:
        print(f"{PROG}: error: {module} is not available ({exc})", file=sys.stderr)
        return 2
    extra = {k: getattr(args, k) for k in ("grid", "shard", "merge", "seeds", "chunk")
             if getattr(args, k, None) is not None and getattr(args, k) is not False}
    result = entry(quick=args.quick, out=args.out, **extra)
    if isinstance(result, bool):
        return 0 if result else 1
    if isinstance(result, int):
        return result
    return 0


def cmd_validate(args) -> int:
    return _dispatch("normfield.validate", args)


def cmd_figures(args) -> int:
    return _dispatch("normfield.figures", args)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr (status 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from normfield import __version__

    parser = _Parser(
        prog=PROG, formatter_class=_Formatter,
        description="Mean-field predictions (predict) and JAX measurements (probe) of per-layer "
                    "gradient norms of randomly initialized Transformers, for any placement of "
                    "the normalization layers.",
        epilog="examples:\n"
               "  normfield probe --depth 12 --placement post --seeds 32 --out post.json\n"
               "  normfield predict --depth 12 --placement pre --out pre.csv\n"
               "  normfield figures --quick\n"
               "run 'normfield COMMAND --help' for the options of a command")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    out_help = ("write the result to this file: CSV rows (name, layer, grad_norm, stderr, source) "
                "if it ends with .csv, JSON loadable with normfield.GradProfile.load otherwise")
    p = sub.add_parser("probe", formatter_class=_Formatter,
                       help="measure gradient norms with the JAX probe",
                       description="Build an Arch, measure sqrt(mean over seeds of ||dL/dW||_F^2) "
                                   "for every parameter with normfield.measure_grad_norms and "
                                   "print a per-layer table (grad norm ± standard error). Seeds "
                                   "are sharded over all local devices (GPUs if present).")
    add_arch_options(p)
    g = p.add_argument_group("measurement (arguments of normfield.measure_grad_norms)")
    g.add_argument("--seeds", type=int, default=16,
                   help="independent initializations, each with its own tokens and targets "
                        "(default: %(default)s)")
    g.add_argument("--key", type=int, default=0,
                   help="integer seed of the whole measurement; same key, same numbers "
                        "(default: %(default)s)")
    g.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="float32: full-precision matmuls; tf32; bfloat16: bf16 operands with "
                        "float32 accumulation; float64: the float32 draws computed in float64 "
                        "(default: %(default)s)")
    g.add_argument("--chunk", type=int, default=None,
                   help="seeds per compiled call; lower it to save memory (default: all seeds)")
    g.add_argument("--remat", nargs="?", const=True, default=False, choices=("weight_products",),
                   help="recompute each block in the backward pass (jax.checkpoint) to save "
                        "memory; --remat weight_products keeps the x @ W products and recomputes "
                        "the rest (faster in TF32 on an H200)")
    g.add_argument("--unroll", action="store_true",
                   help="layers as a Python loop instead of one lax.scan: faster on a GPU, "
                        "compile time grows with depth")
    g.add_argument("--out", metavar="PATH", help=out_help)
    p.set_defaults(handler=cmd_probe)

    p = sub.add_parser("predict", formatter_class=_Formatter,
                       help="predict gradient norms with the mean-field theory",
                       description="Build an Arch and print the mean-field prediction "
                                   "normfield.predict(arch) of sqrt(E ||dL/dW||_F^2) for every "
                                   "parameter, as a per-layer table.")
    add_arch_options(p)
    p.add_argument("--out", metavar="PATH", help=out_help)
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("validate", help="compare theory against the probe on a grid of configs",
                       description="Run normfield.validate.main(quick=..., out=...): the theory "
                                   "against probe measurements over placements and depths.")
    p.add_argument("--quick", action="store_true",
                   help="small grid and few seeds (minutes on a CPU)")
    p.add_argument("--grid", choices=("quick", "medium", "full", "sample", "coverage"),
                   help="grid to run: quick (= --quick), medium (d_model 256/512, depth 6-24, "
                        "bidirectional and causal, 96 seeds: the accuracy bar, about an hour of "
                        "one CPU core, half that as two shards), "
                        "full (the whole grid, for a GPU), sample (16 configs of the full grid "
                        "along seq_len 64/256, GELU and d_model 1024, 64 seeds) or coverage (one "
                        "config per placement, norm, activation, position and QK-Norm at "
                        "d_model 256); default full, or quick with --quick")
    p.add_argument("--shard", metavar="I/N",
                   help="run only shard I of N (job arrays; 0 <= I < N): the configurations split "
                        "into N sets of equal estimated cost")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per configuration (default: the grid's, 96 for medium, 64 for "
                        "sample and coverage); 1-32 or a multiple of 32, measured in 32-seed blocks, so "
                        "that raising it measures only the new blocks")
    p.add_argument("--chunk", type=int, default=None,
                   help="seeds per compiled call (default 16); lower it when a configuration "
                        "does not fit in memory (d_model 1024: 4 on a 24 GB CPU host)")
    p.add_argument("--merge", action="store_true",
                   help="measure nothing: compare the configurations already measured under "
                        "--out (after the shards of a job array have finished)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder for the validation results (default: results/validation-GRID)")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("figures", help="regenerate the figures",
                       description="Run normfield.figures.main(quick=..., out=...): regenerate "
                                   "every figure of the README into a folder.")
    p.add_argument("--quick", action="store_true",
                   help="fewer seeds and smaller models (minutes on a CPU)")
    p.add_argument("--out", metavar="DIR", default="figures",
                   help="folder the figures are written to (default: %(default)s)")
    p.set_defaults(handler=cmd_figures)
    return parser


def _fail(message: str) -> int:
    lines = str(message).strip().splitlines() or ["invalid input"]
    print(f"{PROG}: error: {lines[0]}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normfield`` command; returns the exit status (0 on success).

    Invalid input prints one line ``normfield: error: <message>`` on stderr and gives status 2:
    returned for values rejected by Arch/probe/theory (ValueError), raised as ``SystemExit(2)``
    by argparse for malformed options.  A non-finite gradient (measured, or a diverging
    prediction) gives status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except ValueError as exc:
        code = _fail(str(exc) or type(exc).__name__)
    except ArithmeticError as exc:  # NonFiniteGradientError; a diverging theory
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    return code


if __name__ == "__main__":
    sys.exit(main())
