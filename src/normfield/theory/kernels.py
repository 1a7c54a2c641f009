"""Kernels over the token positions of a batch.

A batch holds B sequences of n tokens.  At every point of the network the mean-field state is
a kernel over token pairs (DESIGN.md section 2): ``K(i, j) = E[x_i . x_j] / width``.  Tokens of
one sequence form an n x n block (`Blocks.w`, "within"); tokens of two different sequences form
a second n x n block (`Blocks.c`, "across"), the same for every pair of sequences.  The batch
size then enters sums over all N = B n token pairs in closed form (`pair_sum`).

Same-token pairs.  The kernel is an expectation over the data, in which two positions hold the
same token with probability ``p_c = sum_v p_v^2``.  The token-embedding gradient sums the
gradients of the positions that share a token, so it needs the gradient kernel *given* that
two positions hold the same token, which is larger than the average pair's (their inputs
share the token embedding).  A kernel can therefore carry a companion: the same two blocks
conditioned on the pair's tokens being equal (`Blocks.same`).  Every map of the interpreter
depends on the entry (i, j), the diagonal and sums over pairs, in which one pair's entries
have weight O(1/n^2) (bidirectional attention) or 1/((i+1)(j+1)) (causal rows that see few
keys), so the companion is propagated by the same maps evaluated at the conditioned entries,
with the diagonal and the sums of the unconditioned kernel plus the pair's own share where
`attention` keeps it.  Its diagonal entries are not used.
"""

from __future__ import annotations

import numpy as np


class Blocks:
    """Within-sequence (`w`) and across-sequence (`c`) n x n blocks of a kernel, optionally
    followed by their same-token companion (module docstring).

    Stored as one (2, n, n) float array `a` (``a[0] = w``, ``a[1] = c``; `w` and `c` are views
    of it), or (4, n, n) with the companion in ``a[2:]``, so that every elementwise operation
    on all blocks is one numpy call.  Treated as immutable (operations may return an operand
    itself) except where a caller fills a fresh kernel's diagonal in place."""

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

    @property
    def main(self) -> "Blocks":
        """The (unconditioned) within and across blocks."""
        return self if len(self.a) == 2 else Blocks.of(self.a[:2])

    @property
    def same(self) -> "Blocks | None":
        """The same-token companion (None when the kernel carries none)."""
        return Blocks.of(self.a[2:]) if len(self.a) == 4 else None

    @property
    def diag(self) -> np.ndarray:
        return self.a[0].diagonal()

    @staticmethod
    def full(n: int, within: float, across: float) -> "Blocks":
        a = np.empty((2, n, n))
        a[0], a[1] = within, across
        return Blocks.of(a)

    def with_same(self, same: "Blocks | None" = None) -> "Blocks":
        """This kernel's main blocks followed by the companion `same` (default: the main
        blocks themselves, for a quantity that does not depend on the pair's tokens)."""
        return Blocks.of(np.concatenate((self.a[:2], (same or self.main).a)))

    def zeros(self) -> "Blocks":
        """A kernel of zeros with as many blocks as this one."""
        return Blocks.of(np.zeros(self.a.shape))


def block_sums(x: np.ndarray) -> np.ndarray:
    """``(sum x[0], sum x[1])`` of a (2, n, n) or (4, n, n) array (the main blocks), each
    summed as ``np.sum`` sums one block."""
    return np.add.reduce(x[:2].reshape(2, -1), axis=1)


def pair_sum(k: Blocks, g: Blocks, batch_size: int, collision: float = 0.0) -> float:
    """``E sum over all N^2 token pairs (i, j) of K(i, j) G(i, j)``: B within-sequence blocks and
    B(B-1) across-sequence blocks.

    With `collision` = p_c > 0 and both kernels carrying their same-token companions (K_s,
    G_s), each pair of distinct positions adds the covariance of K and G through the pair's
    token event (law of total expectation over "same token" (probability p_c) and "different
    tokens", each kernel deterministic given the event, as everywhere in the theory):
    ``E[K G] = K G + p_c / (1 - p_c) (K_s - K)(G_s - G)``, since K = p_c K_s + (1 - p_c) K_d.
    Two positions holding the same token have both a larger input kernel and a larger gradient
    kernel (the FFN weights of a Pre-LN block: -8.5% -> -2.0% at vocabulary 8)."""
    b = batch_size
    w, c = block_sums(k.a[:2] * g.a[:2])
    total = b * w + b * (b - 1) * c
    if collision and k.same is not None and g.same is not None:
        cov = (k.a[2:] - k.a[:2]) * (g.a[2:] - g.a[:2])
        w_s = np.add.reduce(cov[0].reshape(-1)) - np.trace(cov[0])  # distinct positions only
        c_s = np.add.reduce(cov[1].reshape(-1))
        total += collision / (1.0 - collision) * (b * w_s + b * (b - 1) * c_s)
    return float(total)


def cosine(k: Blocks) -> Blocks:
    """Kernel of the normalized vectors, K(i, j) / sqrt(K(i, i) K(j, j))."""
    d = k.diag
    norm = np.sqrt(np.maximum(d[:, None] * d[None, :], 1e-300))
    return Blocks.of(k.a / norm)
