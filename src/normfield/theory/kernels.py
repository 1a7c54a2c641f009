"""Kernels over the token positions of a batch.

A batch holds B sequences of n tokens.  At every point of the network the mean-field state is
a kernel over token pairs (DESIGN.md section 2): ``K(i, j) = E[x_i . x_j] / width``.  Tokens of
one sequence form an n x n block (`Blocks.w`, "within"); tokens of two different sequences form
a second n x n block (`Blocks.c`, "across"), the same for every pair of sequences.  The batch
size then enters sums over all N = B n token pairs in closed form (`pair_sum`).
"""

from __future__ import annotations

import numpy as np


class Blocks:
    """Within-sequence (`w`) and across-sequence (`c`) n x n blocks of a kernel.

    Stored as one (2, n, n) float array `a` (``a[0] = w``, ``a[1] = c``; `w` and `c` are views
    of it), so that every elementwise operation on both blocks is one numpy call.  Treated as
    immutable (operations may return an operand itself) except where a caller fills a fresh
    kernel's diagonal in place."""

    __slots__ = ("a",)

    def __init__(self, w, c):
        self.a = np.array((w, c), dtype=float)

    @classmethod
    def of(cls, a: np.ndarray) -> "Blocks":
        """Wrap a (2, n, n) array without copying it."""
        out = object.__new__(cls)
        out.a = a
        return out

    @property
    def w(self) -> np.ndarray:
        return self.a[0]

    @property
    def c(self) -> np.ndarray:
        return self.a[1]

    def __add__(self, other) -> "Blocks":
        return Blocks.of(self.a + (other.a if isinstance(other, Blocks) else other))

    def __mul__(self, factor) -> "Blocks":
        if isinstance(factor, Blocks):
            return Blocks.of(self.a * factor.a)
        if isinstance(factor, float) and factor == 1.0:  # x * 1.0 == x: the kernel itself
            return self
        return Blocks.of(self.a * factor)

    __rmul__ = __mul__

    def map(self, fn) -> "Blocks":
        """Apply ``fn(block, diag_rows, diag_cols)`` to both blocks, where the diagonals are the
        within-sequence self-kernels K(i, i) (the same token's variance in either block)."""
        d = self.diag
        return Blocks(fn(self.w, d[:, None], d[None, :]), fn(self.c, d[:, None], d[None, :]))

    @property
    def diag(self) -> np.ndarray:
        return self.a[0].diagonal()

    @staticmethod
    def full(n: int, within: float, across: float) -> "Blocks":
        a = np.empty((2, n, n))
        a[0], a[1] = within, across
        return Blocks.of(a)


def block_sums(x: np.ndarray) -> np.ndarray:
    """``(sum x[0], sum x[1])`` of a (2, n, n) array, each summed as ``np.sum`` sums one block."""
    return np.add.reduce(x.reshape(2, -1), axis=1)


def pair_sum(k: Blocks, g: Blocks, batch_size: int) -> float:
    """``sum over all N^2 token pairs (i, j) of K(i, j) G(i, j)``: B within-sequence blocks and
    B(B-1) across-sequence blocks."""
    b = batch_size
    w, c = block_sums(k.a * g.a)
    return float(b * w + b * (b - 1) * c)


def cosine(k: Blocks) -> Blocks:
    """Kernel of the normalized vectors, K(i, j) / sqrt(K(i, i) K(j, j))."""
    d = k.diag
    norm = np.sqrt(np.maximum(d[:, None] * d[None, :], 1e-300))
    return Blocks.of(k.a / norm)
