"""Rematerialization (jax.checkpoint over each block) and unrolled layers change memory and
speed, not the numbers."""

import numpy as np
import pytest

from normfield import Arch, measure_grad_norms

ARCH = Arch(depth=2, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=4, batch_size=2,
            vocab_size=11)


@pytest.mark.parametrize("option", ["remat", "unroll"])
def test_layout_options_give_the_same_gradient_norms(option):
    plain = measure_grad_norms(ARCH, seeds=2, key=3)
    other = measure_grad_norms(ARCH, seeds=2, key=3, **{option: True})
    assert other.meta[option] is True and plain.meta[option] is False
    for name, values in plain.per_seed_sq.items():
        np.testing.assert_allclose(other.per_seed_sq[name], values, rtol=1e-5, atol=1e-12)
