"""Drift metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeq.validate import metrics


def test_identical_tensors_have_no_drift():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert metrics.max_abs(x, x) == 0 and metrics.mean_abs(x, x) == 0 and metrics.rel_l2(x, x) == 0
    assert metrics.sqnr_db(x, x) == math.inf
    assert metrics.cosine(x, x) == pytest.approx(1.0)


def test_known_values():
    ref = np.array([3.0, 4.0])
    cand = np.array([3.0, 4.5])
    assert metrics.max_abs(ref, cand) == 0.5
    assert metrics.mean_abs(ref, cand) == 0.25
    assert metrics.rel_l2(ref, cand) == pytest.approx(0.5 / 5.0)
    assert metrics.sqnr_db(ref, cand) == pytest.approx(10 * math.log10(25 / 0.25))
    assert metrics.cosine(ref, cand) == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))


def test_sqnr_of_uniform_noise_is_about_the_expected_value():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100_000)
    noisy = ref + rng.standard_normal(100_000) * 0.01  # noise power 1e-4 of signal power 1: 40 dB
    assert metrics.sqnr_db(ref, noisy) == pytest.approx(40.0, abs=0.2)


def test_topk_agreement():
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.7], [0.2, 0.3, 0.5]])
    cand = np.array([[0.2, 0.7, 0.1], [0.6, 0.1, 0.7], [0.1, 0.2, 0.9]])
    assert metrics.topk_agreement(ref, cand, 1) == pytest.approx(2 / 3)
    assert metrics.topk_agreement(ref, cand, 2) == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.cosine(np.zeros(3), np.zeros(4))
