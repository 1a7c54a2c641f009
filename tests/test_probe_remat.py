"""Rematerialization (jax.checkpoint over each block) and unrolled layers change memory and
speed, not the numbers."""

import numpy as np
import pytest

from normfield import Arch, measure_grad_norms

ARCH = Arch(depth=2, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=4, batch_size=2,
            vocab_size=11)


@pytest.mark.parametrize("option, value", [("remat", True), ("remat", "weight_products"),
                                           ("unroll", True)])
def test_layout_options_give_the_same_gradient_norms(option, value):
    plain = measure_grad_norms(ARCH, seeds=2, key=3)
    other = measure_grad_norms(ARCH, seeds=2, key=3, **{option: value})
    assert other.meta[option] == value and plain.meta[option] is False
    for name, values in plain.per_seed_sq.items():
        np.testing.assert_allclose(other.per_seed_sq[name], values, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("value", [1, "dots", None])
def test_remat_names_a_bad_choice_and_the_valid_ones(value):
    with pytest.raises(ValueError, match=f"invalid remat={value!r}: expected one of False, "
                                         "True, 'weight_products'"):
        measure_grad_norms(ARCH, seeds=2, remat=value)
