"""The fused attention path (`jax.nn.dot_product_attention`) computes the same function as the
written-out softmax attention; only rounding differs."""

import numpy as np
import pytest

from normfield import Arch, measure_grad_norms
from normfield import cli
from normfield.probe import model


def test_fused_attention_matches_written_out_attention_in_float32():
    # causal: the fused path must apply the mask itself (is_causal), the harder case
    arch = Arch(depth=2, placement="pre", d_model=16, n_heads=2, d_ff=32, seq_len=6,
                batch_size=2, vocab_size=11, mask="causal", positions="rope")
    plain = measure_grad_norms(arch, seeds=2, key=5)
    fused = measure_grad_norms(arch, seeds=2, key=5, attention="fused")
    assert fused.meta["attention"] == "fused" and plain.meta["attention"] == "xla"
    for name, values in plain.per_seed_sq.items():
        np.testing.assert_allclose(fused.per_seed_sq[name], values, rtol=1e-4, atol=1e-12)


def test_fused_attention_in_bfloat16_stays_near_float32():
    # bf16 operands carry 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per operand); the
    # squared norms are sums over many such products, so a few percent bounds the difference.
    arch = Arch(depth=2, placement="post", d_model=32, n_heads=2, d_ff=64, seq_len=8,
                batch_size=2, vocab_size=17)
    ref = measure_grad_norms(arch, seeds=2, key=1)
    low = measure_grad_norms(arch, seeds=2, key=1, precision="bfloat16", attention="fused")
    for name, values in ref.per_seed_sq.items():
        np.testing.assert_allclose(low.per_seed_sq[name], values, rtol=0.05)


def test_unknown_attention_implementation_is_named():
    arch = Arch(depth=1, placement="pre", d_model=8, n_heads=2, d_ff=8, seq_len=2,
                batch_size=1, vocab_size=5)
    with pytest.raises(ValueError, match="'flash'.*xla.*fused"):
        measure_grad_norms(arch, seeds=1, attention="flash")


def test_cli_choices_mirror_the_probe():
    assert cli.ATTENTION_IMPLS == model.ATTENTION_IMPLS
    assert cli.PRECISIONS == model.PRECISIONS
