"""The probe's attention with RoPE, QK-Norm and Henry et al.'s temperature against a plain numpy
implementation written from the papers' formulas (Su et al. 2021, eq. 34; Henry et al. 2020)."""

import numpy as np
import jax
import pytest

from normfield import Arch
from normfield.probe.model import _attention


def _numpy_attention(arch, p, x):
    b, n, d = x.shape
    h, c = arch.n_heads, arch.d_head
    q, k, v = (x @ np.asarray(p[f"attn.{s}"], np.float64) for s in "qkv")
    q, k, v = (u.reshape(b, n, h, c) for u in (q, k, v))
    if arch.qk_norm:
        q, k = (u / np.sqrt(np.mean(u * u, axis=-1, keepdims=True) + arch.norm_eps)
                for u in (q, k))
    if arch.positions == "rope":
        theta = 10000.0 ** (-np.arange(0, c, 2) / c)

        def rotate(u):
            out = np.empty_like(u)
            for t in range(n):
                ang = t * theta
                x1, x2 = u[:, t, :, 0::2], u[:, t, :, 1::2]
                out[:, t, :, 0::2] = x1 * np.cos(ang) - x2 * np.sin(ang)
                out[:, t, :, 1::2] = x1 * np.sin(ang) + x2 * np.cos(ang)
            return out

        q, k = rotate(q), rotate(k)
    logits = np.einsum("bqhc,bkhc->bhqk", q, k)
    if arch.qk_temperature is not None:  # g * cos(q, k); |q| = |k| = sqrt(c) after QK-Norm
        logits = arch.qk_temperature * logits / c
    else:
        logits = logits / np.sqrt(c)
    if arch.mask == "causal":
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhc->bqhc", w, v).reshape(b, n, d)


@pytest.mark.parametrize("fields", [dict(positions="rope"), dict(qk_norm=True),
                                    dict(positions="rope", qk_norm=True, qk_temperature=7.0,
                                         mask="causal")])
def test_attention_matches_numpy(fields):
    arch = Arch(depth=1, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=5,
                batch_size=2, vocab_size=11, **fields)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {f"attn.{s}": jax.random.normal(keys[i], (16, 16)) * 0.4 for i, s in enumerate("qkv")}
    x = jax.random.normal(keys[3], (2, 5, 16))
    got = np.asarray(_attention(arch, p, x, "float32"))
    want = _numpy_attention(arch, p, np.asarray(x, np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
