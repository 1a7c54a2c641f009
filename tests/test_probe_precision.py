"""The bf16 matmul of the probe: bf16 operands, float32 accumulation, in the forward product and
in both backward products (cotangent rounded to bf16)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from normfield.probe.model import _bf16_matmul, _scaled_norm, _softmax


def _round_bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_bf16_matmul_forward_and_backward_match_float64_products_of_rounded_operands():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 16)).astype(np.float32)
    w = rng.normal(size=(16, 7)).astype(np.float32)
    g = rng.normal(size=(3, 5, 7)).astype(np.float32)
    y, vjp = jax.vjp(_bf16_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    xr, wr, gr = _round_bf16(x), _round_bf16(w), _round_bf16(g)
    # float32 accumulation of 16 (dx: 7, dw: 15) exactly representable products: error ~1e-6
    np.testing.assert_allclose(y, xr @ wr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gr @ wr.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bni,bnj->ij", xr, gr), rtol=1e-5, atol=1e-5)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    # and the cotangent really is rounded: the float32 cotangent gives a different dx
    assert np.abs(np.asarray(dx) - g.astype(np.float64) @ wr.T).max() > 1e-4


def test_cli_precision_choices_mirror_the_probe():
    from normfield import cli
    from normfield.probe import model
    assert cli.PRECISIONS == model.PRECISIONS


def test_bfloat16_probe_stays_near_float32():
    # bf16 operands carry 8 significant bits (relative rounding <= 2^-9 ~ 0.2% each); a squared
    # gradient norm is a sum of many such products whose rounding errors partly cancel, so a
    # 5% bound on the per-seed squared norms is loose but catches a wrong backward product.
    from normfield import Arch, measure_grad_norms
    arch = Arch(depth=2, placement="post", d_model=32, n_heads=2, d_ff=64, seq_len=8,
                batch_size=2, vocab_size=17)
    ref = measure_grad_norms(arch, seeds=2, key=1)
    low = measure_grad_norms(arch, seeds=2, key=1, precision="bfloat16")
    for name, values in ref.per_seed_sq.items():
        np.testing.assert_allclose(low.per_seed_sq[name], values, rtol=0.05)


def test_softmax_backward_from_its_output_equals_autodiff():
    """`model._softmax` (backward from the output alone) against JAX's differentiation of
    jax.nn.softmax, with masked (-inf) logits as a causal mask makes them."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    x = 2.0 * jax.random.normal(k1, (3, 6, 6))
    x = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), x, -jnp.inf)
    w = jax.random.normal(k2, (3, 6, 6))
    ours = jax.grad(lambda u: jnp.sum(_softmax(u) * w))(x)
    ref = jax.grad(lambda u: jnp.sum(jax.nn.softmax(u, axis=-1) * w))(x)
    assert bool(jnp.all(jnp.isfinite(ours)))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(_softmax(x)), np.asarray(jax.nn.softmax(x, -1)))


@pytest.mark.parametrize("center", [True, False])
def test_norm_backward_from_xhat_equals_autodiff(center):
    """`model._scaled_norm` (LayerNorm / RMSNorm whose backward keeps only xhat and inv)
    against JAX's differentiation of the plain formula, for x and the gain."""
    def plain(x, scale):
        c = x - jnp.mean(x, axis=-1, keepdims=True) if center else x
        return c * jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + 1e-5) * scale

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    x = 3.0 * jax.random.normal(k1, (2, 5, 8)) + 1.0
    scale = 1.0 + 0.3 * jax.random.normal(k2, (8,))
    w = jax.random.normal(k3, (2, 5, 8))
    ours = jax.grad(lambda a, s: jnp.sum(_scaled_norm(a, s, center, 1e-5) * w), (0, 1))(x, scale)
    ref = jax.grad(lambda a, s: jnp.sum(plain(a, s) * w), (0, 1))(x, scale)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(_scaled_norm(x, scale, center, 1e-5)),
                                  np.asarray(plain(x, scale)))
