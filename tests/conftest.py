"""Test-session setup: XLA's CPU backend compiles without LLVM optimization.

The suite compiles many small programs and runs each a few times, so compile time dominates it
(on 2 cores the two-process `jax.distributed` test takes 70 s at the default level, 21 s at
level 0).  The level changes how fast the generated code runs, not what it computes: every
test compares numbers to references, and the probe's own runs (validation, figures,
benchmarks) keep XLA's defaults.  Set before any test imports jax and inherited by the
subprocesses the tests start; an ``XLA_FLAGS`` of the caller is kept, with this flag appended."""

import os

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"

if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()
