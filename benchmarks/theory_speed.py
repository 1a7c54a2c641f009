"""Theory speed: `predict_grad_norms` time per configuration, each in a fresh process on one core.

Every configuration runs in its own Python process (``OPENBLAS_NUM_THREADS=1``, CPU-only JAX), so
its first call starts from empty caches (the softmax quadratures, the activation tables) and
no configuration warms another.  Per configuration: the first call, the fastest of `repeats`
repeated calls (every cache filled: the cost of the kernel maps themselves; none where the
first call took over 15 s), whether every
predicted norm is finite, and, where the performance issue sets one, the target and the ratios
of the first call and the warm call to it (bidirectional Post-LN depth 48 at seq_len 128:
50 ms; depth 10,000: 5 s).

    OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/theory_speed.py [--quick] [--out F.json]

The theory's cost does not depend on d_model, d_ff or the vocabulary (the kernels are n x n over
token positions), only on depth, seq_len, the mask and the placement; the other fields are the
`Arch` defaults unless a caller passes its own (`benchmarks/run.py` passes its shape's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# (depth, placement, seq_len, mask); the targets are on bidirectional Post-LN
CONFIGS = (
    (12, "post", 128, "bidirectional"),
    (48, "post", 128, "bidirectional"),
    (48, "pre", 128, "bidirectional"),
    (48, "post", 128, "causal"),
    (48, "pre", 128, "causal"),
    (12, "pre", 512, "causal"),
    (1000, "post", 16, "bidirectional"),
    (10000, "post", 16, "bidirectional"),
    (10000, "pre", 16, "bidirectional"),
)
TARGET_SECONDS = {(48, 128): 0.05, (10000, 16): 5.0}
REPEAT_LIMIT_SECONDS = 15.0  # a configuration whose first call takes longer is timed once
QUICK_MAX_DEPTH, QUICK_MAX_SEQ = 2000, 256  # --quick skips deeper or longer configurations


def time_config(depth: int, placement: str, seq_len: int, mask: str, fields: dict,
                repeats: int) -> dict:
    """Time `predict_grad_norms` in this process: first call, fastest repeat, finiteness."""
    import numpy as np

    from normfield.theory.predict import predict_grad_norms

    def once():
        t = time.perf_counter()
        profile = predict_grad_norms(depth, placement, seq_len=seq_len, mask=mask, **fields)
        return time.perf_counter() - t, profile

    first, profile = once()
    repeats = repeats if first <= REPEAT_LIMIT_SECONDS else 0
    warm = min(once()[0] for _ in range(repeats)) if repeats else None
    finite = all(bool(np.all(np.isfinite(v))) for v in profile.grads.values())
    row = {"depth": depth, "placement": placement, "seq_len": seq_len, "mask": mask,
           "first_seconds": first, "warm_seconds": warm, "finite": finite}
    target = TARGET_SECONDS.get((depth, seq_len)) if (placement, mask) == (
        "post", "bidirectional") else None
    if target is not None:
        row.update(target_seconds=target, first_over_target=first / target,
                   warm_over_target=None if warm is None else warm / target)
    return row


def time_in_fresh_process(depth: int, placement: str, seq_len: int, mask: str,
                          fields: dict | None = None, repeats: int = 3) -> dict:
    """`time_config` in a new CPU-only, single-threaded-BLAS Python process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    spec = json.dumps([depth, placement, seq_len, mask, fields or {}, repeats])
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", spec], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"theory timing of {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_row(r: dict) -> str:
    warm = "-" if r["warm_seconds"] is None else f"{r['warm_seconds']:.3f}"
    target = ""
    if "target_seconds" in r:
        target = f"target {r['target_seconds']:g} s: first call {r['first_over_target']:.1f}x"
        if r["warm_over_target"] is not None:
            target += f", warm {r['warm_over_target']:.1f}x"
    return (f"{r['placement']:5s} {r['mask']:13s} depth {r['depth']:5d} seq {r['seq_len']:4d}: "
            f"first {r['first_seconds']:7.3f} s, warm {warm:>6s} s, "
            f"{'finite' if r['finite'] else 'NOT FINITE'}  {target}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="skip the depth-10,000 and seq-512 configurations")
    p.add_argument("--out", default=None, help="save the rows as JSON")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's configuration
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(time_config(*json.loads(args.one))))
        return []
    rows = []
    for config in CONFIGS:
        if args.quick and (config[0] > QUICK_MAX_DEPTH or config[2] > QUICK_MAX_SEQ):
            continue
        rows.append(time_in_fresh_process(*config))
        print(format_row(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"host": platform.processor() or platform.machine(),
                       "python": platform.python_version(), "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
