"""Rematerialization (jax.checkpoint over each block) changes memory, not the numbers."""

import numpy as np

from normfield import Arch, measure_grad_norms

ARCH = Arch(depth=2, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=4, batch_size=2,
            vocab_size=11)


def test_remat_gives_the_same_gradient_norms():
    plain = measure_grad_norms(ARCH, seeds=2, key=3)
    remat = measure_grad_norms(ARCH, seeds=2, key=3, remat=True)
    assert remat.meta["remat"] is True and plain.meta["remat"] is False
    for name, values in plain.per_seed_sq.items():
        np.testing.assert_allclose(remat.per_seed_sq[name], values, rtol=1e-5, atol=1e-12)
