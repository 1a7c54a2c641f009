"""Rematerialization (jax.checkpoint over each block) and unrolled layers change memory and
speed, not the numbers."""

import numpy as np
import pytest

from normfield import Arch, measure_grad_norms

ARCH = Arch(depth=2, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=4, batch_size=2,
            vocab_size=11)


@pytest.mark.parametrize("option, value, arch", [
    ("remat", True, ARCH), ("remat", "weight_products", ARCH), ("unroll", True, ARCH),
    ("fused_attention", "xla", ARCH), ("fused_attention", "xla", ARCH.replace(mask="causal"))])
def test_layout_options_give_the_same_gradient_norms(option, value, arch):
    """Same numbers up to float rounding; fused_attention='xla' runs the folded
    `jax.nn.dot_product_attention` path that the GPU's 'cudnn' takes (`probe.fused`)."""
    plain = measure_grad_norms(arch, seeds=2, key=3)
    other = measure_grad_norms(arch, seeds=2, key=3, **{option: value})
    assert other.meta[option] == value and plain.meta[option] in (False, None)
    for name, values in plain.per_seed_sq.items():
        np.testing.assert_allclose(other.per_seed_sq[name], values, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("value", [1, "dots", None])
def test_remat_names_a_bad_choice_and_the_valid_ones(value):
    with pytest.raises(ValueError, match=f"invalid remat={value!r}: expected one of False, "
                                         "True, 'weight_products'"):
        measure_grad_norms(ARCH, seeds=2, remat=value)


def test_cudnn_fused_attention_needs_bf16_and_says_so():
    with pytest.raises(ValueError, match="fused_attention='cudnn' with precision='float32'"):
        measure_grad_norms(ARCH, seeds=2, fused_attention="cudnn")
    with pytest.raises(ValueError, match="invalid fused_attention='flash'"):
        measure_grad_norms(ARCH, seeds=2, fused_attention="flash")
