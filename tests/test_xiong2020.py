"""Xiong et al. 2020's Lemma 2 and Theorem 1 scaling, from the general interpreter."""

import numpy as np
import pytest

from normfield import predict
from normfield.theory.xiong2020 import (compare_lemma2, lemma2_bounds, theorem1_scaling,
                                        xiong_arch)


def test_uniform_attention_from_zero_query_key_weights():
    # W^Q = W^K = 0: logits vanish, attention is uniform, so no gradient reaches W^Q or W^K
    prof = predict(xiong_arch(3, "pre", d=64, seq_len=8))
    assert np.all(prof["attn.q"] == 0.0) and np.all(prof["attn.k"] == 0.0)
    assert np.all(prof["ffn.w2"] > 0)


def test_lemma2_post_ln_sum_is_three_halves_d():
    rows = compare_lemma2(depth=2, d=256, seq_len=8)
    # ReLU FFN on a LayerNorm output with Xavier d x d weights adds d/2: exactly 3d/2
    assert rows[0]["ours_post_sum"] == pytest.approx(1.5 * 256, rel=1e-12)


def test_lemma2_pre_ln_inside_bounds():
    for row in compare_lemma2(depth=12, d=256, seq_len=8):
        assert row["pre_low"] * (1 - 1e-12) <= row["ours_pre"] <= row["pre_high"], row


def test_theorem1_scaling():
    rows = theorem1_scaling(depths=(6, 12, 24, 48), d=128, seq_len=8)
    post = [r["last_w2"] for r in rows if r["placement"] == "post"]
    pre = [r["last_w2_times_sqrt_L"] for r in rows if r["placement"] == "pre"]
    assert max(post) / min(post) < 1.01  # constant in L
    assert max(pre) / min(pre) < 1.15  # ~ 1/sqrt(L): x sqrt(L) varies little over 8x in L
    pre_raw = [r["last_w2"] for r in rows if r["placement"] == "pre"]
    assert pre_raw[0] / pre_raw[-1] > 2.4  # while the value itself falls ~sqrt(8) = 2.8x


def test_bad_layer():
    with pytest.raises(ValueError, match="layer=-1"):
        lemma2_bounds(-1, 64)
