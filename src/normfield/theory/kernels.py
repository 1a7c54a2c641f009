"""Kernels over the token positions of a batch.

A batch holds B sequences of n tokens.  At every point of the network the mean-field state is
a kernel over token pairs (DESIGN.md section 2): ``K(i, j) = E[x_i . x_j] / width``.  Tokens of
one sequence form an n x n block (`Blocks.w`, "within"); tokens of two different sequences form
a second n x n block (`Blocks.c`, "across"), the same for every pair of sequences.  The batch
size then enters sums over all N = B n token pairs in closed form (`pair_sum`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Blocks:
    """Within-sequence (`w`) and across-sequence (`c`) n x n blocks of a kernel."""

    w: np.ndarray
    c: np.ndarray

    def __add__(self, other) -> "Blocks":
        if isinstance(other, Blocks):
            return Blocks(self.w + other.w, self.c + other.c)
        return Blocks(self.w + other, self.c + other)

    def __mul__(self, factor) -> "Blocks":
        if isinstance(factor, Blocks):
            return Blocks(self.w * factor.w, self.c * factor.c)
        return Blocks(self.w * factor, self.c * factor)

    __rmul__ = __mul__

    def map(self, fn) -> "Blocks":
        """Apply ``fn(block, diag_rows, diag_cols)`` to both blocks, where the diagonals are the
        within-sequence self-kernels K(i, i) (the same token's variance in either block)."""
        d = np.diag(self.w)
        return Blocks(fn(self.w, d[:, None], d[None, :]), fn(self.c, d[:, None], d[None, :]))

    @property
    def diag(self) -> np.ndarray:
        return np.diag(self.w)

    @staticmethod
    def full(n: int, within: float, across: float) -> "Blocks":
        return Blocks(np.full((n, n), float(within)), np.full((n, n), float(across)))


def pair_sum(k: Blocks, g: Blocks, batch_size: int) -> float:
    """``sum over all N^2 token pairs (i, j) of K(i, j) G(i, j)``: B within-sequence blocks and
    B(B-1) across-sequence blocks."""
    b = batch_size
    return float(b * np.sum(k.w * g.w) + b * (b - 1) * np.sum(k.c * g.c))


def cosine(k: Blocks) -> Blocks:
    """Kernel of the normalized vectors, K(i, j) / sqrt(K(i, i) K(j, j))."""
    d = k.diag
    norm = np.sqrt(np.maximum(d[:, None] * d[None, :], 1e-300))
    return Blocks(k.w / norm, k.c / norm)
