"""The data side shared by theory and probe: token distribution and positional tables.

Tokens and targets are iid over positions and sequences, drawn from `token_probs(arch)`:
uniform over the vocabulary (default) or Zipfian, ``p_v ∝ (v + 1)^-s``.
"""

from __future__ import annotations

import numpy as np


def token_probs(arch) -> np.ndarray:
    """Probabilities of the vocabulary's tokens (float64, sums to 1)."""
    if arch.tokens == "uniform":
        return np.full(arch.vocab_size, 1.0 / arch.vocab_size)
    weights = (np.arange(arch.vocab_size) + 1.0) ** -arch.zipf_exponent
    return weights / weights.sum()


def collision_prob(arch) -> float:
    """P(two independent tokens are equal) = sum_v p_v^2 (1/V for uniform tokens)."""
    p = token_probs(arch)
    return float(np.sum(p * p))


def token_arrays(arch) -> tuple[str, ...]:
    """Names of the batch's token arrays, each (batch_size, seq_len) iid from `token_probs`:
    the input tokens and the targets, and an encoder-decoder's source tokens before them."""
    return (("source",) if arch.decoder_depth else ()) + ("tokens", "targets")


def expected_collisions(arch) -> dict[str, float]:
    """Exact expectations of the batch's token collision counts (`probe.measure.collisions`):
    for every token array, ``<array>.within`` = the number of ordered pairs of distinct
    positions of one sequence holding the same token, ``B n (n - 1) p_c``, and
    ``<array>.across`` = the same over pairs of positions in different sequences,
    ``B (B - 1) n^2 p_c`` (p_c = `collision_prob`).  The theory uses p_c itself; these counts
    are what a seed actually drew (the measurement's control variates, `profile.seed_moments`)."""
    b, n, p_c = arch.batch_size, arch.seq_len, collision_prob(arch)
    out = {}
    for name in token_arrays(arch):
        out[name + ".within"] = b * n * (n - 1) * p_c
        out[name + ".across"] = b * (b - 1) * n * n * p_c
    return out


def sinusoidal_positions(seq_len: int, d_model: int) -> np.ndarray:
    """Vaswani et al. 2017, section 3.5: PE[t, 2i] = sin(t / 10000^(2i/d)),
    PE[t, 2i+1] = cos(t / 10000^(2i/d)); shape (seq_len, d_model), float64."""
    t = np.arange(seq_len, dtype=np.float64)[:, None]
    i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
    angle = t / 10000.0 ** (i / d_model)
    table = np.zeros((seq_len, d_model))
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)[:, : d_model // 2]
    return table


def rope_angles(seq_len: int, d_head: int) -> np.ndarray:
    """RoPE (Su et al. 2021, eq. 34): position t rotates the coordinate pair (2f, 2f+1) of each
    query and key by t * theta_f, theta_f = 10000^(-2f/d_head); shape (seq_len, d_head/2)."""
    theta = 10000.0 ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)
    return np.arange(seq_len, dtype=np.float64)[:, None] * theta[None, :]
