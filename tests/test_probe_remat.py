"""Rematerialization (jax.checkpoint over each block), unrolled layers and several layers per
scan step change memory and speed, not the numbers."""

import numpy as np
import pytest

from normfield import Arch, measure_grad_norms

ARCH = Arch(depth=3, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=4, batch_size=2,
            vocab_size=11)


@pytest.mark.parametrize("option, value", [("remat", True), ("unroll", True),
                                           ("scan_unroll", 2)])  # 2 steps of 2 and 1 layers
def test_layout_options_give_the_same_gradient_norms(option, value):
    plain = measure_grad_norms(ARCH, seeds=2, key=3)
    other = measure_grad_norms(ARCH, seeds=2, key=3, **{option: value})
    assert other.meta[option] == value and plain.meta[option] != value
    for name, values in plain.per_seed_sq.items():
        np.testing.assert_allclose(other.per_seed_sq[name], values, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("value", [0, 1.5, True])
def test_scan_unroll_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=f"scan_unroll={value!r}.*integer >= 1"):
        measure_grad_norms(ARCH, seeds=2, scan_unroll=value)
